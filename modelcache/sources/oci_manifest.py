"""Reading OCI and Docker manifests into a Model (no I/O here).

Handles image indexes / Docker manifest lists (choosing one child), OCI image
manifests and Docker v2 schema 2 manifests, and classifies layers:

- ModelPack (``application/vnd.cncf.model.*``, older ``vnd.cnai.model.*``):
  ``.raw`` layers are files at ``org.cncf.model.filepath``; ``.tar``,
  ``.tar+gzip``, ``.tar+zstd`` layers are unpacked;
- image layers (OCI and Docker, tar / gzip / zstd, nondistributable too)
  are unpacked at the model's root, so a modelcar's ``/models`` tree works;
- single-file tar layers made by ``modelcache package`` carry
  ``io.modelcache.file.{path,digest,size,offset}``: the file's path in the
  layer, the sha256 and size of its bytes, and where they start in the
  uncompressed tar. Such a layer is read as that file, fetched by range
  straight out of the layer (no second write to unpack it) and deduplicated
  by the file's own sha256 against every other source;
- ORAS files: a layer titled by ``org.opencontainers.image.title`` is a
  file at that path, whatever its media type, except a directory as either
  ORAS client pushes one: a ``tar+gzip`` layer marked
  ``io.deis.oras.content.unpack`` (oras-go), or a ``tar+gzip`` layer whose
  title is not itself an archive's file name (oras-py marks nothing; its
  pull unpacks every layer of that type). Both write the entries under the
  directory's own name, which is where they land.

A layer may list the sha256 of each piece peers exchange of it (issue 11,
written by ``modelcache package``): ``io.modelcache.pieces.length`` (bytes)
and ``io.modelcache.pieces.sha256`` (the hex digests concatenated). The list
goes onto the blob a pull stores (for a single-file tar layer the file, else
the layer); a malformed or miscounted list is ignored, never an error: the
blob's own digest still checks every byte.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import InvalidContent, NotFound
from ..model import Archive, Blob, Compression, FileEntry, Model, PieceDigests
from ..tree import safe_path

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
MAX_MANIFEST_BYTES = 4 << 20

MODELPACK_ARTIFACT_TYPES = (
    "application/vnd.cncf.model.manifest.v1+json",
    "application/vnd.cnai.model.manifest.v1+json",
)
MODELPACK_FILEPATH = ("org.cncf.model.filepath", "org.cnai.model.filepath")
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"  # a tag in an image layout's index.json
FILE_PATH = "io.modelcache.file.path"
FILE_DIGEST = "io.modelcache.file.digest"
FILE_SIZE = "io.modelcache.file.size"
FILE_OFFSET = "io.modelcache.file.offset"
PIECES_LENGTH = "io.modelcache.pieces.length"
PIECES_SHA256 = "io.modelcache.pieces.sha256"
ORAS_UNPACK = "io.deis.oras.content.unpack"
ORAS_DIR_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
# A titled tar+gzip layer with one of these names is a file someone pushed as it is, not a directory.
_ARCHIVE_NAME = re.compile(r"\.(?:t?gz|tar|tar\.\w+|zip|zst|xz|bz2)$", re.IGNORECASE)

_MODELPACK_LAYER = re.compile(r"^application/vnd\.(?:cncf|cnai)\.model\.[a-z0-9.]+\.v1\.(raw|tar|tar\+gzip|tar\+zstd)$")
_IMAGE_LAYER = re.compile(
    r"^application/vnd\.(?:oci\.image\.layer(?:\.nondistributable)?\.v1\.tar(\+gzip|\+zstd)?"
    r"|docker\.image\.rootfs(?:\.foreign)?\.diff\.tar(\.gzip)?)$"
)
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HEX = re.compile(r"^[0-9a-f]*$")


def parse_json(body: bytes, *, what: str) -> dict[str, Any]:
    """Decode a manifest or index, refusing oversized or non-object JSON."""
    if len(body) > MAX_MANIFEST_BYTES:
        raise InvalidContent(f"{what} is {len(body)} bytes, over the {MAX_MANIFEST_BYTES >> 20} MiB limit")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidContent(f"{what} is not valid JSON: {e}") from e
    except RecursionError:  # "[[[[…": nesting no manifest has, deeper than the parser recurses
        raise InvalidContent(f"{what} is nested too deeply to be a manifest") from None
    if not isinstance(doc, dict):
        raise InvalidContent(f"{what} is not a JSON object")
    return doc


def media_type_of(doc: dict[str, Any], header: str | None = None) -> str:
    """The document's media type: its own field, else the HTTP header, else guessed."""
    mt = doc.get("mediaType") or (header or "").split(";")[0].strip()
    if mt:
        return mt
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


def descriptor(raw: Any, *, what: str) -> Blob:
    """A validated content descriptor."""
    if not isinstance(raw, dict):
        raise InvalidContent(f"{what}: descriptor is not an object")
    digest, size, mt = raw.get("digest"), raw.get("size"), raw.get("mediaType", "")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InvalidContent(f"{what}: unsupported or invalid digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidContent(f"{what}: invalid size {size!r}")
    return Blob(digest=digest, size=size, media_type=str(mt))


def select_from_index(doc: dict[str, Any], *, what: str) -> Blob:
    """Pick the manifest to use from an index.

    The ModelPack artifact if the index lists one, else linux/amd64, else the
    only manifest there is.
    """
    manifests = doc.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise InvalidContent(f"{what}: image index lists no manifests")
    for m in manifests:
        if isinstance(m, dict) and m.get("artifactType") in MODELPACK_ARTIFACT_TYPES:
            return descriptor(m, what=what)
    for m in manifests:
        p = m.get("platform") if isinstance(m, dict) else None
        if isinstance(p, dict) and p.get("os") == "linux" and p.get("architecture") == "amd64":
            return descriptor(m, what=what)
    if len(manifests) == 1:
        return descriptor(manifests[0], what=what)
    platforms = ", ".join(
        f"{m.get('platform', {}).get('os')}/{m.get('platform', {}).get('architecture')}"
        for m in manifests if isinstance(m, dict)
    )
    raise InvalidContent(f"{what}: index has no ModelPack or linux/amd64 manifest (has {platforms})")


def choose_in_layout(index: dict[str, Any], *, tag: str | None, digest: str | None, what: str) -> Blob:
    """The image an OCI layout's ``index.json`` names: by digest, by tag, or the only one there is.

    The one choice for every layout, on disk or in a bucket (image-layout
    spec: the tag is the ``org.opencontainers.image.ref.name`` annotation).
    """
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise NotFound(f"{what}: the layout lists no images")
    if digest:
        for m in manifests:
            if isinstance(m, dict) and m.get("digest") == digest:
                return descriptor(m, what=what)
        raise NotFound(f"{what}: no manifest {digest} in the layout")
    if tag:
        for m in manifests:
            if isinstance(m, dict) and (m.get("annotations") or {}).get(REF_NAME) == tag:
                return descriptor(m, what=what)
        raise NotFound(f"{what}: tag {tag!r} not found in the layout")
    if len(manifests) == 1:
        return descriptor(manifests[0], what=what)
    tags = sorted(str((m.get("annotations") or {}).get(REF_NAME)) for m in manifests if isinstance(m, dict))
    raise InvalidContent(f"{what}: the layout holds {len(manifests)} images; "
                         f"name one with :TAG or --tag ({', '.join(tags)})")


Fetched = tuple[dict[str, Any], str, str]  # (document, media type, digest)


async def resolve_image(first: Blob | str, fetch: Callable[[Blob | str], Awaitable[Fetched]], *, name: str) -> Model:
    """The Model of an image: its manifest, reached through an index if ``first`` names one.

    The one path from a root descriptor (or a registry tag) to a Model, for
    registries and layouts alike: ``fetch`` reads and verifies one manifest
    or index; the child of an index is chosen by :func:`select_from_index`.
    """
    doc, media_type, digest = await fetch(first)
    if media_type in INDEX_TYPES:
        doc, media_type, digest = await fetch(select_from_index(doc, what=name))
    if media_type not in MANIFEST_TYPES:
        raise InvalidContent(f"{name}: unsupported manifest media type {media_type!r}")
    return model_from_manifest(doc, ref=name, digest=digest)


def model_from_manifest(doc: dict[str, Any], *, ref: str, digest: str) -> Model:
    """Turn an image or artifact manifest into a Model."""
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise InvalidContent(f"{ref}: manifest has no layers list")
    parts: list[FileEntry | Archive] = []
    for n, raw in enumerate(layers):
        blob = descriptor(raw, what=f"{ref} layer {n}")
        annotations = raw.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise InvalidContent(f"{ref} layer {n}: annotations is not an object")
        parts.append(_with_pieces(_classify(blob, annotations, what=f"{ref} layer {n}"), annotations))
    annotations = doc.get("annotations") if isinstance(doc.get("annotations"), dict) else {}
    return Model(ref=ref, digest=digest, parts=tuple(parts), annotations=dict(annotations or {}))


def piece_digests(annotations: dict[str, Any], size: int) -> PieceDigests | None:
    """The piece list a layer's annotations give for a blob of ``size`` bytes, or None (absent or malformed)."""
    length, text = annotations.get(PIECES_LENGTH), annotations.get(PIECES_SHA256)
    if not isinstance(length, str) or not length.isdigit() or int(length) <= 0 or not isinstance(text, str):
        return None
    count = max(1, -(-size // int(length)))
    if len(text) != 64 * count or not _HEX.fullmatch(text):
        return None
    return PieceDigests(int(length), tuple(text[i:i + 64] for i in range(0, len(text), 64)))


def _with_pieces(part: FileEntry | Archive, annotations: dict[str, Any]) -> FileEntry | Archive:
    """``part`` with the layer's piece list on the blob it stores (the file of a single-file tar layer)."""
    pieces = piece_digests(annotations, part.blob.size)
    if pieces is None:
        return part
    return dataclasses.replace(part, blob=dataclasses.replace(part.blob, pieces=pieces))


def _compression(suffix: str | None) -> Compression:
    if not suffix:
        return Compression.NONE
    return Compression.ZSTD if "zstd" in suffix else Compression.GZIP


def _classify(blob: Blob, annotations: dict[str, Any], *, what: str) -> FileEntry | Archive:
    mt = blob.media_type
    modelpack = _MODELPACK_LAYER.match(mt)
    if modelpack:
        kind = modelpack.group(1)
        if kind == "raw":
            path = next((annotations[k] for k in MODELPACK_FILEPATH if k in annotations), None)
            path = path or annotations.get(TITLE)
            if not isinstance(path, str):
                raise InvalidContent(f"{what}: raw ModelPack layer without org.cncf.model.filepath")
            return FileEntry(path=safe_path(path, context=what), blob=blob)
        return Archive(blob=blob, compression=_compression(kind[3:]))
    image = _IMAGE_LAYER.match(mt)
    title = annotations.get(TITLE)
    if image:
        suffix = image.group(1) or image.group(2)
        if not suffix and FILE_DIGEST in annotations:
            return _file_in_tar(blob, annotations, what=what)
        if not isinstance(title, str):
            return Archive(blob=blob, compression=_compression(suffix))
        # ORAS names files by title (its default file media type is the image
        # layer tar type) and marks directories it packed with ORAS_UNPACK.
        if _oras_directory(mt, title, annotations):
            return Archive(blob=blob, compression=_compression(suffix), prefix=safe_path(title, context=what))
        return FileEntry(path=safe_path(title, context=what), blob=blob)
    if isinstance(title, str):
        return FileEntry(path=safe_path(title, context=what), blob=blob)
    raise InvalidContent(f"{what}: unsupported layer media type {mt!r} without a file name")


def _oras_directory(media_type: str, title: str, annotations: dict[str, Any]) -> bool:
    """True for a directory packed by an ORAS client (see the module docstring)."""
    if str(annotations.get(ORAS_UNPACK)).lower() == "true":
        return True
    return media_type == ORAS_DIR_TYPE and not _ARCHIVE_NAME.search(title)


def _file_in_tar(layer: Blob, annotations: dict[str, Any], *, what: str) -> FileEntry:
    """The file an uncompressed single-file tar layer carries, by its annotations."""
    digest, path = annotations.get(FILE_DIGEST), annotations.get(FILE_PATH)
    try:
        size, offset = int(annotations[FILE_SIZE]), int(annotations[FILE_OFFSET])
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidContent(f"{what}: io.modelcache.file.size/offset missing or not integers") from e
    if not isinstance(digest, str) or not _DIGEST.match(digest) or not isinstance(path, str):
        raise InvalidContent(f"{what}: invalid io.modelcache.file.digest/path annotations")
    if size < 0 or offset < 512 or offset + size > layer.size:
        raise InvalidContent(f"{what}: file range {offset}+{size} lies outside the {layer.size}-byte layer")
    return FileEntry(path=safe_path(path, context=what), blob=Blob(digest=digest, size=size),
                     origin=layer, offset=offset)
