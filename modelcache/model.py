"""The Model: the one currency every part of modelcache passes around.

A source resolves a reference to a :class:`Model`: an immutable description of
what to fetch. Content comes in two shapes:

- :class:`FileEntry`: a file stored verbatim; its bytes are one blob whose
  sha256 is known before the fetch (ModelPack ``.raw`` layers, ORAS files,
  files of a local directory);
- :class:`Archive`: a tar layer (plain, gzip or zstd) whose files are only
  known once it has been fetched and unpacked (image layers, ModelPack tar
  layers).

Both point at a :class:`Blob`: the digest and size of the bytes at the origin,
which is all the transfer engine and the store need.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class PieceDigests:
    """The sha256 (hex) of each ``length``-byte piece of a blob, as its origin lists them."""

    length: int
    digests: tuple[str, ...]


class S3Checksum(NamedTuple):
    """A CRC checksum S3 keeps of an object (``x-amz-checksum-<algorithm>``, as S3 writes it)."""

    algorithm: str  # "crc32", "crc32c" or "crc64nvme"
    part_size: int  # 0: of the whole object; else composite over parts of this size
    value: str  # base64 of the big-endian CRC, then "-<parts>" if composite


@dataclass(frozen=True, slots=True)
class Blob:
    """Bytes at an origin, named by their sha256 digest (``sha256:<hex>``).

    Some origins (S3 objects, small files in a Hub repository) do not tell a
    file's sha256 before it is read. Such a blob has ``verified=False``: its
    ``digest`` is a stand-in derived from the origin's own identity of the
    bytes (bucket, key and ETag, say) that only names the download in
    progress; the real sha256 is learnt on the way in and the blob is stored
    under it. ``md5``, when the origin gives one (a plain S3 ETag), is
    checked too, as is ``git_sha1``, the git blob id the Hub lists for a
    file kept in git (sha1 of ``"blob <size>\\0"`` and the bytes), and
    ``md5_parts``, an S3 multipart ETag with the part size that cuts it
    (:mod:`modelcache.store.etag`). Each is a check of the whole blob given
    by the origin: with one, an unverified blob may be taken from peers too
    (:attr:`origin_checked`). ``crc``, a CRC checksum S3 keeps of the object
    (:class:`S3Checksum`: CRC32, CRC32C or CRC64NVME; whole, or composite
    over parts of the size given), is a cheaper check of bytes from the
    origin alone (a quarter of an MD5's cost for CRC32, a sixteenth for the
    other two), taken instead of the MD5s there; anyone can forge bytes to a
    CRC, so it never admits a peer's (:func:`modelcache.store.etag.checks_for`).

    ``pieces``, when the origin's manifest lists them (``modelcache
    package`` records them), is the sha256 of each piece peers exchange
    (:mod:`modelcache.p2p.pieces`): a peer's bytes are checked against it
    piece by piece as they arrive.
    """

    digest: str
    size: int
    media_type: str = "application/octet-stream"
    verified: bool = True
    md5: str | None = None
    git_sha1: str | None = None
    md5_parts: tuple[int, str] | None = None  # (part size, multipart ETag "<hex>-<parts>")
    crc: S3Checksum | None = None
    pieces: PieceDigests | None = field(default=None, compare=False, repr=False)

    @property
    def hex(self) -> str:
        """The hex part of the digest, the blob's name in the store."""
        return self.digest.partition(":")[2]

    @property
    def origin_checked(self) -> bool:
        """True when the origin gave a check of the whole blob that a forger cannot meet: its sha256, else an
        MD5, ETag or git blob id (a CRC32 is not one)."""
        return self.verified or bool(self.md5 or self.git_sha1 or self.md5_parts)


def standin_digest(source_key: str) -> str:
    """The stand-in digest of bytes an origin names ``source_key`` (sha256 not known yet): every node's the same."""
    return "sha256:" + hashlib.sha256(source_key.encode()).hexdigest()


class Compression(StrEnum):
    """How an archive layer is compressed."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A file of the model stored verbatim as one blob.

    ``blob`` names the file's own bytes (its sha256). When those bytes sit
    inside a larger blob at the origin (a single-file tar layer), ``origin``
    is that blob and ``offset`` where the file's bytes start in it.
    """

    path: str
    blob: Blob
    origin: Blob | None = None
    offset: int = 0
    source_key: str | None = None  # the origin's own name for these bytes (for unverified blobs)


@dataclass(frozen=True, slots=True)
class Archive:
    """A tar layer unpacked under ``prefix`` (``""`` for the model's root)."""

    blob: Blob
    compression: Compression
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class Model:
    """What a reference resolved to: parts applied in order, like image layers.

    ``digest`` identifies the resolved content at its source (the manifest
    digest for OCI, a digest of the file list for a local directory).
    """

    ref: str
    digest: str
    parts: tuple[FileEntry | Archive, ...]
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def blobs(self) -> list[Blob]:
        """Every distinct blob the model needs, in order of first use."""
        seen: dict[str, Blob] = {}
        for part in self.parts:
            seen.setdefault(part.blob.digest, part.blob)
        return list(seen.values())

    @property
    def size(self) -> int:
        """Bytes to fetch from the origin if nothing were cached."""
        return sum(b.size for b in self.blobs)
