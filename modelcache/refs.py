"""Parsing model references.

Accepted forms:

- ``oci://HOST[:PORT]/REPO[:TAG|@sha256:HEX]``: a registry; the tag defaults
  to ``latest`` as in Docker. ``HOST`` may be ``[::1]``. Docker's pinned
  ``REPO:TAG@sha256:HEX`` is read as the digest alone.
- ``oci-layout:///PATH[:TAG|@sha256:HEX]``: an OCI image layout directory.
- ``s3://BUCKET/PREFIX``: the objects under a prefix (or an OCI layout there).
- ``hf://ORG/NAME[@REVISION]``: a Hugging Face Hub model (revision: ``main``).
- ``file:///PATH`` or a plain path: a local directory; an OCI image layout
  directory (one with an ``oci-layout`` file) is read as a layout.

Schemes are case-insensitive (``OCI://`` is ``oci://``, RFC 3986 3.1).
Parsing never touches the network; it only checks syntax (the filesystem is
only consulted to tell a layout from a plain directory).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from .errors import InvalidReference, NotFound

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# Repository path components and tags, from the OCI distribution spec.
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_HOST_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?$")


@dataclass(frozen=True, slots=True)
class OciRef:
    """A manifest in a registry: host, repository and a tag or digest."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/`` in the distribution API."""
        return self.digest or self.tag or "latest"

    @property
    def hostname(self) -> str:
        """The host without port or IPv6 brackets."""
        host = self.host
        if host.startswith("["):
            return host[1 : host.index("]")]
        return host.rsplit(":", 1)[0]

    def is_loopback(self) -> bool:
        """True for localhost and 127.0.0.0/8 / ::1: plain HTTP by default."""
        name = self.hostname
        if name == "localhost" or name.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        tail = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
        return f"oci://{self.host}/{self.repository}{tail}"


@dataclass(frozen=True, slots=True)
class LayoutRef:
    """A manifest in an OCI image layout directory."""

    path: Path
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        tail = f"@{self.digest}" if self.digest else (f":{self.tag}" if self.tag else "")
        return f"oci-layout://{self.path}{tail}"


@dataclass(frozen=True, slots=True)
class DirRef:
    """A plain local directory of model files."""

    path: Path

    def __str__(self) -> str:
        return f"file://{self.path}"


@dataclass(frozen=True, slots=True)
class S3Ref:
    """Objects under a prefix of an S3 bucket (``tag`` picks an image if it holds a layout)."""

    bucket: str
    prefix: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" + (f" (tag {self.tag})" if self.tag else "")


@dataclass(frozen=True, slots=True)
class HfRef:
    """A Hugging Face Hub model repository at a revision (branch, tag or commit)."""

    repo: str
    revision: str = "main"

    def __str__(self) -> str:
        return f"hf://{self.repo}@{self.revision}"


Ref = OciRef | LayoutRef | DirRef | S3Ref | HfRef


def pinned(ref: Ref) -> bool:
    """Whether ``ref`` names its content by digest, so what it resolves to can never change
    (``oci://HOST/REPO@sha256:...``, ``oci-layout://DIR@sha256:...``)."""
    return isinstance(ref, OciRef | LayoutRef) and ref.digest is not None


_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def lower_scheme(text: str) -> str:
    """``text`` with its ``scheme://`` (if any) in lower case; the rest untouched."""
    m = _SCHEME_RE.match(text)
    return m.group(1).lower() + text[m.end(1):] if m else text


def parse(text: str) -> Ref:
    """Parse a reference; raise :class:`InvalidReference` with the reason."""
    text = lower_scheme(text.strip())
    if not text:
        raise InvalidReference("empty model reference")
    if text.startswith("oci://"):
        return _parse_oci(text)
    if text.startswith("oci-layout://"):
        return _parse_layout(unquote(text[len("oci-layout://") :]), text)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://"):].partition("/")
        if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket):
            raise InvalidReference(f"{text!r}: invalid bucket name {bucket!r}")
        return S3Ref(bucket=bucket, prefix=prefix.strip("/"))
    if text.startswith("hf://"):
        repo, _, revision = text[len("hf://"):].partition("@")
        if not re.match(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$", repo) or (_ and not revision):
            raise InvalidReference(f"{text!r}: expected hf://ORG/NAME[@REVISION]")
        return HfRef(repo=repo, revision=revision or "main")
    if text.startswith("file://"):
        return _local(Path(unquote(text[len("file://") :])), text)
    scheme = re.match(r"^([a-z][a-z0-9+.-]*)://", text)
    if scheme:
        raise InvalidReference(
            f"unsupported reference scheme {scheme.group(1)!r} in {text!r} "
            "(use oci://, oci-layout://, s3://, hf://, file:// or a path)"
        )
    return _local(Path(text), text)


def _parse_oci(text: str) -> OciRef:
    rest = text[len("oci://") :]
    host, sep, path = rest.partition("/")
    if not sep or not host or not path:
        raise InvalidReference(f"{text!r}: expected oci://HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]")
    if not _HOST_RE.match(host):
        raise InvalidReference(f"{text!r}: invalid registry host {host!r}")
    digest = tag = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not _DIGEST_RE.match(digest):
            raise InvalidReference(f"{text!r}: invalid digest {digest!r} (expected sha256:<64 hex>)")
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        # REPO:TAG@DIGEST (docker's pinned form) is allowed: the digest decides, the tag is a label.
        path, _, tag = path.rpartition(":")
        if not _TAG_RE.match(tag):
            raise InvalidReference(f"{text!r}: invalid tag {tag!r}")
    if not _REPO_RE.match(path):
        raise InvalidReference(
            f"{text!r}: invalid repository name {path!r} (lowercase letters, digits, . _ - and /)"
        )
    return OciRef(host=host, repository=path, tag=tag if digest is None else None, digest=digest)


def _parse_layout(rest: str, text: str) -> LayoutRef:
    tag = digest = None
    if "@" in rest:
        rest, _, digest = rest.rpartition("@")
        if not _DIGEST_RE.match(digest):
            raise InvalidReference(f"{text!r}: invalid digest {digest!r}")
    else:
        head, sep, last = rest.rpartition(":")
        if sep and "/" not in last and not Path(rest).exists():
            rest, tag = head, last
            if not _TAG_RE.match(tag):
                raise InvalidReference(f"{text!r}: invalid tag {tag!r}")
    if not rest:
        raise InvalidReference(f"{text!r}: missing layout path")
    return LayoutRef(path=Path(rest).absolute(), tag=tag, digest=digest)


def missing_directory(path: Path, text: str = "") -> NotFound:
    """The one error for a local model directory that is not there, however it was spelled.

    ``text`` that looks like a registry reference without its scheme
    (``HOST[:PORT]/REPO…``) gets a hint.
    """
    first = text.split("/", 1)[0]
    hint = ""
    if "/" in text and ("." in first or ":" in first) and not text.startswith((".", "/", "~")) and "://" not in text:
        hint = f" (a registry reference needs its scheme: oci://{text})"
    return NotFound(f"{path.absolute()}: no such directory{hint}")


def _local(path: Path, text: str) -> Ref:
    if (path / "oci-layout").is_file():
        return LayoutRef(path=path.absolute())
    if not path.exists():
        # "DIR:TAG" for a layout directory, as skopeo's oci: transport spells it.
        head, sep, last = str(path).rpartition(":")
        if sep and head and (Path(head) / "oci-layout").is_file():
            return _parse_layout(str(path), text)
        if sep and head and "/" not in last and Path(head).is_dir():
            raise InvalidReference(f"{text!r}: {head} is not an OCI image layout, so a :TAG names nothing in it")
        raise missing_directory(path, text)
    if not path.is_dir():
        raise InvalidReference(f"{text!r}: not a directory")
    return DirRef(path=path.absolute())
