"""The pure tree rules: safe paths and link targets, include/exclude globs, layer overlay."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from modelcache.errors import InvalidReference, UnsafePath
from modelcache.tree import Filters, Node, check_links, overlay, safe_link_target, safe_path


def file(path: str, digest: str = "d") -> Node:
    """A file node (the digest only tells layers apart here)."""
    return Node(path, "file", digest=digest)


# -- safe_path -------------------------------------------------------------------

@pytest.mark.parametrize("raw,expected", [
    ("a", "a"),
    ("a/b/c.bin", "a/b/c.bin"),
    ("/etc/x", "etc/x"),
    ("///abs", "abs"),
    ("./a", "a"),
    ("./a//b/", "a/b"),
    ("a/./b/.", "a/b"),
    ("a/../b", "b"),
    ("a/b/../../c", "c"),
    ("a/./b/../c", "a/c"),
    ("...", "..."),
    ("..a/b..", "..a/b.."),
    ("dir with space/ü.bin", "dir with space/ü.bin"),
])
def test_safe_path_normalises(raw: str, expected: str) -> None:
    """Leading '/', './', '//' and inner '..' that stays inside are normalised away."""
    assert safe_path(raw, context="t") == expected


@pytest.mark.parametrize("raw,message", [
    ("..", "escapes"),
    ("../x", "escapes"),
    ("/../x", "escapes"),
    ("./../x", "escapes"),
    ("a/../../b", "escapes"),
    ("a/b/../../../c", "escapes"),
    ("a/../..", "escapes"),
    ("a\x00b", "NUL"),
    ("", "empty path"),
    (".", "empty path"),
    ("/", "empty path"),
    ("./", "empty path"),
    ("a/..", "empty path"),
])
def test_safe_path_refuses(raw: str, message: str) -> None:
    """Escaping, empty and NUL-bearing paths raise UnsafePath naming the context."""
    with pytest.raises(UnsafePath, match=f"^layer L: .*{message}"):
        safe_path(raw, context="layer L")


_COMPONENTS = st.sampled_from(["a", "b", ".", "..", "", "...", ".a"])


@given(st.one_of(
    st.lists(_COMPONENTS, max_size=12).map("/".join),
    st.text(alphabet="ab./\x00", max_size=30),
))
@example("a/../../b")
@example("//..//a")
def test_safe_path_never_escapes(raw: str) -> None:
    """Whatever comes in, what comes out is relative, normal, inside the root and a fixed point."""
    try:
        out = safe_path(raw, context="t")
    except UnsafePath:
        return
    parts = out.split("/")
    assert not out.startswith("/")
    assert ".." not in parts and "." not in parts and "" not in parts
    assert posixpath.normpath(posixpath.join("/root", out)).startswith("/root/")
    assert safe_path(out, context="t") == out


# -- safe_link_target --------------------------------------------------------------

@pytest.mark.parametrize("link,target,expected", [
    ("a/b/link", "c", "c"),
    ("a/b/link", "../c", "../c"),
    ("a/b/link", "../../c", "../../c"),
    ("a/link", "..", ".."),
    ("a/link", "./x", "./x"),
    ("a/b/link", "/x/y", "../../x/y"),
    ("link", "/x", "x"),
    ("a/link", "/a/f", "f"),
    ("a/link", "/a/../b", "../b"),
    ("models/sub/l", "/models/w.bin", "../w.bin"),
])
def test_link_target_inside(link: str, target: str, expected: str) -> None:
    """Relative targets inside are kept verbatim; absolute ones become relative to the link."""
    assert safe_link_target(link, target, context="t") == expected
    assert posixpath.normpath(posixpath.join("/root", posixpath.dirname(link), expected)).startswith("/root")


@pytest.mark.parametrize("link,target", [
    ("link", "../x"),
    ("link", ".."),
    ("a/link", "../../x"),
    ("a/link", "b/../../../x"),
    ("link", "a/../../x"),
    ("a/b/link", "/../x"),
    ("a/link", "/.."),
])
def test_link_target_escaping(link: str, target: str) -> None:
    """A target that climbs out of the root, relative or absolute, is refused."""
    with pytest.raises(UnsafePath, match="points outside the model"):
        safe_link_target(link, target, context="t")


def test_link_target_empty() -> None:
    """An empty target names nothing (and cannot be created as a symlink)."""
    with pytest.raises(UnsafePath, match="empty"):
        safe_link_target("a/link", "", context="t")


# -- check_links: links judged against the whole tree --------------------------------

@pytest.mark.parametrize("links,paths", [
    ({"a/l": "..", "x": "a/l/../.."}, ["a/l", "x"]),
    ({"a/b/l": "../..", "x": "a/b/l/../../.."}, ["a/b/l", "x"]),
    ({"up": "..", "x": "up"}, ["up", "x"]),
    ({"l1": "l2", "l2": "l1"}, ["l1", "l2"]),
])
def test_links_escaping_through_other_links(links: dict[str, str], paths: list[str]) -> None:
    """Each target is fine on its own text, but through another link it leaves the root (or loops)."""
    with pytest.raises(UnsafePath):
        check_links(links, paths, context="t")


def test_entries_below_a_symlink_are_refused() -> None:
    """Writing x/f where x is a symlink would write wherever x points: refused."""
    with pytest.raises(UnsafePath, match="below the symlink 'x'"):
        check_links({"x": "d"}, ["d/g", "x", "x/f"], context="t")


def test_links_that_stay_inside() -> None:
    """Chains of links that resolve inside the root, and dangling ones, are fine."""
    links = {"current": "v2", "model.bin": "current/w.bin", "a/up": "..", "a/top": "up/model.bin",
             "dangling": "nowhere/x"}
    check_links(links, ["v2/w.bin", *links], context="t")


# -- Filters ------------------------------------------------------------------------

PATHS = ["config.json", "tokenizer.json", "tok/vocab.txt", "tok/sub/merges.txt", "tokenizer/x",
         "weights/model-00001.safetensors", "weights/model.bin", "README.md"]


@pytest.mark.parametrize("include,exclude,selected", [
    ((), (), PATHS),
    (("*.json",), (), ["config.json", "tokenizer.json"]),
    (("*.txt",), (), ["tok/vocab.txt", "tok/sub/merges.txt"]),
    (("tok",), (), ["tok/vocab.txt", "tok/sub/merges.txt"]),
    (("tok/",), (), ["tok/vocab.txt", "tok/sub/merges.txt"]),
    (("/tok/",), (), ["tok/vocab.txt", "tok/sub/merges.txt"]),
    (("tok*",), (), ["tokenizer.json", "tok/vocab.txt", "tok/sub/merges.txt", "tokenizer/x"]),
    (("weights/*.safetensors", "*.json"), (), ["config.json", "tokenizer.json",
                                               "weights/model-00001.safetensors"]),
    ((), ("weights",), ["config.json", "tokenizer.json", "tok/vocab.txt", "tok/sub/merges.txt",
                        "tokenizer/x", "README.md"]),
    (("*.json", "tok/"), ("tokenizer.json", "*/sub/*"), ["config.json", "tok/vocab.txt"]),
    (("*.json",), ("*",), []),
])
def test_filters_select(include: tuple[str, ...], exclude: tuple[str, ...], selected: list[str]) -> None:
    """include narrows (any match), exclude removes (wins); 'dir' and 'dir/' select a subtree."""
    f = Filters.of(include, exclude)
    assert [p for p in PATHS if f.match(p)] == selected


def test_filters_key_is_stable() -> None:
    """The key ignores pattern order, tells include from exclude, and is empty without filters."""
    assert Filters().key() == Filters.of([], []).key() == ""
    assert Filters.of(["b", "a"], ["y", "x"]).key() == Filters.of(["a", "b"], ["x", "y"]).key()
    assert Filters.of(["a"]).key() != Filters.of([], ["a"]).key()
    assert Filters.of(["a"]).key() != Filters.of(["a"], ["b"]).key()
    assert Filters.of(["a"]).key() == Filters.of(["a"]).key() != ""


@pytest.mark.parametrize("include,exclude", [([""], []), ([], ["  "]), (["ok", ""], [])])
def test_filters_refuse_empty_patterns(include: list[str], exclude: list[str]) -> None:
    """An empty glob is a user error (it would select nothing or everything)."""
    with pytest.raises(InvalidReference, match="empty --include/--exclude"):
        Filters.of(include, exclude)


# -- overlay ------------------------------------------------------------------------

def test_overlay_upper_layer_wins() -> None:
    """The same path in a later layer replaces the earlier node."""
    tree = overlay([[file("a", "1"), file("b", "1")], [file("a", "2")]])
    assert {p: n.digest for p, n in tree.items()} == {"a": "2", "b": "1"}


def test_overlay_file_replaces_directory() -> None:
    """A file where a lower layer had a directory hides everything below it."""
    lower = [Node("d", "dir"), file("d/x"), file("d/sub/y"), file("dx")]
    tree = overlay([lower, [file("d", "new")]])
    assert sorted(tree) == ["d", "dx"] and tree["d"].kind == "file"


def test_overlay_directory_merges() -> None:
    """A directory in an upper layer merges with the lower one instead of hiding it."""
    tree = overlay([[Node("d", "dir"), file("d/x")], [Node("d", "dir"), file("d/y")]])
    assert sorted(tree) == ["d", "d/x", "d/y"]


def test_overlay_whiteout() -> None:
    """A whiteout hides the path and everything below it, and nothing else."""
    lower = [file("a"), file("ab"), Node("d", "dir"), file("d/x"), file("e/y")]
    tree = overlay([lower, [("whiteout", "d"), ("whiteout", "a"), ("whiteout", "missing")]])
    assert sorted(tree) == ["ab", "e/y"]


def test_overlay_opaque_hides_lower_layers_only() -> None:
    """An opaque dir hides lower content below it, keeps the dir, and keeps the same layer's entries."""
    lower = [Node("d", "dir"), file("d/a"), file("d/sub/b"), file("dd/c")]
    upper = [file("d/new"), ("opaque", "d"), Node("d/sub", "dir")]
    tree = overlay([lower, upper])
    assert sorted(tree) == ["d", "d/new", "d/sub", "dd/c"]


def test_overlay_whiteout_does_not_hide_same_layer() -> None:
    """A whiteout in a layer applies to lower layers, not to entries of its own layer."""
    tree = overlay([[file("w", "1")], [file("w", "2"), ("whiteout", "w")]])
    assert tree["w"].digest == "2"


def test_overlay_opaque_root_and_later_layers() -> None:
    """An opaque root hides every lower layer; layers above it apply normally."""
    tree = overlay([[file("a"), file("b/c")], [("opaque", ""), file("x")], [file("y")]])
    assert sorted(tree) == ["x", "y"]


def _overlay_by_scanning(layers: list[list[Node | tuple[str, str]]]) -> dict[str, Node]:
    """The overlay rules written the obvious way (every removal scans the whole tree): the reference."""
    tree: dict[str, Node] = {}

    def drop_below(path: str) -> None:
        prefix = path + "/" if path else ""
        for key in [k for k in tree if k.startswith(prefix)]:
            del tree[key]

    for layer in layers:
        for item in layer:
            if isinstance(item, tuple):
                if item[0] == "whiteout":
                    tree.pop(item[1], None)
                drop_below(item[1])
        for item in layer:
            if isinstance(item, Node):
                if item.kind != "dir":
                    drop_below(item.path)
                parent = posixpath.dirname(item.path)
                while parent:
                    if parent in tree and tree[parent].kind != "dir":
                        del tree[parent]
                    parent = posixpath.dirname(parent)
                tree[item.path] = item
    return tree


_PATHS = st.sampled_from(["a", "b", "a/b", "a/c", "a/b/c", "a/b/d", "ab", "ab/c", "b/a", "b/a/c"])
_ITEMS = st.one_of(
    st.builds(lambda p, d: Node(p, "file", digest=d), _PATHS, st.sampled_from("12")),
    st.builds(lambda p: Node(p, "dir"), _PATHS),
    st.builds(lambda p: Node(p, "symlink", target="x"), _PATHS),
    st.tuples(st.just("whiteout"), _PATHS),
    st.tuples(st.just("opaque"), st.one_of(st.just(""), _PATHS)),
)


@given(st.lists(st.lists(_ITEMS, max_size=8), max_size=4))
def test_overlay_matches_the_scanning_rules(layers: list[list[Node | tuple[str, str]]]) -> None:
    """The indexed overlay gives the same tree, in the same order, as scanning for every removal."""
    assert list(overlay(layers).items()) == list(_overlay_by_scanning(layers).items())


def test_overlay_of_many_files_is_linear() -> None:
    """20,000 files under 10,000 more overlay in a moment, not in minutes (it runs on every pull).

    Scanning the tree for every file took 2.5 s for 3,000 files here and grows
    with the square; the bound is generous for a shared machine.
    """
    import time

    lower = [file(f"d{n // 100}/f{n}", "1") for n in range(20_000)]
    upper = [file(f"d{n // 100}/f{n}", "2") for n in range(0, 20_000, 2)] + [("whiteout", "d7")]
    started = time.monotonic()
    tree = overlay([lower, upper])
    assert time.monotonic() - started < 10
    # The whiteout hides the lower layer's d7 (100 files), not the 50 its own layer puts there.
    assert len(tree) == 20_000 - 50 and tree["d0/f0"].digest == "2" and tree["d0/f1"].digest == "1"
    assert "d7/f700" in tree and "d7/f701" not in tree


def test_filter_keys_never_collide() -> None:
    """Distinct filters have distinct keys (they name cached views and single-flight pull jobs)."""
    cases = [Filters.of(["a,b"]), Filters.of(["a", "b"]), Filters.of(["a;exc=b"]), Filters.of(["a"], ["b"]),
             Filters.of(["a\\"], ["b"]), Filters.of(["a\\,b"]), Filters.of([], ["a,b"]), Filters()]
    assert len({f.key() for f in cases}) == len(cases)
    assert Filters.of(["b", "a"]).key() == Filters.of(["a", "b"]).key() == "inc=a,b;exc="
