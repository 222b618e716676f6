"""A demo model, made locally: random "weights" in a ModelPack OCI layout.

Used by ``modelcache demo`` so a first run needs no registry, cluster or
cloud account: the layout is a real OCI image layout that skopeo, oras and
modelcache itself can all read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .package.layout import LayoutWriter, descriptor

WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
FILEPATH = "org.cncf.model.filepath"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def make_demo_layout(base: Path, *, total: int, files: int) -> Path:
    """Write demo weights and a layout tagged ``demo`` under ``base``; return the layout dir."""
    weights = base / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    layout = LayoutWriter(base / "layout")
    layers = []
    per_file = max(1, total // files)
    for n in range(files):
        path = weights / f"model-{n + 1:05d}-of-{files:05d}.safetensors"
        with open(path, "wb") as f:
            left = per_file
            while left:
                block = os.urandom(min(left, 4 << 20))
                f.write(block)
                left -= len(block)
        digest, size = layout.add_file(path)
        layers.append(descriptor(WEIGHT, digest, size, annotations={FILEPATH: path.name}))
    config = {"architectures": ["DemoForCausalLM"], "num_hidden_layers": files}
    (weights / "config.json").write_text(json.dumps(config, indent=2))
    digest, size = layout.add_file(weights / "config.json")
    layers.append(descriptor(WEIGHT_CONFIG, digest, size, annotations={FILEPATH: "config.json"}))
    model_config = layout.add_json(
        {"descriptor": {"name": "demo"}, "config": {"format": "safetensors"},
         "modelfs": {"type": "layers", "diffIds": [layer["digest"] for layer in layers]}},
        MODEL_CONFIG,
    )
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "artifactType": ARTIFACT, "config": model_config, "layers": layers}
    layout.tag(layout.add_json(manifest, OCI_MANIFEST, artifactType=ARTIFACT), "demo")
    return layout.root
