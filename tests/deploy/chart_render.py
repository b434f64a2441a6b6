"""Render helm/mygpt as `helm template` would, and validate what comes out.

The renderer is `helm` where it is on the PATH; otherwise tests/deploy/helmrender (Go text/template +
sprig, Debian packages golang-go and golang-github-masterminds-sprig-dev), built once into
test-artifacts/helmrender/<source hash>/.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "mygpt"
RENDERER_SRC = Path(__file__).resolve().parent / "helmrender" / "main.go"
ARTIFACTS = ROOT / "test-artifacts" / "helmrender"
GOPATH = "/usr/share/gocode"  # where Debian's golang-*-dev packages put their sources
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())  # Chart.yaml's floor, and the newest
# Kinds outside kubernetes-validate's schemas (CRDs), with the fields we check ourselves.
RENDER_KUBE_VERSION = "v1.30.0"  # .Capabilities.KubeVersion while rendering
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


class RenderError(Exception):
    """The chart failed to render (a `fail`, a `required`, a template error)."""


@dataclass
class Rendered:
    values: dict[str, Any]  # the merged values the templates saw
    docs: list[dict[str, Any]]  # every manifest, parsed
    notes: str | None  # NOTES.txt (None from real helm, which prints it only on install)
    sources: dict[int, str] = field(default_factory=dict)  # id(doc) -> template path

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [d for d in self.all(kind) if d["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, (
            f"expected one {kind} named *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
        )
        return found[0]


@cache
def renderer() -> tuple[str, Path]:
    """('helm', path) or ('helmrender', path to the built binary)."""
    if helm := shutil.which("helm"):
        return "helm", Path(helm)
    go = shutil.which("go")
    if go is None or not (Path(GOPATH) / "src/github.com/Masterminds/sprig").is_dir():
        # like the other system-package tests: a skip on a developer's machine, a failure in CI
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "rendering the chart needs helm on the PATH, or Go and sprig: "
            "apt-get install golang-go golang-github-masterminds-sprig-dev (make test does this as root)"
        )
    digest = hashlib.sha256(RENDERER_SRC.read_bytes()).hexdigest()[:12]
    binary = ARTIFACTS / digest / "helmrender"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOFLAGS": "",
               "GOCACHE": str(ARTIFACTS / "go-cache")}  # fmt: skip
        tmp = binary.with_suffix(f".tmp{os.getpid()}")
        proc = subprocess.run([go, "build", "-o", str(tmp), str(RENDERER_SRC)], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        if proc.returncode != 0:
            pytest.fail(f"building {RENDERER_SRC.relative_to(ROOT)} failed:\n{proc.stderr}")
        tmp.rename(binary)
    return "helmrender", binary


def render(
    values: dict[str, Any] | None = None,
    tmp_path: Path | None = None,
    chart: Path = CHART,
    name: str = "demo",
    namespace: str = "mygpt",
) -> Rendered:
    """Renders the chart with `values` over values.yaml; raises RenderError if the chart refuses."""
    kind, exe = renderer()
    work = tmp_path or Path(os.environ.get("TMPDIR", "/tmp"))
    values_file = work / f"values-{os.getpid()}-{id(values)}.yaml"
    values_file.write_text(yaml.safe_dump(values or {}))
    try:
        if kind == "helm":
            cmd = [str(exe), "template", name, str(chart), "-n", namespace, "-f", str(values_file),
                   "--kube-version", RENDER_KUBE_VERSION]  # fmt: skip
        else:
            cmd = [str(exe), "-chart", str(chart), "-name", name, "-namespace", namespace, "-strict",
                   "-values", str(values_file), "-kube-version", RENDER_KUBE_VERSION]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        values_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RenderError(proc.stderr.strip())
    if kind == "helm":
        merged = coalesce(yaml.safe_load((chart / "values.yaml").read_text()), values or {})
        sources = [("helm", proc.stdout)]
        notes = None
    else:
        out = json.loads(proc.stdout)
        merged, notes = out["values"], out["notes"]
        sources = [(m["source"], m["content"]) for m in out["manifests"]]
    rendered = Rendered(values=merged, docs=[], notes=notes)
    for source, text in sources:
        for doc in yaml.safe_load_all(text):
            if doc:  # `---` with nothing after it, or a template that rendered to comments only
                rendered.docs.append(doc)
                rendered.sources[id(doc)] = source
    return rendered


def coalesce(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of user values over chart values: maps merge, the rest replaces, null deletes."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = coalesce(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@cache
def values_schema() -> jsonschema.Draft7Validator:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(values: dict[str, Any]) -> list[str]:
    """What helm's values.schema.json check would say about these (merged) values."""
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in values_schema().iter_errors(values)
    ]


def validate_manifest(doc: dict[str, Any]) -> list[str]:
    """Errors from the Kubernetes schemas (strict: unknown fields are errors) for each KUBE_VERSIONS."""
    if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
        return _service_monitor_errors(doc)
    errors = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.absolute_path)
            errors.append(f"k8s {version}: {doc['kind']} {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"k8s {version}: no schema for {doc['apiVersion']} {doc['kind']}")
    return errors


def _service_monitor_errors(doc: dict[str, Any]) -> list[str]:
    # the Prometheus Operator's CRD, reduced to what the chart uses
    spec = doc.get("spec", {})
    errors = []
    if set(doc) - {"apiVersion", "kind", "metadata", "spec"}:
        errors.append(
            f"ServiceMonitor: unknown top-level fields {set(doc) - {'apiVersion', 'kind', 'metadata', 'spec'}}"
        )
    if not spec.get("selector", {}).get("matchLabels"):
        errors.append("ServiceMonitor: spec.selector.matchLabels is empty")
    for ep in spec.get("endpoints", []):
        unknown = set(ep) - {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
        if unknown or not isinstance(ep.get("port"), str):
            errors.append(f"ServiceMonitor endpoint {ep}: needs a named port; unknown fields {unknown}")
    if not spec.get("endpoints"):
        errors.append("ServiceMonitor: no endpoints")
    return errors
