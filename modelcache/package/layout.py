"""Writing an OCI image layout directory (image-layout spec v1.0).

Blobs are written under a temp name and renamed to ``blobs/sha256/<hex>``
once hashed, so a half-written blob never carries a digest name; ``index.json``
is replaced atomically, so a reader sees the old or the new list of images.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from ..sources.oci_manifest import OCI_INDEX, REF_NAME

_BLOCK = 4 << 20
OCI_LAYOUT = json.dumps({"imageLayoutVersion": "1.0.0"})  # the ``oci-layout`` file's content


def tagged_index(index: dict[str, Any] | None, manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """``index.json`` (None: none yet) with ``name`` pointing at ``manifest``, an older ``name`` dropped.

    The one way a tag is written, to a layout on disk or in a bucket.
    """
    index = index or {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    kept = [m for m in index.get("manifests", []) if (m.get("annotations") or {}).get(REF_NAME) != name]
    entry = {**manifest, "annotations": {**(manifest.get("annotations") or {}), REF_NAME: name}}
    return {**index, "manifests": [*kept, entry]}


def descriptor(media_type: str, digest: str, size: int, **extra: Any) -> dict[str, Any]:
    """An OCI content descriptor."""
    return {"mediaType": media_type, "digest": digest, "size": size, **{k: v for k, v in extra.items() if v}}


def canonical_json(doc: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no spaces), so digests are reproducible."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class LayoutWriter:
    """Adds blobs and tagged manifests to a layout directory (created if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        marker = root / "oci-layout"
        if not marker.exists():
            marker.write_text(OCI_LAYOUT)

    def add_bytes(self, data: bytes) -> tuple[str, int]:
        """Store bytes as a blob; return (digest, size)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        final = self.blobs / digest[7:]
        if not final.exists():
            tmp = self.blobs / f".tmp-{secrets.token_hex(8)}"
            tmp.write_bytes(data)
            os.replace(tmp, final)
        return digest, len(data)

    def add_file(self, path: Path) -> tuple[str, int]:
        """Copy a file in as a blob, hashing on the way; return (digest, size)."""
        tmp = self.blobs / f".tmp-{secrets.token_hex(8)}"
        h = hashlib.sha256()
        size = 0
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while block := src.read(_BLOCK):
                    h.update(block)
                    dst.write(block)
                    size += len(block)
            digest = "sha256:" + h.hexdigest()
            os.replace(tmp, self.blobs / digest[7:])
        finally:
            tmp.unlink(missing_ok=True)
        return digest, size

    def add_json(self, doc: Any, media_type: str, **extra: Any) -> dict[str, Any]:
        """Store a JSON document as a blob; return its descriptor."""
        digest, size = self.add_bytes(canonical_json(doc))
        return descriptor(media_type, digest, size, **extra)

    def tag(self, manifest: dict[str, Any], name: str) -> None:
        """Point ``name`` at ``manifest`` in ``index.json`` (replacing an older one)."""
        index_path = self.root / "index.json"
        try:
            index = json.loads(index_path.read_text())
        except FileNotFoundError:
            index = None
        index = tagged_index(index, manifest, name)
        tmp = self.root / f".index-{secrets.token_hex(8)}.json"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, index_path)
