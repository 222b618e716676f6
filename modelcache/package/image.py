"""What a package is made of: layers planned from files, and the OCI documents over them.

Two formats:

- ``image`` (default): an OCI image for Kubernetes Image VolumeSource. Every
  file of ``large_file`` bytes or more gets an uncompressed tar layer of its
  own, smaller files share tar layers of up to ``group_limit`` bytes. Files
  sit at their relative paths under ``prefix`` (none by default, so the
  volume's mount path shows the model's files; ``--prefix models`` gives a
  KServe modelcar layout). An image index lists the same layers for each
  platform (linux/amd64 and linux/arm64), so every node resolves it. Each
  single-file layer is annotated with ``io.modelcache.file.path``,
  ``.digest`` (sha256 of the file), ``.size`` and ``.offset`` (where the
  file's bytes start in the layer): the puller fetches that range directly
  and shares the file with any other source that has the same bytes.
- ``modelpack``: a ModelPack artifact (artifactType
  ``application/vnd.cncf.model.manifest.v1+json``): one ``.raw`` layer per
  file at ``org.cncf.model.filepath``, typed weight, weight config, doc or
  code, with the ModelPack config (descriptor, config, modelfs).

Both formats annotate each layer with its piece digest list for peers
(issue 11): ``io.modelcache.pieces.length`` (the piece length in bytes, as
:func:`modelcache.p2p.pieces.piece_size` gives it) and
``io.modelcache.pieces.sha256`` (the lowercase hex sha256 of each piece,
concatenated, 64 characters a piece). They cover the blob a puller stores:
the file of a single-file tar layer, the layer otherwise. An annotation and
not a blob of its own: it is covered by the manifest's digest, costs no extra
request, and a registry's garbage collector cannot drop it. Bounded: the
lists of one manifest take at most :data:`PIECE_BUDGET` characters (layers
beyond it go without; a puller then checks them whole at commit).

Everything is deterministic: the same files give the same digests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..sources.oci_manifest import PIECES_LENGTH, PIECES_SHA256
from .layers import Layer, SourceFile, raw_layer, tar_layer
from .layout import canonical_json, descriptor

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MP_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MP_CONFIG = "application/vnd.cncf.model.config.v1+json"
MP_WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
MP_WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
MP_DOC = "application/vnd.cncf.model.doc.v1.raw"
MP_CODE = "application/vnd.cncf.model.code.v1.raw"
MP_FILEPATH = "org.cncf.model.filepath"
TITLE = "org.opencontainers.image.title"
PLATFORMS = ("linux/amd64", "linux/arm64")
_WEIGHTS = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack", ".npz")
_CODE = (".py", ".sh", ".ipynb")
_DOCS = ("readme", "license", "notice")
PIECE_BUDGET = 2 << 20  # characters of piece lists per manifest: half the 4 MiB registries and runtimes accept


@dataclass(slots=True)
class Document:
    """A JSON document to store as a blob."""

    body: bytes
    descriptor: dict


@dataclass(slots=True)
class Package:
    """Layers, then config blobs, then manifests, then the root the tag points at."""

    layers: list[Layer]
    configs: list[Document] = field(default_factory=list)
    manifests: list[Document] = field(default_factory=list)
    root: Document | None = None

    @property
    def digest(self) -> str:
        """The digest a pull by tag resolves to."""
        assert self.root is not None
        return str(self.root.descriptor["digest"])


def _doc(obj: dict, media_type: str, **extra: object) -> Document:
    body = canonical_json(obj)
    import hashlib

    return Document(body, descriptor(media_type, "sha256:" + hashlib.sha256(body).hexdigest(), len(body), **extra))


def plan_image(files: Sequence[SourceFile], *, prefix: str = "", large_file: int = 16 << 20,
               group_limit: int = 512 << 20) -> list[Layer]:
    """Tar layers: one per large file, small files grouped (in path order)."""
    layers: list[Layer] = []
    group: list[SourceFile] = []
    group_size = 0
    for f in files:
        if f.size >= large_file:
            layers.append(tar_layer([f], prefix=prefix, media_type=LAYER_TAR))
            continue
        if group and group_size + f.size > group_limit:
            layers.append(tar_layer(group, prefix=prefix, media_type=LAYER_TAR))
            group, group_size = [], 0
        group.append(f)
        group_size += f.size
    if group:
        layers.append(tar_layer(group, prefix=prefix, media_type=LAYER_TAR))
    return layers


def plan_modelpack(files: Sequence[SourceFile]) -> list[Layer]:
    """One raw layer per file, typed by what the file is."""
    return [raw_layer(f, media_type=_modelpack_type(f.rel)) for f in files]


def _modelpack_type(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1].lower()
    if name.endswith(_WEIGHTS):
        return MP_WEIGHT
    if name.endswith(_CODE):
        return MP_CODE
    if name.startswith(_DOCS) or name.endswith(".md"):
        return MP_DOC
    return MP_WEIGHT_CONFIG


def _piece_annotations(layers: Sequence[Layer], budget: int = PIECE_BUDGET) -> list[dict[str, str]]:
    """Each layer's piece list annotations, in layer order while the manifest's budget lasts."""
    out: list[dict[str, str]] = []
    for layer in layers:
        text = "".join(layer.pieces)
        if not layer.pieces or len(text) > budget:
            out.append({})
            budget = 0  # first come, first served: a later, smaller list does not jump the queue
            continue
        budget -= len(text)
        out.append({PIECES_LENGTH: str(layer.piece_length), PIECES_SHA256: text})
    return out


def _layer_descriptor(layer: Layer, *, prefix: str = "", pieces: dict[str, str] | None = None) -> dict:
    annotations = dict(layer.annotations)
    annotations.update(pieces or {})
    if layer.file_offset is not None and layer.file_digest:
        (f,) = layer.files
        annotations.update({
            "io.modelcache.file.path": f"{prefix}/{f.rel}" if prefix else f.rel,
            "io.modelcache.file.digest": layer.file_digest,
            "io.modelcache.file.size": str(f.size),
            "io.modelcache.file.offset": str(layer.file_offset),
            TITLE: f.rel,
        })
    return descriptor(layer.media_type, layer.digest, layer.size, annotations=annotations)


def image_documents(layers: list[Layer], *, prefix: str = "",
                    platforms: Sequence[str] = PLATFORMS, annotations: dict[str, str] | None = None) -> Package:
    """Configs, per-platform manifests and the index over hashed tar layers."""
    package = Package(layers)
    layer_descs = [_layer_descriptor(layer, prefix=prefix, pieces=pieces)
                   for layer, pieces in zip(layers, _piece_annotations(layers), strict=True)]
    entries = []
    for platform in platforms:
        os_name, _, arch = platform.partition("/")
        config = _doc({"architecture": arch, "os": os_name, "config": {},
                       "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]}}, OCI_CONFIG)
        manifest = _doc({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.descriptor,
                         "layers": layer_descs, **({"annotations": annotations} if annotations else {})},
                        OCI_MANIFEST)
        package.configs.append(config)
        package.manifests.append(manifest)
        entries.append({**manifest.descriptor, "platform": {"architecture": arch, "os": os_name}})
    package.root = _doc({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, OCI_INDEX)
    return package


def modelpack_documents(layers: list[Layer], *, name: str) -> Package:
    """The ModelPack config and artifact manifest over hashed raw layers."""
    package = Package(layers)
    config = _doc({"descriptor": {"name": name},
                   "config": {"format": _format(layers)},
                   "modelfs": {"type": "layers", "diffIds": [layer.digest for layer in layers]}}, MP_CONFIG)
    package.configs.append(config)
    # The title: ORAS clients name what they pull by it.
    layer_descs = [descriptor(layer.media_type, layer.digest, layer.size,
                              annotations={MP_FILEPATH: layer.files[0].rel, TITLE: layer.files[0].rel, **pieces})
                   for layer, pieces in zip(layers, _piece_annotations(layers), strict=True)]
    package.root = _doc({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": MP_ARTIFACT,
                         "config": config.descriptor, "layers": layer_descs}, OCI_MANIFEST, artifactType=MP_ARTIFACT)
    return package


def _format(layers: list[Layer]) -> str:
    names = [f.rel.lower() for layer in layers for f in layer.files]
    for ext, fmt in ((".safetensors", "safetensors"), (".gguf", "gguf"), (".onnx", "onnx"), (".bin", "pytorch")):
        if any(n.endswith(ext) for n in names):
            return fmt
    return ""
