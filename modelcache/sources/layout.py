"""An OCI image layout directory as a source (image-layout spec v1.0).

``index.json`` is the entry point; a manifest is chosen by the
``org.opencontainers.image.ref.name`` annotation (the tag), by digest, or as
the only one. Manifests are verified against their digests; blobs are read
from ``blobs/sha256/<hex>`` and verified by the store at commit. Every file
is opened with :func:`~.files.open_within`: a blob or ``index.json`` that is
a symlink leading out of the layout directory (to ``/etc/shadow``, say), or
that is not a regular file, is refused, never read.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from ..errors import DigestMismatch, InvalidContent, NotFound
from ..model import Blob, Model
from ..refs import LayoutRef, missing_directory
from .files import open_within, read_file_range
from .oci_manifest import (
    MAX_MANIFEST_BYTES,
    Fetched,
    choose_in_layout,
    media_type_of,
    parse_json,
    resolve_image,
)


class LayoutSource:
    """Resolves and reads one ``oci-layout://`` reference."""

    def __init__(self, ref: LayoutRef) -> None:
        self.ref = ref
        self.name = str(ref)
        self._root = Path(os.path.realpath(ref.path))

    def _read_small(self, path: Path, limit: int) -> bytes:
        """A whole file of the layout (index.json, a manifest), if it is at most ``limit`` bytes."""
        with open(open_within(path, self._root, what=self.name), "rb") as f:
            body = f.read(limit + 1)
        if len(body) > limit:
            raise InvalidContent(f"{self.name}: {path.name} is over the {limit >> 20} MiB limit")
        return body

    def _blob_path(self, digest: str) -> Path:
        return self.ref.path / "blobs" / "sha256" / digest.partition(":")[2]

    def _manifest(self, blob: Blob | str) -> Fetched:
        """A manifest or index of the layout, size-capped and verified against its digest."""
        assert isinstance(blob, Blob)  # a layout names its manifests by descriptor, never by tag
        if blob.size > MAX_MANIFEST_BYTES:
            raise InvalidContent(f"{self.name}: manifest {blob.digest} is over the 4 MiB limit")
        try:
            body = self._read_small(self._blob_path(blob.digest), MAX_MANIFEST_BYTES)
        except NotFound as e:
            raise NotFound(f"{self.name}: blob {blob.digest} missing from the layout") from e
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if actual != blob.digest:
            raise DigestMismatch(f"{self.name}: manifest {blob.digest} has digest {actual}")
        doc = parse_json(body, what=f"manifest {blob.digest}")
        return doc, media_type_of(doc, blob.media_type), blob.digest

    def _root_descriptor(self) -> Blob:
        if not self.ref.path.exists():
            raise missing_directory(self.ref.path)
        index_path = self.ref.path / "index.json"
        try:
            index = parse_json(self._read_small(index_path, MAX_MANIFEST_BYTES), what=str(index_path))
        except NotFound as e:
            raise NotFound(f"{self.name}: no index.json (not an OCI image layout)") from e
        return choose_in_layout(index, tag=self.ref.tag, digest=self.ref.digest, what=self.name)

    async def resolve(self) -> Model:
        """Read index.json and the chosen manifest (files are read in threads)."""
        root = await asyncio.to_thread(self._root_descriptor)
        return await resolve_image(root, lambda blob: asyncio.to_thread(self._manifest, blob), name=self.name)

    def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes]:
        """Yield a range of a blob file of the layout."""
        return read_file_range(self._blob_path(blob.digest), offset, length, what=self.name, within=self._root)

    async def close(self) -> None:
        """Nothing to release."""
