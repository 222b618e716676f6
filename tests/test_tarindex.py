"""The tar header walk (modelcache/sources/tarindex.py) on bytes, against tarfile and store/unpack.py.

Archives are written by the standard library's tarfile in each of its
formats (ustar, GNU, pax) or patched by hand from the ustar spec; the walk
must find the members tarfile finds, at the same offsets, give the same
listing rows as unpacking the whole layer, and account for every byte.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

import pytest
from support import make_tar

from modelcache.model import Compression
from modelcache.sources.tarindex import BLOCK, INLINE_MAX, TarIndex, Unwalkable, budget, walk_bytes
from modelcache.store.content import ContentStore
from modelcache.store.unpack import Listing, unpack_layer

_rnd = random.Random(13)
BIG = _rnd.randbytes(INLINE_MAX + 4321)
LONG = "models/" + "n" * 120 + "/" + "deep" * 30 + "/weights.bin"
DIR = {"type": tarfile.DIRTYPE}


def _entries(fmt: int) -> list[tuple[str, bytes | None, dict]]:
    entries = [
        ("./", None, DIR), ("models/", None, DIR),
        ("models/a.bin", BIG, {}), ("models/config.json", b'{"x": 1}', {}),
        ("models/link", None, {"type": tarfile.SYMTYPE, "linkname": "a.bin"}),
        ("models/hard", None, {"type": tarfile.LNKTYPE, "linkname": "models/a.bin"}),
        ("models/.wh.old", b"", {}), ("gone/.wh..wh..opq", b"", {}),
        ("models/empty", b"", {}), ("models/b.bin", BIG[::-1], {}),
    ]
    if fmt != tarfile.USTAR_FORMAT:  # names and link targets past ustar's 100 + 155 bytes
        entries += [(LONG, BIG[:INLINE_MAX + 1], {}),
                    ("models/far", None, {"type": tarfile.SYMTYPE, "linkname": LONG.removeprefix("models/")})]
    if fmt == tarfile.PAX_FORMAT:
        entries.append(("models/ünïcode-∂.bin", b"pax path", {}))
    return entries


def _tiles(index: TarIndex, data: bytes) -> bytes:
    return b"".join(p if isinstance(p, bytes) else data[p.offset:p.offset + p.member.size] for p in index.pieces())


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_members_and_offsets_are_tarfiles(fmt: int) -> None:
    """Every member tarfile sees, same name, type, size, link and data offset; bytes read + ranged files = layer."""
    data = make_tar(_entries(fmt), fmt=fmt)
    index = walk_bytes(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, m.type, m.size, m.linkname, m.offset_data) for m in tar.getmembers()]
    assert [(e.member.name, e.member.type, e.member.size, e.member.linkname, e.offset)
            for e in index.entries] == expected
    assert _tiles(index, data) == data
    ranged = {e.member.name for e in index.ranged()}
    assert ranged == {"models/a.bin", "models/b.bin"} | ({LONG} if fmt != tarfile.USTAR_FORMAT else set())
    small = [e for e in index.entries if e.inline and e.member.isreg()]
    assert {e.member.name: index.data(e) for e in small}["models/config.json"] == b'{"x": 1}'


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_rows_are_those_of_unpacking(tmp_path: Path, fmt: int) -> None:
    """The same Listing over walked members gives unpack_layer's rows (hardlinks, whiteouts, symlinks)."""
    data = make_tar(_entries(fmt), fmt=fmt)
    layer = tmp_path / "layer.tar"
    layer.write_bytes(data)
    content = ContentStore(tmp_path / "store")
    unpacked = unpack_layer(content, layer, Compression.NONE, name="l")
    index = walk_bytes(data)
    listing = Listing("l", None)
    for e in index.entries:
        body = index.data(e) if e.inline else data[e.offset:e.offset + e.member.size]
        listing.add(e.member, lambda body=body: content.write_stream(io.BytesIO(body), expected_size=len(body)))
    assert listing.rows == unpacked
    assert ["f", "models/hard", *next(r[2:] for r in unpacked if r[1] == "models/a.bin")] in unpacked


def test_listing_refuses_as_unpacking_does() -> None:
    """The shared Listing keeps the refusals: escaping paths, dangling hardlinks, devices, the size limit."""
    from modelcache.errors import InvalidContent, UnsafePath

    def member(name: str, type_: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
        m = tarfile.TarInfo(name)
        m.type, m.size, m.linkname = type_, size, link
        return m

    def write() -> tuple[str, int]:
        return "sha256:" + "0" * 64, 0

    for bad in (member("../x"), member("a", tarfile.LNKTYPE, link="nowhere"), member("dev", tarfile.CHRTYPE),
                member("s", tarfile.SYMTYPE, link="../../etc/passwd")):
        with pytest.raises(UnsafePath):
            Listing("l", None).add(bad, write)
    listing = Listing("l", 10)
    listing.add(member("a", size=6), write)
    with pytest.raises(InvalidContent, match="add up to more than 10 bytes"):
        listing.add(member("b", size=6), write)


def test_no_end_blocks_nor_padding() -> None:
    """A layer cut right after its last file's bytes (as umoci sometimes writes it) walks to its end."""
    data = make_tar([("a.bin", BIG, {}), ("b.txt", b"tail", {})], fmt=tarfile.PAX_FORMAT)
    end = next(e.offset + e.member.size for e in walk_bytes(data).entries if e.member.name == "b.txt")
    for cut in (data[:end], data[:-(-end // BLOCK) * BLOCK]):  # no padding; padding but no end blocks
        index = walk_bytes(cut)
        assert [e.member.name for e in index.entries] == ["a.bin", "b.txt"]
        assert _tiles(index, cut) == cut
        assert index.data(index.entries[1]) == b"tail"


def test_small_members_are_batched_big_ones_cost_one_read() -> None:
    """Runs of small members come in a few growing windows; each big file costs about one read."""
    small = [(f"s/{n:04d}.txt", _rnd.randbytes(_rnd.randrange(2000)), {}) for n in range(300)]
    index = walk_bytes(make_tar(small, fmt=tarfile.PAX_FORMAT), limits=(100, 1000))
    assert len(index.entries) == 300 and not index.ranged()
    assert index.requests <= 10, index.requests
    bigs = [(f"w/{n}.bin", _rnd.randbytes(INLINE_MAX + n), {}) for n in range(1, 9)]
    index = walk_bytes(make_tar(bigs, fmt=tarfile.PAX_FORMAT))
    assert len(index.ranged()) == 8 and index.requests <= 9, index.requests
    # What was read besides the files: pax headers, headers and padding, about a window each.
    assert sum(len(s) for _, s in index.segments) < 8 * 20 << 10


def test_thousands_of_tiny_files_are_not_walked() -> None:
    """Past 64 members averaging under 1 MiB, the walk gives up: such a layer is read as one stream."""
    tiny = [(f"t/{n}", b"x" * 10, {}) for n in range(2000)]
    data = make_tar(tiny, fmt=tarfile.GNU_FORMAT)
    assert budget(len(data))[1] == 64
    with pytest.raises(Unwalkable, match="more than 64 members"):
        walk_bytes(data)
    with pytest.raises(Unwalkable, match="header reads"):
        walk_bytes(make_tar([(f"w/{n}", BIG, {}) for n in range(20)]), limits=(10, 1000))


def _patched(data: bytes, at: int, field: slice, value: bytes) -> bytes:
    """``data`` with one header field replaced, its checksum made right again (ustar spec)."""
    block = bytearray(data[at:at + BLOCK])
    block[field] = value
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return data[:at] + bytes(block) + data[at + BLOCK:]


def test_base256_size_and_unusual_headers() -> None:
    """GNU base-256 sizes are read; bad checksums, sparse files and an empty archive are not walked."""
    data = make_tar([("a.bin", BIG, {})], fmt=tarfile.GNU_FORMAT)
    big = _patched(data, 0, slice(124, 136), b"\x80" + len(BIG).to_bytes(11, "big"))
    assert walk_bytes(big).entries[0].member.size == len(BIG)
    corrupt = data[:10] + bytes([data[10] ^ 1]) + data[11:]
    with pytest.raises(Unwalkable, match="checksum"):
        walk_bytes(corrupt)
    with pytest.raises(Unwalkable, match="sparse"):
        walk_bytes(_patched(data, 0, slice(156, 157), tarfile.GNUTYPE_SPARSE))
    with pytest.raises(Unwalkable):
        walk_bytes(bytes(10240))
    with pytest.raises(Unwalkable, match="past the layer's end"):
        walk_bytes(data[:BLOCK + 1000])


def test_pax_global_header_applies_to_what_follows() -> None:
    """A pax global header's size and path apply to later members unless a member's own header overrides."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "g"}) as tar:
        for name in ("x/a", "x/b"):
            info = tarfile.TarInfo(name)
            info.size = len(BIG)
            tar.addfile(info, io.BytesIO(BIG))
    data = buf.getvalue()
    index = walk_bytes(data)
    assert [e.member.name for e in index.entries] == ["x/a", "x/b"]
    assert _tiles(index, data) == data


def test_random_layers_tile_exactly() -> None:
    """Random mixes of sizes and formats: members match tarfile's, and the pieces rebuild the layer."""
    rnd = random.Random(7)
    for _ in range(12):
        fmt = rnd.choice([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
        entries = [(f"d{n}/" + "p" * rnd.randrange(1, 90), os.urandom(rnd.choice([0, 1, 511, 512, 513, 40_000,
                    INLINE_MAX, INLINE_MAX + 1, 700_000])), {}) for n in range(rnd.randrange(1, 12))]
        data = make_tar(entries, fmt=fmt)
        index = walk_bytes(data)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert [m.offset_data for m in tar.getmembers()] == [e.offset for e in index.entries]
        assert _tiles(index, data) == data
