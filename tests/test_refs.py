"""refs.parse: every accepted reference form, and a useful error for each rejected one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from modelcache.errors import InvalidReference, NotFound
from modelcache.refs import DirRef, HfRef, LayoutRef, OciRef, S3Ref, parse

HEX = "0123456789abcdef" * 4
DIGEST = "sha256:" + HEX


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """An OCI image layout directory (recognised by its oci-layout file)."""
    path = tmp_path / "layout"
    path.mkdir()
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return path


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    """A plain directory of model files."""
    path = tmp_path / "plain"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("text,host,repository,tag,digest", [
    ("oci://reg.io/m", "reg.io", "m", None, None),
    ("oci://reg.io/m:v1", "reg.io", "m", "v1", None),
    ("oci://reg.io:5000/org/team/model:1.0_rc-2", "reg.io:5000", "org/team/model", "1.0_rc-2", None),
    ("oci://127.0.0.1:5000/a/b/c@" + DIGEST, "127.0.0.1:5000", "a/b/c", None, DIGEST),
    ("oci://[::1]:5000/models/tiny:v1", "[::1]:5000", "models/tiny", "v1", None),
    ("oci://[::1]/m@" + DIGEST, "[::1]", "m", None, DIGEST),
    ("oci://localhost/my_model.x__y--z", "localhost", "my_model.x__y--z", None, None),
    ("oci://reg.io/m:" + "T" * 128, "reg.io", "m", "T" * 128, None),
    ("  oci://reg.io/m:v1\n", "reg.io", "m", "v1", None),
    # docker's pinned form: the digest decides, the tag is dropped (the canonical form is @digest)
    ("oci://reg.io:5000/org/m:v1@" + DIGEST, "reg.io:5000", "org/m", None, DIGEST),
])
def test_oci_references(text: str, host: str, repository: str, tag: str | None, digest: str | None) -> None:
    """oci:// splits into host (with port or IPv6 brackets), nested repository, tag or digest."""
    assert parse(text) == OciRef(host=host, repository=repository, tag=tag, digest=digest)


@pytest.mark.parametrize("text,reference,canonical", [
    ("oci://reg.io/m", "latest", "oci://reg.io/m:latest"),
    ("oci://reg.io/m:v1", "v1", "oci://reg.io/m:v1"),
    (f"oci://reg.io/m@{DIGEST}", DIGEST, f"oci://reg.io/m@{DIGEST}"),
])
def test_oci_reference_defaults_to_latest(text: str, reference: str, canonical: str) -> None:
    """Without tag or digest the manifest asked for is 'latest', as Docker does."""
    ref = parse(text)
    assert isinstance(ref, OciRef)
    assert ref.reference == reference
    assert str(ref) == canonical
    assert parse(str(ref)).reference == reference


@pytest.mark.parametrize("host,hostname,loopback", [
    ("localhost", "localhost", True),
    ("localhost:5000", "localhost", True),
    ("registry.localhost:80", "registry.localhost", True),
    ("127.0.0.1:5000", "127.0.0.1", True),
    ("127.8.9.10", "127.8.9.10", True),
    ("[::1]:5000", "::1", True),
    ("[::1]", "::1", True),
    ("10.0.0.1:5000", "10.0.0.1", False),
    ("128.0.0.1", "128.0.0.1", False),
    ("[::2]:5000", "::2", False),
    ("reg.io", "reg.io", False),
    ("localhost.example.com", "localhost.example.com", False),
    ("127.0.0.1.nip.io", "127.0.0.1.nip.io", False),
])
def test_is_loopback(host: str, hostname: str, loopback: bool) -> None:
    """Only localhost, 127.0.0.0/8 and ::1 are loopback (plain HTTP by default)."""
    ref = parse(f"oci://{host}/m")
    assert isinstance(ref, OciRef)
    assert ref.hostname == hostname
    assert ref.is_loopback() is loopback


def test_layout_references(layout: Path) -> None:
    """A layout directory by plain path, file://, oci-layout:// and DIR:TAG (skopeo's spelling)."""
    assert parse(str(layout)) == LayoutRef(layout)
    assert parse(f"file://{layout}") == LayoutRef(layout)
    assert parse(f"{layout}:v2") == LayoutRef(layout, tag="v2")
    assert parse(f"file://{layout}:v2") == LayoutRef(layout, tag="v2")
    assert parse(f"oci-layout://{layout}") == LayoutRef(layout)
    assert parse(f"oci-layout://{layout}:v2") == LayoutRef(layout, tag="v2")
    assert parse(f"oci-layout://{layout}@{DIGEST}") == LayoutRef(layout, digest=DIGEST)


def test_layout_path_with_a_colon_is_a_path(tmp_path: Path) -> None:
    """A layout directory whose own name holds ':' is not split into DIR:TAG."""
    odd = tmp_path / "model:v1"
    odd.mkdir()
    (odd / "oci-layout").write_text("{}")
    assert parse(f"oci-layout://{odd}") == LayoutRef(odd)
    assert parse(str(odd)) == LayoutRef(odd)


def test_directory_references(plain: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain directory by path, file:// (percent-decoded) or relative path, made absolute."""
    assert parse(str(plain)) == DirRef(plain)
    assert parse(f"file://{plain}") == DirRef(plain)
    spaced = plain.parent / "with space"
    spaced.mkdir()
    assert parse(f"file://{str(spaced).replace(' ', '%20')}") == DirRef(spaced)
    monkeypatch.chdir(plain.parent)
    ref = parse("plain")
    assert ref == DirRef(plain) and ref.path.is_absolute()


@pytest.mark.parametrize("text,message", [
    ("", "empty model reference"),
    ("   ", "empty model reference"),
    ("ftp://reg.io/m", "unsupported reference scheme 'ftp'"),
    ("https://reg.io/v2/m/manifests/v1", "unsupported reference scheme 'https'"),
    ("docker://reg.io/m:v1", "use oci://"),
    ("oci://", "expected oci://HOST"),
    ("oci://reg.io", "expected oci://HOST"),
    ("oci://reg.io/", "expected oci://HOST"),
    ("oci:///m", "expected oci://HOST"),
    ("oci://bad host/m", "invalid registry host 'bad host'"),
    ("oci://reg.io/Models/m", "invalid repository name 'Models/m'"),
    ("oci://reg.io/m//n", "invalid repository name"),
    ("oci://reg.io/m-:v1", "invalid repository name 'm-'"),
    ("oci://reg.io/m:", "invalid tag ''"),
    ("oci://reg.io/m:v 1", "invalid tag 'v 1'"),
    ("oci://reg.io/m:v!1", "invalid tag 'v!1'"),
    ("oci://reg.io/m:.hidden", "invalid tag '.hidden'"),
    ("oci://reg.io/m:-x", "invalid tag '-x'"),
    ("oci://reg.io/m:" + "t" * 129, "invalid tag"),
    ("oci://reg.io/m@sha256:abc", "invalid digest 'sha256:abc'"),
    ("oci://reg.io/m:bad!tag@" + DIGEST, "invalid tag"),
    ("oci://reg.io/m@md5:" + HEX[:32], "invalid digest"),
    ("oci://reg.io/m@sha256:" + HEX.upper(), "invalid digest"),
    ("oci://reg.io/m@", "invalid digest ''"),
    ("oci-layout:///tmp/l@sha256:zz", "invalid digest"),
])
def test_rejected_references(text: str, message: str) -> None:
    """Each malformed reference raises InvalidReference saying what is wrong."""
    with pytest.raises(InvalidReference, match=re.escape(message)) as info:
        parse(text)
    assert "\n" not in str(info.value)


def test_layout_bad_tag(layout: Path) -> None:
    """DIR:TAG and oci-layout://DIR:TAG check the tag's syntax."""
    for text in (f"{layout}:bad tag", f"oci-layout://{layout}:bad!tag"):
        with pytest.raises(InvalidReference, match="invalid tag"):
            parse(text)


def test_tag_on_a_plain_directory_is_refused(plain: Path) -> None:
    """DIR:TAG is only meaningful for a layout; for a plain directory it names nothing."""
    with pytest.raises(InvalidReference, match="is not an OCI image layout"):
        parse(f"{plain}:v1")


def test_file_is_not_a_directory(tmp_path: Path) -> None:
    """A regular file, by path or file://, is not a model."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 8)
    for text in (str(weights), f"file://{weights}"):
        with pytest.raises(InvalidReference, match="not a directory"):
            parse(text)


def test_invalid_reference_is_a_value_error() -> None:
    """Generic handlers still catch it, and the CLI maps it to exit code 2."""
    with pytest.raises(ValueError) as info:
        parse("oci://reg.io/UPPER")
    assert info.value.exit_code == 2  # type: ignore[attr-defined]



@pytest.mark.parametrize("text,expected", [
    ("OCI://reg.io/models/m:v1", OciRef("reg.io", "models/m", tag="v1")),
    ("Oci://reg.io/models/m:v1", OciRef("reg.io", "models/m", tag="v1")),
    ("S3://bucket/models/m", S3Ref("bucket", "models/m")),
    ("HF://org/Model@main", HfRef("org/Model", "main")),
])
def test_schemes_are_case_insensitive(text: str, expected: object) -> None:
    """RFC 3986 3.1: schemes compare case-insensitively; the rest keeps its case."""
    assert parse(text) == expected


def test_layout_and_file_schemes_are_case_insensitive(tmp_path: Path) -> None:
    assert parse(f"File://{tmp_path}") == DirRef(tmp_path)
    assert parse(f"OCI-LAYOUT://{tmp_path}:v1") == LayoutRef(tmp_path, tag="v1")


@pytest.mark.parametrize("text", ["/definitely/not/here", "file:///definitely/not/here"])
def test_missing_directory_is_not_found(text: str) -> None:
    """A missing local directory is NotFound (exit 3), one message however spelled."""
    with pytest.raises(NotFound, match="^/definitely/not/here: no such directory$"):
        parse(text)
