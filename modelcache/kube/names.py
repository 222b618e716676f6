"""The ModelPrewarm API (daemonset/crd-modelprewarm.yaml) and the warm-node label, by name.

The label a node carries while it holds a model warm is
``modelcache.io/warm-<h>`` = ``"true"``, where ``<h>`` is the first 10 hex
digits of sha256 over the model's resolved digest as text
(``sha256:<64 hex>``): short enough for a label key's 63-character name,
stable for one model whatever reference named it, and computable by anyone
who knows the digest (``modelcache ls`` shows it) with :func:`warm_label`.
"""

from __future__ import annotations

import hashlib

GROUP = "modelcache.io"
VERSION = "v1alpha1"
KIND = "ModelPrewarm"
PLURAL = "modelprewarms"
API_VERSION = f"{GROUP}/{VERSION}"

LABEL_PREFIX = f"{GROUP}/warm-"
STATES = ("Pending", "Pulling", "Ready", "Failed")  # a node's state in status.nodes


def warm_label(model_digest: str) -> str:
    """The node label key saying the model with this resolved digest (``sha256:...``) is warm there."""
    return LABEL_PREFIX + hashlib.sha256(model_digest.encode()).hexdigest()[:10]


def scale_selector(namespace: str, name: str) -> str:
    """``status.selector`` of a ModelPrewarm: the HPA wants a label selector on the scale subresource
    (it targets ``spec.count``); this one names the resource (a hash: names outgrow label values) and
    selects no pod, which an Object or External metric does not need."""
    return f"{GROUP}/prewarm=" + hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:16]


def pin_owner(namespace: str, name: str) -> str:
    """The owner of the store pins a ModelPrewarm holds (``prewarm:<namespace>/<name>``)."""
    return f"prewarm:{namespace}/{name}"
