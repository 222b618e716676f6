"""Packaging a directory: scan, plan layers, hash them in parallel, publish to a target.

Blobs go up in parallel (``concurrency`` at a time, largest first so the
long uploads start early), then the per-platform manifests by digest, then
the root under its tag: a push that fails part way leaves the tag where it
was. Hashing reads each file once and uploading once more (from the page
cache when it fits); no layer is ever staged on disk.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .image import Package, image_documents, modelpack_documents, plan_image, plan_modelpack
from .layers import hash_layer, scan
from .targets import Target, blob_segments


@dataclass(slots=True)
class PackageStats:
    """What a publish did."""

    files: int = 0
    layers: int = 0
    bytes_total: int = 0
    bytes_uploaded: int = 0
    uploaded: int = 0
    mounted: int = 0
    present: int = 0
    pushed: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PackageOptions:
    """How to package (every field has a default)."""

    format: str = "image"          # image | modelpack
    prefix: str = ""               # image format: directory the files sit under in the image
    large_file: int = 16 << 20     # image format: files this big get a layer of their own
    concurrency: int = 4
    follow_symlinks: bool = False
    name: str = "model"            # modelpack format: descriptor name


async def build(source: Path, options: PackageOptions) -> Package:
    """Plan and hash the package for ``source`` (no target involved)."""
    files = await asyncio.to_thread(scan, source, follow_symlinks=options.follow_symlinks)
    if options.format == "modelpack":
        layers = plan_modelpack(files)
    else:
        layers = plan_image(files, prefix=options.prefix.strip("/"), large_file=options.large_file)
    limit = asyncio.Semaphore(os.cpu_count() or 2)

    async def hashed(layer) -> None:
        async with limit:
            await asyncio.to_thread(hash_layer, layer)

    await asyncio.gather(*(hashed(layer) for layer in layers))
    if options.format == "modelpack":
        return modelpack_documents(layers, name=options.name)
    return image_documents(layers, prefix=options.prefix.strip("/"))


async def publish(package: Package, target: Target, tag: str, *, concurrency: int,
                  progress: Callable[[PackageStats], None] | None = None) -> PackageStats:
    """Send blobs, then manifests, then the tag."""
    stats = PackageStats(files=sum(len(layer.files) for layer in package.layers), layers=len(package.layers))
    blobs = [(layer.digest, layer.size, blob_segments(layer)) for layer in package.layers]
    blobs += [(c.descriptor["digest"], len(c.body), blob_segments(c)) for c in package.configs]
    unique = {d: (d, size, segs) for d, size, segs in blobs}
    stats.bytes_total = sum(size for _, size, _ in unique.values())
    limit = asyncio.Semaphore(concurrency)

    def advance(n: int) -> None:
        stats.bytes_uploaded += n
        if progress:
            progress(stats)

    async def send(digest: str, size: int, segments) -> None:
        async with limit:
            how = await target.put_blob(digest, size, segments, advance)
        setattr(stats, how, getattr(stats, how) + 1)
        stats.pushed.append(digest)

    await asyncio.gather(*(send(*b) for b in sorted(unique.values(), key=lambda b: -b[1])))
    for manifest in package.manifests:
        await target.put_manifest(manifest, manifest.descriptor["digest"])
    assert package.root is not None
    await target.put_manifest(package.root, tag)
    return stats

