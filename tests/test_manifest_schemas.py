"""Every manifest under daemonset/ validates against the schemas of a recent Kubernetes release.

- Built-in kinds: ``kubernetes-validate`` (its bundled OpenAPI schemas, offline)
  in strict mode, so a misspelt or misplaced field fails as the API server's
  strict field validation would reject it. Every YAML file under daemonset/
  is picked up (base, examples, the CRD), and so is the kustomize output.
- Custom kinds (ModelPrewarm): the ``openAPIV3Schema`` of the CRD found under
  daemonset/, as structural schemas validate them: unknown fields are errors
  unless the schema preserves them, plus the schema's own rules (required,
  minimum, enum...). Without a CRD in the tree, those tests skip and say so.
- ``kubectl kustomize daemonset/`` renders, and an overlay's ``images:``
  replaces the daemon's image (the README's deploy step).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelcache.prewarmctl import GROUP, KIND, VERSION, build_spec
from modelcache.refs import parse

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parent.parent / "daemonset"
# The release the manifests are checked against: a recent one whose schemas kubernetes-validate ships.
K8S_VERSION = "1.34.0"
NOT_OBJECTS = {"kustomization.yaml", "kustomization.yml"}  # kustomize's own configuration
WARM_LABEL = r"modelcache\.io/warm-[0-9a-f]{10}"


def _files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*") if p.suffix in (".yaml", ".yml") and p.name not in NOT_OBJECTS)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_docs() -> list[tuple[str, dict]]:
    return [(str(p.relative_to(ROOT)), d) for p in _files() for d in _docs(p)]


def _is_custom(doc: dict) -> bool:
    return str(doc.get("apiVersion", "")).split("/")[0] == GROUP


@cache
def _rendered() -> str | None:
    if not shutil.which("kubectl"):
        return None
    out = subprocess.run(["kubectl", "kustomize", str(ROOT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _crds() -> dict[tuple[str, str], dict]:
    """(group, kind) -> CustomResourceDefinition, from every YAML file under daemonset/."""
    return {(d["spec"]["group"], d["spec"]["names"]["kind"]): d for _, d in _all_docs()
            if d.get("kind") == "CustomResourceDefinition"}


def _strict(schema: Any) -> Any:
    """A structural schema as JSON Schema that refuses unknown fields (what the API server prunes or rejects)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) if k in ("properties", "items", "additionalProperties", "allOf", "anyOf", "oneOf", "not")
           else v for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    return out


def validate_custom(doc: dict, crd: dict) -> None:
    """``doc`` against the served version of ``crd`` it names; ``jsonschema.ValidationError`` if not valid."""
    version = doc["apiVersion"].split("/", 1)[1]
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served", True)]
    schema = copy.deepcopy(served["schema"]["openAPIV3Schema"])
    # metadata is the API server's ObjectMeta, checked there and not by the CRD's schema.
    schema.setdefault("properties", {})["metadata"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    schema["properties"].setdefault("apiVersion", {"type": "string"})
    schema["properties"].setdefault("kind", {"type": "string"})
    jsonschema.Draft4Validator(_strict(schema)).validate(doc)


# -- built-in kinds, with kubernetes-validate ----------------------------------------------------


def _builtin_cases() -> list[Any]:
    return [pytest.param(d, id=f"{name}:{d.get('kind')}/{d.get('metadata', {}).get('name')}")
            for name, d in _all_docs() if not _is_custom(d)]


@pytest.mark.parametrize("doc", _builtin_cases())
def test_manifest_validates_strictly(doc: dict) -> None:
    """Each built-in object in each YAML file: the release's schema, unknown fields refused."""
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_rendered_base_validates_strictly() -> None:
    """What `kubectl kustomize daemonset/` renders (namespace and image set by kustomize) validates too."""
    rendered = _rendered()
    if rendered is None:
        pytest.skip("kubectl not installed (Kubernetes' own apt repository, pkgs.k8s.io, or a release binary)")
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    assert {"DaemonSet", "CSIDriver", "ClusterRole"} <= {d["kind"] for d in docs}
    for doc in docs:
        if not _is_custom(doc):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_mode_refuses_unknown_fields() -> None:
    """The check has teeth: a misplaced field in a container, which the non-strict mode would let through."""
    [pod] = _docs(ROOT / "examples" / "pod-csi-inline.yaml")
    pod = copy.deepcopy(pod)
    pod["spec"]["containers"][0]["mountPath"] = "/models"  # belongs in volumeMounts
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_kustomize_overlay_sets_the_image(tmp_path: Path) -> None:
    """An overlay's `images:` entry replaces the daemon's image, as the README's deploy steps do."""
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT, tmp_path)],  # kustomize takes a base by relative path only
        "images": [{"name": "modelcache", "newName": "registry.example.com/platform/modelcache", "newTag": "0.1.0"}]}))
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    [ds] = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "DaemonSet"]
    images = {c["name"]: c["image"] for c in ds["spec"]["template"]["spec"]["containers"]}
    assert images["modelcache"] == "registry.example.com/platform/modelcache:0.1.0"


# -- custom kinds, against the CRD's own schema --------------------------------------------------


def _custom_cases() -> list[Any]:
    return [pytest.param(d, id=f"{name}:{d['kind']}/{d['metadata']['name']}") for name, d in _all_docs()
            if _is_custom(d)]


def test_there_is_an_example_modelprewarm() -> None:
    """examples/ shows the resource, with a model reference `pull` takes."""
    examples = [d for d in _docs(ROOT / "examples" / "modelprewarm.yaml") if d["kind"] == KIND]
    assert examples and all(d["apiVersion"] == f"{GROUP}/{VERSION}" for d in examples)
    for example in examples:
        parse(example["spec"]["model"])
        assert example["spec"]["count"] >= 1 and example["metadata"]["namespace"]


@pytest.mark.parametrize("doc", _custom_cases())
def test_custom_resource_validates_against_its_crd(doc: dict) -> None:
    """Each ModelPrewarm under daemonset/ against the CRD's openAPIV3Schema (strict)."""
    crd = _crds().get((GROUP, doc["kind"]))
    if crd is None:
        pytest.skip(f"no CustomResourceDefinition for {doc['kind']} under daemonset/ yet "
                    "(crd-modelprewarm.yaml comes with the pre-warm controller)")
    validate_custom(doc, crd)


def test_the_cli_writes_what_the_crd_accepts() -> None:
    """`modelcache prewarm`'s spec, with every flag set and with none, passes the CRD; bad specs do not."""
    crd = _crds().get((GROUP, KIND))
    if crd is None:
        pytest.skip("no CustomResourceDefinition for ModelPrewarm under daemonset/ yet "
                    "(crd-modelprewarm.yaml comes with the pre-warm controller)")

    def obj(spec: dict) -> dict:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "m"}, "spec": spec}

    model = "oci://registry.example.com/models/llama:v1"
    validate_custom(obj(build_spec(model)), crd)
    validate_custom(obj(build_spec(model, include=["*.json"], exclude=["x/*"], selector=[("pool", "gpu")],
                                   count=2, pin=False)), crd)
    for bad in ({"pin": True}, {"model": model, "count": 0}, {"model": model, "nodes": 3}):
        with pytest.raises(jsonschema.ValidationError):
            validate_custom(obj(bad), crd)


def test_strict_crd_validation_has_teeth() -> None:
    """The CRD check itself, on a small CRD: required, minimum, unknown fields, preserved fields, status."""
    crd = {"spec": {"versions": [{"name": "v1", "served": True, "schema": {"openAPIV3Schema": {
        "type": "object", "properties": {
            "spec": {"type": "object", "required": ["model"], "properties": {
                "model": {"type": "string"}, "count": {"type": "integer", "minimum": 1},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}},
            "status": {"type": "object", "properties": {"ready": {"type": "integer"}}}}}}}]}}

    def obj(spec: dict) -> dict:
        return {"apiVersion": "g/v1", "kind": "K", "metadata": {"name": "n", "labels": {"a": "b"}}, "spec": spec}

    validate_custom(obj({"model": "m", "count": 1, "extra": {"anything": [1]}}), crd)
    for bad in ({"count": 1}, {"model": "m", "count": 0}, {"model": "m", "typo": 1}):
        with pytest.raises(jsonschema.ValidationError):
            validate_custom(obj(bad), crd)
    with pytest.raises(ValueError):
        validate_custom({**obj({"model": "m"}), "apiVersion": "g/v2"}, crd)


# -- the warm-node affinity example ----------------------------------------------------------------


def test_pod_example_prefers_warm_nodes() -> None:
    """The example pod prefers nodes with a warm label (key modelcache.io/warm-<10 hex>, value "true")."""
    import re

    [pod] = _docs(ROOT / "examples" / "pod-prefer-warm.yaml")
    [term] = pod["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    [expression] = term["preference"]["matchExpressions"]
    assert re.fullmatch(WARM_LABEL, expression["key"]) and expression["operator"] == "In"
    assert expression["values"] == ["true"] and term["weight"] >= 1
    [prewarm] = _docs(ROOT / "examples" / "modelprewarm.yaml")
    [volume] = pod["spec"]["volumes"]
    assert volume["csi"]["volumeAttributes"]["model"] == prewarm["spec"]["model"]
    assert pod["metadata"]["namespace"] == prewarm["metadata"]["namespace"]


def test_autoscalers_can_scale_the_count() -> None:
    """HPA and KEDA scale a ModelPrewarm's count (README: autoscalers): the CRD serves /scale on spec.count."""
    crd = _crds().get((GROUP, KIND))
    if crd is None:
        pytest.skip("no CustomResourceDefinition for ModelPrewarm under daemonset/ yet "
                    "(crd-modelprewarm.yaml comes with the pre-warm controller)")
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
    scale = served.get("subresources", {}).get("scale") or {}
    assert scale.get("specReplicasPath") == ".spec.count", "add subresources.scale to the CRD (README: autoscalers)"
    assert scale.get("statusReplicasPath") == ".status.ready"
    # "Must be set to work with HorizontalPodAutoscaler" (CustomResourceSubresourceScale): a string selector.
    path = scale.get("labelSelectorPath", "")
    assert path.startswith(".status."), "the HPA needs labelSelectorPath (a label selector string in status)"
    status_schema = served["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status_schema["properties"][path.split(".")[2]]["type"] == "string"
