"""Reference parsing and the pure tree rules: safe paths, links, globs, overlay."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelcache.errors import InvalidReference, UnsafePath
from modelcache.refs import DirRef, LayoutRef, OciRef, parse
from modelcache.tree import Filters, Node, overlay, safe_link_target, safe_path


@pytest.mark.parametrize("text,expected", [
    ("oci://reg.io/models/llama:v1", OciRef("reg.io", "models/llama", tag="v1")),
    ("oci://127.0.0.1:5000/a/b/c", OciRef("127.0.0.1:5000", "a/b/c")),
    ("oci://[::1]:5000/m@sha256:" + "a" * 64, OciRef("[::1]:5000", "m", digest="sha256:" + "a" * 64)),
    ("oci://localhost/m:1.0_rc-2", OciRef("localhost", "m", tag="1.0_rc-2")),
])
def test_oci_references(text: str, expected: OciRef) -> None:
    """Registry references split into host, repository, tag or digest (tag defaults to latest)."""
    assert parse(text) == expected
    assert parse(text).reference == (expected.digest or expected.tag or "latest")


def test_loopback_detection() -> None:
    """Loopback registries get plain HTTP by default; nothing else does."""
    assert all(parse(f"oci://{h}/m").is_loopback() for h in ("localhost", "127.0.0.1:5000", "127.3.2.1", "[::1]:1"))
    assert not any(parse(f"oci://{h}/m").is_loopback() for h in ("10.0.0.1", "reg.io", "localhost.example.com"))


def test_local_references(tmp_path: Path) -> None:
    """Directories, layouts (with :TAG), file:// and oci-layout:// forms."""
    plain = tmp_path / "plain"
    plain.mkdir()
    layout = tmp_path / "layout"
    layout.mkdir()
    (layout / "oci-layout").write_text("{}")
    assert parse(str(plain)) == DirRef(plain)
    assert parse(f"file://{plain}") == DirRef(plain)
    assert parse(str(layout)) == LayoutRef(layout)
    assert parse(f"{layout}:v2") == LayoutRef(layout, tag="v2")
    assert parse(f"oci-layout://{layout}:v2") == LayoutRef(layout, tag="v2")
    assert parse(f"oci-layout://{layout}@sha256:{'b' * 64}") == LayoutRef(layout, digest="sha256:" + "b" * 64)


@pytest.mark.parametrize("text", ["", "ftp://x/y", "oci://", "oci://h", "oci://h/UP", "oci://h/r:t t",
                                  "oci://h/r@md5:x", "oci://bad host/r", "/definitely/not/here"])
def test_rejected_references(text: str) -> None:
    """Each malformed reference raises InvalidReference."""
    with pytest.raises(InvalidReference):
        parse(text)


def test_file_is_not_a_directory(tmp_path: Path) -> None:
    """A regular file is not a model directory."""
    (tmp_path / "f").write_text("x")
    with pytest.raises(InvalidReference, match="not a directory"):
        parse(str(tmp_path / "f"))


@pytest.mark.parametrize("raw,expected", [("a/b", "a/b"), ("/etc/x", "etc/x"), ("./a//b/", "a/b"),
                                          ("a/../b", "b"), ("a/./b/../c", "a/c")])
def test_safe_path_normalises(raw: str, expected: str) -> None:
    """Paths are made relative and normal."""
    assert safe_path(raw, context="t") == expected


@pytest.mark.parametrize("raw", ["..", "../x", "a/../../x", "/../x", "a\x00b", ".", "/"])
def test_safe_path_refuses(raw: str) -> None:
    """Escaping, empty and NUL-bearing paths are refused."""
    with pytest.raises(UnsafePath):
        safe_path(raw, context="t")


@given(st.text(alphabet="ab./", max_size=30))
def test_safe_path_never_escapes(raw: str) -> None:
    """Whatever comes in, what comes out is relative, has no '..', and is a fixed point."""
    try:
        out = safe_path(raw, context="t")
    except UnsafePath:
        return
    assert not out.startswith("/") and ".." not in out.split("/")
    assert safe_path(out, context="t") == out


def test_link_targets() -> None:
    """Relative targets inside stay, absolute ones become relative, escaping ones are refused."""
    assert safe_link_target("a/b/link", "../c", context="t") == "../c"
    assert safe_link_target("a/b/link", "/x/y", context="t") == "../../x/y"
    assert safe_link_target("link", "/x", context="t") == "x"
    for target in ("../x", "a/../../x"):
        with pytest.raises(UnsafePath):
            safe_link_target("link", target, context="t")


def test_filters() -> None:
    """include narrows, exclude removes, 'dir/' selects a directory, * crosses '/'."""
    f = Filters.of(["*.json", "tok/"], ["config.json"])
    assert [p for p in ("a.json", "x/b.json", "config.json", "tok/v.txt", "w.bin") if f.match(p)] == \
        ["a.json", "x/b.json", "tok/v.txt"]
    assert Filters().match("anything") and Filters().key() == ""
    assert Filters.of(["b", "a"]).key() == Filters.of(["a", "b"]).key()
    with pytest.raises(InvalidReference):
        Filters.of([" "])


def test_overlay_rules() -> None:
    """Whiteouts hide lower layers only; a file replaces a directory."""
    lower = [Node("d/a", "file", "1"), Node("d/b", "file", "2"), Node("e/x", "file", "3"), Node("f/y", "file", "4")]
    upper = [("opaque", "d"), Node("d/c", "file", "5"), ("whiteout", "e"), Node("f", "file", "6")]
    assert sorted(overlay([lower, upper])) == ["d/c", "f"]
