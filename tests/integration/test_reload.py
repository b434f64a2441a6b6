"""Reloading the tenancy config without a restart (POST /v1/admin/reload and SIGHUP): rotated keys,
added and removed tenants, changed limits, declared adapters; a bad config changes nothing."""

from __future__ import annotations

import json
import shutil
import signal
import time

import httpx
import openai
import pytest
from test_wire import assert_openai_error

from conftest import ServerProcess
from mygpt.lora.synthetic import make_adapter
from mygpt.tenancy.config import hash_key

MODEL = "tiny"
HI = [{"role": "user", "content": "Hi"}]
ADMIN = "sk-reload-admin-0123456789abcdef"
KEY = {n: f"sk-reload-{n}-0123456789abcdef" for n in ("acme1", "acme2", "globex", "newco", "late")}


def config(tenants: dict) -> str:
    return json.dumps({"admin_keys": [f"sha256:{hash_key(ADMIN)}"], "tenants": tenants})


def works(server, key: str, model: str = MODEL) -> bool:
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)
    try:
        c.chat.completions.create(model=model, messages=HI, max_tokens=2, temperature=0)
        return True
    except openai.AuthenticationError:
        return False


def reload(server, key: str = ADMIN) -> httpx.Response:
    return httpx.post(
        server.base_url + "/v1/admin/reload", headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


@pytest.fixture
def server(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    make_adapter(tiny_model_dir, store / "acme" / "support", 8, ["q_proj", "v_proj"], seed=31)
    make_adapter(tiny_model_dir, store / "newco" / "helper", 8, ["q_proj", "v_proj"], seed=32)
    path = tmp_path / "mygpt.yaml"
    path.write_text(
        config(
            {
                "acme": {"keys": [f"sha256:{hash_key(KEY['acme1'])}"], "adapters": {"support": {}}},
                "globex": {"keys": [f"sha256:{hash_key(KEY['globex'])}"]},
            }
        )
    )
    srv = ServerProcess(
        "--model", str(tiny_model_dir), "--served-model-name", MODEL, "--config", str(path),
        "--adapter-dir", str(store), "--max-loras", "2", "--no-finetune", name="reload",
    ).wait_ready()  # fmt: skip
    srv.config_path = path
    yield srv
    srv.stop()


def test_reload_rotates_keys_and_changes_tenants_and_limits(server):
    assert works(server, KEY["acme1"]) and works(server, KEY["globex"]) and not works(server, KEY["newco"])
    server.config_path.write_text(
        config(
            {
                "acme": {"keys": [f"sha256:{hash_key(KEY['acme2'])}"], "limits": {"requests_per_minute": 2}},
                "newco": {
                    "keys": [f"sha256:{hash_key(KEY['newco'])}"],
                    "adapters": {"helper": {"pinned": True}},
                },
            }
        )
    )
    assert_openai_error(reload(server, KEY["acme1"]), 403)  # a tenant key may not reload
    r = reload(server)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["added"] == ["newco"] and body["removed"] == ["globex"] and body["limits_changed"] == ["acme"]
    assert body["adapter_errors"] == [] and sorted(body["tenants"]) == ["acme", "newco"]
    assert not works(server, KEY["acme1"]) and not works(server, KEY["globex"])  # rotated, removed
    assert works(server, KEY["acme2"]) and works(server, KEY["newco"], "helper")
    with pytest.raises(openai.RateLimitError):  # 2 a minute: one used above, one here, the third refused
        for _ in range(2):
            works(server, KEY["acme2"])
    # a declared adapter follows the config: a new path is a new version, removed is unloaded
    helper_v2 = server.config_path.parent / "store" / "newco" / "helper-v2"
    shutil.copytree(server.config_path.parent / "store" / "newco" / "helper", helper_v2)
    newco = {"keys": [f"sha256:{hash_key(KEY['newco'])}"], "adapters": {"helper": {"path": "helper-v2"}}}
    server.config_path.write_text(config({"newco": newco}))
    assert reload(server).json()["adapter_errors"] == []
    listed = httpx.get(
        server.base_url + "/v1/admin/adapters", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60
    ).json()["data"]
    [helper] = [a for a in listed if a["name"] == "helper"]
    assert helper["path"].endswith("helper-v2") and helper["version"] == 2 and not helper["pinned"]
    server.config_path.write_text(config({"newco": {"keys": newco["keys"]}}))
    assert reload(server).status_code == 200
    with pytest.raises(openai.NotFoundError):
        works(server, KEY["newco"], "helper")
    # a bad config changes nothing
    server.config_path.write_text("tenants: {acme: {keys: [42], nonsense: true}}")
    r = reload(server)
    assert_openai_error(r, 400)
    assert r.json()["error"]["code"] == "invalid_config"
    assert works(server, KEY["newco"]) and not works(server, KEY["late"])


def test_sighup_reloads(server):
    server.config_path.write_text(config({"late": {"keys": [f"sha256:{hash_key(KEY['late'])}"]}}))
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while not works(server, KEY["late"]):
        assert time.monotonic() < deadline, server.log()[-2000:]
        time.sleep(0.2)
    assert server.proc.poll() is None and not works(server, KEY["acme1"])
    assert "tenancy reloaded" in server.log()
