"""The real chart (helm/mygpt), rendered with default and full values, validated against the Kubernetes
schemas and checked for what matters in a GPU deployment: the GPU limit, probes, the SIGTERM drain fitting
in the grace period, and keys that come only from a Secret."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_render import CHART, ROOT, Rendered, RenderError, render, schema_errors, validate_manifest

from mygpt.config import Settings

# Settings the chart sets itself (mounts, bind address) or refuses (keys): not in values.settings.
CHART_OWNED = {"host", "cache_dir", "adapter_dir", "config", "keys_dir"}
KEY_SETTINGS = {"api_key", "admin_key"}

FULL_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/ml/mygpt", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry"}],
    "fullnameOverride": "gpt",
    "replicaCount": 3,
    "settings": {
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "served_model_name": "qwen-7b",
        "quantization": "nf4",
        "dtype": "bfloat16",
        "device": "cuda",
        "revision": "main",
        "max_model_len": 8192,
        "max_num_seqs": 32,
        "max_num_batched_tokens": 2048,
        "max_waiting": 1000000,  # whole numbers must not come out as 1e+06
        "warmup": False,
        "stall_timeout_s": 300,
        "max_loras": 16,
        "max_lora_rank": 64,
        "port": 9000,
        "keepalive_s": 7.5,
        "shutdown_timeout_s": 45.5,
        "log_level": "warning",
    },
    "tenancy": {
        "config": {
            "limits": {"requests_per_minute": 600},
            "tenants": {
                "acme": {
                    "limits": {"requests_per_minute": 60, "tokens_per_minute": 50000, "max_concurrent": 4},
                    "adapters": {"support": {"path": "support-v3", "pinned": True}},
                },
                "globex": {},
            },
        }
    },
    "keys": {"existingSecret": "mygpt-api-keys"},
    "hfToken": {"existingSecret": "hf", "key": "token"},
    "gpu": {"count": 1, "resourceName": "nvidia.com/mig-3g.40gb"},  # a MIG slice
    "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "96Gi"}},
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "mygpt"}},
                    },
                }
            ]
        }
    },
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "mygpt"}},
        }
    ],
    "priorityClassName": "inference",
    "runtimeClassName": "nvidia",
    "persistence": {
        "cache": {"enabled": False, "emptyDirSizeLimit": "80Gi"},
        "adapters": {"existingClaim": "shared-adapters"},
    },
    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
    "probes": {"startup": {"failureThreshold": 360}},
    "shutdown": {"preStopSleepSeconds": 15, "terminationGracePeriodSeconds": 120},
    "service": {"type": "LoadBalancer", "port": 80, "annotations": {"example.com/internal": "true"}},
    "serviceAccount": {"name": "gpt-sa", "annotations": {"iam.example.com/role": "gpt"}},
    "podAnnotations": {"example.com/team": "ml"},
    "podLabels": {"team": "ml"},
    "extraEnv": [{"name": "TRANSFORMERS_OFFLINE", "value": "1"}],
    "extraVolumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],
    "extraVolumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8, "targetWaitingPerPod": 2},
    "podDisruptionBudget": {"maxUnavailable": "25%"},
    "grafanaDashboard": {"namespace": "monitoring"},
}

TENANT_VALUES: dict[str, Any] = {
    "tenancy": FULL_VALUES["tenancy"],
    "keys": {"generate": {"enabled": True, "tenants": [], "admin": True}},
}


@pytest.fixture(scope="module")
def default() -> Rendered:
    return render()


@pytest.fixture(scope="module")
def full() -> Rendered:
    return render(FULL_VALUES)


@pytest.fixture(scope="module")
def tenants() -> Rendered:
    return render(TENANT_VALUES)


@pytest.fixture(params=["default", "full", "tenants"])
def any_render(request) -> Rendered:
    return request.getfixturevalue(request.param)


def container(r: Rendered) -> dict[str, Any]:
    (c,) = r.one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def pod_spec(r: Rendered) -> dict[str, Any]:
    return r.one("Deployment")["spec"]["template"]["spec"]


def settings_env(r: Rendered) -> dict[str, str]:
    return r.one("ConfigMap", "-settings")["data"]


# --- the values schema ---


def test_values_yaml_and_full_values_pass_the_schema(any_render):
    assert schema_errors(any_render.values) == []


def test_schema_settings_are_the_settings_object_one_to_one():
    schema = json.loads((CHART / "values.schema.json").read_text())
    chart_settings = schema["properties"]["settings"]["properties"]
    fields = Settings.model_json_schema()["properties"]
    missing = set(fields) - CHART_OWNED - KEY_SETTINGS - set(chart_settings)
    stale = set(chart_settings) - set(fields)
    assert not missing, f"Settings fields missing from helm/mygpt/values.schema.json settings: {missing}"
    assert not stale, f"values.schema.json settings that Settings no longer has: {stale}"
    for name, field in fields.items():
        if name in chart_settings and "enum" in field:
            assert chart_settings[name]["enum"] == field["enum"], name
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values["settings"]) <= set(chart_settings)


@pytest.mark.parametrize(
    "bad",
    [
        {"settings": {"api_key": "sk-plain-key-in-values-1234"}},
        {"settings": {"admin_key": "sk-plain-key-in-values-1234"}},
        {"settings": {"host": "127.0.0.1"}},
        {"settings": {"adapter_dir": "/elsewhere"}},
        {"settings": {"quantization": "int8"}},
        {"settings": {"max_num_seqs": 0}},
        {"tenancy": {"config": {"admin_keys": ["sk-plain-key-in-values-1234"]}}},
        {"tenancy": {"config": {"tenants": {"acme": {"keys": ["sk-plain-key-in-values-1234"]}}}}},
        {"tenancy": {"config": {"tenants": {"Bad Name": {}}}}},
        {"keys": {"acme": "sk-plain-key-in-values-1234"}},
        {"keys": {"generate": {"tenants": ["admin"]}}},
        {"gpu": {"count": -1}},
        {"setings": {"model": "typo"}},
    ],
    ids=lambda v: json.dumps(v)[:60],
)
def test_schema_refuses(bad):
    merged = _merged(bad)
    assert schema_errors(merged), f"the schema accepted {bad}"


def _merged(over: dict[str, Any]) -> dict[str, Any]:
    from chart_render import coalesce

    return coalesce(yaml.safe_load((CHART / "values.yaml").read_text()), over)


# --- Kubernetes schemas ---


def test_every_manifest_passes_the_kubernetes_schemas(any_render):
    assert any_render.docs
    errors = [e for doc in any_render.docs for e in validate_manifest(doc)]
    assert errors == []


def test_the_validator_does_catch_mistakes(default):
    deployment = json.loads(json.dumps(default.one("Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/live"
    assert validate_manifest(deployment)


def test_kinds(default, full):
    kinds = lambda r: sorted(d["kind"] for d in r.docs)  # noqa: E731
    assert kinds(default) == sorted(
        ["ConfigMap", "ConfigMap", "Deployment", "PersistentVolumeClaim", "PersistentVolumeClaim",
         "PodDisruptionBudget", "Secret", "Service", "ServiceAccount"]  # ConfigMaps: settings, dashboard
    )  # fmt: skip
    assert kinds(full) == sorted(
        ["ConfigMap", "ConfigMap", "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
         "Service", "ServiceAccount", "ServiceMonitor"]  # ConfigMaps: settings, tenancy, dashboard
    )  # fmt: skip


# --- GPU, probes, port ---


def test_gpu_limit(default, full):
    assert container(default)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container(full)["resources"]["limits"]["nvidia.com/mig-3g.40gb"] == 1
    assert "nvidia.com/gpu" not in container(full)["resources"]["limits"]
    assert container(full)["resources"]["limits"]["memory"] == "96Gi"
    cpu_only = render({"gpu": {"count": 0}})
    assert "nvidia.com/gpu" not in container(cpu_only)["resources"].get("limits", {})


def test_gpu_scheduling(default, full):
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(default)[
        "tolerations"
    ]
    assert pod_spec(full)["nodeSelector"] == FULL_VALUES["nodeSelector"]
    assert pod_spec(full)["runtimeClassName"] == "nvidia"


def test_probes_hit_live_and_ready_on_the_server_port(any_render):
    c = container(any_render)
    port = int(settings_env(any_render)["MYGPT_PORT"])
    (named,) = [p for p in c["ports"] if p["name"] == "http"]
    assert named["containerPort"] == port
    paths = {
        probe: c[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert paths == {"startupProbe": "/ready", "readinessProbe": "/ready", "livenessProbe": "/live"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", port)
    assert settings_env(any_render)["MYGPT_HOST"] == "0.0.0.0"
    service = any_render.one("Service")
    assert service["spec"]["ports"][0]["targetPort"] in ("http", port)


def test_start_budget_covers_a_first_start(default, full):
    startup = container(default)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    startup = container(full)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 3600


def test_entry_point_is_the_image_s(any_render):
    c = container(any_render)
    assert "command" not in c and "args" not in c, "the image's ENTRYPOINT (mygpt serve) must run"


# --- SIGTERM drain ---


def _prestop_sleep(c: dict[str, Any]) -> int:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


def test_grace_period_covers_prestop_and_drain(any_render):
    c = container(any_render)
    drain = float(settings_env(any_render).get("MYGPT_SHUTDOWN_TIMEOUT_S", Settings().shutdown_timeout_s))
    grace = pod_spec(any_render)["terminationGracePeriodSeconds"]
    assert grace >= _prestop_sleep(c) + drain


def test_grace_period_is_derived_from_the_settings():
    r = render({"settings": {"shutdown_timeout_s": 12.5}, "shutdown": {"preStopSleepSeconds": 7}})
    assert pod_spec(r)["terminationGracePeriodSeconds"] == 7 + 13 + 5
    assert settings_env(r)["MYGPT_SHUTDOWN_TIMEOUT_S"] == "12.5"


def test_a_grace_period_too_short_for_the_drain_fails_the_render():
    with pytest.raises(RenderError, match="terminationGracePeriodSeconds=30 is shorter"):
        render({"shutdown": {"preStopSleepSeconds": 10, "terminationGracePeriodSeconds": 30}})


# --- settings: one to one, readable by the server ---


def test_settings_render_one_to_one(any_render):
    env = settings_env(any_render)
    for key, value in any_render.values["settings"].items():
        expected = str(value).lower() if isinstance(value, bool) else str(value)
        assert env[f"MYGPT_{key.upper()}"] == expected, key
    assert env["MYGPT_MAX_WAITING"] == str(any_render.values["settings"]["max_waiting"])


def test_the_server_accepts_the_rendered_settings(any_render, monkeypatch):
    for key in [k for k in os.environ if k.startswith("MYGPT_")]:
        monkeypatch.delenv(key)
    for key, value in settings_env(any_render).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.host == "0.0.0.0"
    for key, value in any_render.values["settings"].items():
        assert getattr(settings, key) == value, key


def test_chart_owned_settings_are_refused():
    with pytest.raises(RenderError, match="set by the chart"):
        render({"settings": {"cache_dir": "/elsewhere"}})


def test_settings_changes_roll_the_pods(default):
    changed = render({"settings": {"max_num_seqs": 8}})
    key = "checksum/settings"
    annotations = lambda r: r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]  # noqa: E731
    assert annotations(default)[key] != annotations(changed)[key]


# --- volumes ---


def _mounts(r: Rendered) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container(r)["volumeMounts"]}


def _volumes(r: Rendered) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(r)["volumes"]}


def test_model_cache_and_adapter_store_are_volumes(default, full):
    for r in (default, full):
        env = settings_env(r)
        mounts = _mounts(r)
        assert env["HF_HOME"].startswith(env["MYGPT_CACHE_DIR"] + "/")
        for path in (env["MYGPT_CACHE_DIR"], env["MYGPT_ADAPTER_DIR"]):
            assert path in mounts, path
    claims = {p["metadata"]["name"] for p in default.all("PersistentVolumeClaim")}
    assert claims == {"demo-mygpt-cache", "demo-mygpt-adapters"}
    assert _volumes(default)["cache"]["persistentVolumeClaim"]["claimName"] == "demo-mygpt-cache"
    assert _volumes(full)["cache"]["emptyDir"] == {"sizeLimit": "80Gi"}
    assert _volumes(full)["adapters"]["persistentVolumeClaim"]["claimName"] == "shared-adapters"
    assert full.all("PersistentVolumeClaim") == []


# --- keys: only from a Secret ---

KEYISH = re.compile(r"(\bsk-[A-Za-z0-9_-]{16,}|sha256:[0-9a-f]{64})")


def _secret_values(r: Rendered) -> list[str]:
    return [base64.b64decode(v).decode() for s in r.all("Secret") for v in s.get("data", {}).values()]


def test_keys_come_only_from_a_secret(any_render):
    r = any_render
    env = settings_env(r)
    assert not {"MYGPT_API_KEY", "MYGPT_ADMIN_KEY"} & set(env)
    keys_dir = env["MYGPT_KEYS_DIR"]
    mount = _mounts(r)[keys_dir]
    assert mount.get("readOnly") is True
    secret_name = _volumes(r)[mount["name"]]["secret"]["secretName"]
    expected = (
        FULL_VALUES["keys"]["existingSecret"] if r.values["keys"]["existingSecret"] else "demo-mygpt-keys"
    )
    assert secret_name == expected
    # no key material in any ConfigMap or env value
    secrets = _secret_values(r)
    for cm in r.all("ConfigMap"):
        if cm["metadata"]["name"].endswith("-dashboard"):
            continue
        text = yaml.safe_dump(cm["data"])
        assert not KEYISH.search(text), cm["metadata"]["name"]
        assert not any(s in text for s in secrets)
    for item in container(r).get("env", []):
        assert "value" not in item or not KEYISH.search(item["value"]), item
        assert not item["name"].endswith("_KEY") or "valueFrom" in item, item
    tenancy = r.all("ConfigMap")
    for cm in tenancy:
        if "tenancy.yaml" in cm["data"]:
            config = yaml.safe_load(cm["data"]["tenancy.yaml"])
            assert "admin_keys" not in config
            assert all("keys" not in (t or {}) for t in config.get("tenants", {}).values())


def test_generated_keys_are_random_and_not_in_values(default):
    (secret,) = default.all("Secret")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    (key,) = _secret_values(default)
    assert key.startswith("sk-mygpt-") and len(key) == 52  # the shape of `mygpt keygen` keys
    assert key not in json.dumps(default.values)
    assert _secret_values(render()) != [key]


def test_the_server_accepts_the_tenancy_config_and_generated_keys(tenants, tmp_path):
    from mygpt.tenancy.config import hash_key, load_tenancy

    config = tmp_path / "tenancy.yaml"
    config.write_text(tenants.one("ConfigMap", "-tenancy")["data"]["tenancy.yaml"])
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    (secret,) = tenants.all("Secret")
    for name, value in secret["data"].items():
        (keys_dir / name).write_bytes(base64.b64decode(value))
    tenancy = load_tenancy(config, keys_dir)
    assert set(tenancy.tenants) == {"acme", "globex"}
    assert tenancy.tenants["acme"].adapters["support"].pinned is True
    owners = {
        name: tenancy.key_hashes[hash_key((keys_dir / name).read_text().strip())]
        for name in ("acme", "globex", "admin")
    }
    assert owners == {"acme": "acme", "globex": "globex", "admin": None}
    env = settings_env(tenants)
    assert env["MYGPT_CONFIG"] == str(Path(_mount_of(tenants, "tenancy")) / "tenancy.yaml")


def _mount_of(r: Rendered, volume: str) -> str:
    (m,) = [m for m in container(r)["volumeMounts"] if m["name"] == volume]
    return m["mountPath"]


def test_generating_a_key_for_an_unknown_tenant_fails():
    with pytest.raises(RenderError, match="not a tenant of tenancy.config"):
        render(
            {**TENANT_VALUES, "keys": {"generate": {"enabled": True, "tenants": ["initech"], "admin": False}}}
        )


def test_keys_in_the_tenancy_config_fail_the_render_too():
    with pytest.raises(RenderError, match="keys come only from the keys Secret"):
        render({"tenancy": {"config": {"tenants": {"acme": {"keys": ["sha256:" + "0" * 64]}}}}})


def test_hub_token_comes_from_a_secret(full):
    (token,) = [e for e in container(full)["env"] if e["name"] == "HF_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}


# --- scaling, monitoring ---


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_service_pdb_and_monitor_select_the_pods(any_render):
    r = any_render
    pod_labels = r.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert _selects(r.one("Service")["spec"]["selector"], pod_labels)
    assert _selects(r.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    for monitor in r.all("ServiceMonitor"):
        service = r.one("Service")
        assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_hpa_scales_the_deployment_on_waiting_requests(default, full):
    assert default.all("HorizontalPodAutoscaler") == []
    assert default.one("Deployment")["spec"]["replicas"] == 1
    hpa = full.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gpt"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "mygpt_num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "2"}
    assert "replicas" not in full.one("Deployment")["spec"], "the HPA owns the replica count"


def test_prometheus_annotations_point_at_the_metrics_port(default):
    annotations = default.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == settings_env(default)["MYGPT_PORT"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_pod_runs_as_the_image_s_non_root_user(any_render):
    security = pod_spec(any_render)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001  # the Dockerfile's USER (tests/deploy/test_dockerfile.py)
    assert container(any_render)["securityContext"]["allowPrivilegeEscalation"] is False


# --- Grafana dashboard ---

DASHBOARD_SOURCE = ROOT / "deploy" / "grafana" / "dashboards" / "mygpt.json"


def test_dashboard_configmap_renders_only_with_a_dashboard(default, tmp_path):
    assert sorted((CHART / "dashboards").glob("*.json")) == [CHART / "dashboards" / "mygpt.json"]
    real = render({"grafanaDashboard": {"namespace": "monitoring"}})
    assert json.loads(real.one("ConfigMap", "-dashboard")["data"]["mygpt.json"])["uid"] == "mygpt-overview"
    chart = tmp_path / "mygpt"
    shutil.copytree(CHART, chart)
    (chart / "dashboards" / "mygpt.json").write_text(json.dumps({"title": "mygpt", "panels": []}))
    r = render({"grafanaDashboard": {"namespace": "monitoring"}}, chart=chart)
    cm = r.one("ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert json.loads(cm["data"]["mygpt.json"])["title"] == "mygpt"
    assert validate_manifest(cm) == []
    off = render({"grafanaDashboard": {"enabled": False}}, chart=chart)
    assert not [c for c in off.all("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]


def test_chart_dashboard_is_a_copy_of_deploy_s():
    chart_copy = CHART / "dashboards" / "mygpt.json"
    assert chart_copy.read_bytes() == DASHBOARD_SOURCE.read_bytes(), "stale: run scripts/make_dashboard.py"


# --- NOTES.txt ---


def test_notes(default, full, tenants):
    if default.notes is None:
        pytest.skip("real helm prints NOTES.txt only on install")
    assert "kubectl -n mygpt get secret demo-mygpt-keys -o jsonpath='{.data.default}'" in default.notes
    assert "WARNING" not in default.notes
    assert "prometheus-adapter" in full.notes
    assert "get secret mygpt-api-keys" in full.notes
    for tenant in ("acme", "globex"):
        assert f"{{.data.{tenant}}}" in tenants.notes
    shared = render({"replicaCount": 2})
    assert "WARNING: up to 2 replicas share the cache claim" in shared.notes
    open_tenant = render({"keys": {"generate": {"enabled": False}}})
    assert 'open tenant "default"' in open_tenant.notes
