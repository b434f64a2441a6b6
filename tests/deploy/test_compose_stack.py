"""deploy/docker-compose.yml and deploy/prometheus.yml, checked without docker: the stack's pieces point at
each other (build context, scrape target, mounted files), the GPU is reserved and no key is written down."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from chart_render import ROOT

DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _binds(service: dict) -> list[tuple[Path, str]]:
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out.append(((DEPLOY / source).resolve(), target))
    return out


def test_services(compose):
    assert set(compose["services"]) == {"mygpt", "prometheus", "grafana"}
    named = {v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])}
    declared = set(compose.get("volumes") or {})
    assert {n for n in named if not n.startswith((".", "/"))} <= declared


def test_mygpt_builds_the_repo_s_image_and_reserves_a_gpu(compose):
    mygpt = compose["services"]["mygpt"]
    context = (DEPLOY / mygpt["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / mygpt["build"]["dockerfile"]).is_file()
    (device,) = mygpt["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "8000:8000" in mygpt["ports"]
    targets = {target for _, target in _binds(mygpt)} | {v.split(":")[1] for v in mygpt["volumes"]}
    assert {"/var/cache/mygpt", "/data/adapters"} <= targets  # the image's MYGPT_CACHE_DIR, MYGPT_ADAPTER_DIR


def test_stop_grace_covers_the_drain(compose):
    mygpt = compose["services"]["mygpt"]
    drain = float(mygpt["environment"]["MYGPT_SHUTDOWN_TIMEOUT_S"])
    assert int(mygpt["stop_grace_period"].removesuffix("s")) > drain


def test_no_key_is_written_down(compose):
    env = compose["services"]["mygpt"]["environment"]
    for name, value in env.items():
        if "KEY" in name:
            assert re.fullmatch(r"\$\{[A-Z_]+(:\?[^}]*)?\}", value), (
                f"{name} must come from the shell or .env"
            )


def test_prometheus_scrapes_mygpt(compose):
    prometheus = compose["services"]["prometheus"]
    (config_mount,) = [
        (src, dst) for src, dst in _binds(prometheus) if dst == "/etc/prometheus/prometheus.yml"
    ]
    config = yaml.safe_load(config_mount[0].read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "mygpt"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["mygpt:8000"]  # the compose service name and the image's MYGPT_PORT


def test_mounted_files_exist(compose):
    missing = {src for s in compose["services"].values() for src, _ in _binds(s) if not src.exists()}
    missing.discard((ROOT / "adapters").resolve())  # the adapter store: created by docker if absent
    assert not missing, f"compose mounts paths that do not exist: {missing}"
