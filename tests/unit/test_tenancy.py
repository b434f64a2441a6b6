"""Tenancy without a server: the config file and key sources, Bearer auth, limits, usage."""

from __future__ import annotations

import pytest

from mygpt.tenancy.auth import Authenticator
from mygpt.tenancy.config import ConfigError, Limits, hash_key, load_tenancy
from mygpt.tenancy.limits import RateLimited, TenantLimiter
from mygpt.tenancy.tenants import Tenants

KEY_A = "sk-acme-0123456789abcdef"
KEY_B = "sk-globex-0123456789abcdef"
ADMIN = "sk-admin-0123456789abcdef"


def write(tmp_path, text: str):
    path = tmp_path / "mygpt.yaml"
    path.write_text(text)
    return path


def test_keys_from_hashes_env_files_and_a_keys_dir(tmp_path):
    (tmp_path / "acme.key").write_text(KEY_A + "\n")
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "globex").write_text(f"# rotated 2026-11\n{KEY_B}\n")
    (keys / "admin").write_text(ADMIN)
    (keys / "..data").mkdir()  # what a mounted Secret also holds
    config = write(
        tmp_path,
        f"""
admin_keys: ["sha256:{hash_key("sk-other-admin-key-000")}"]
limits: {{requests_per_minute: 100}}
tenants:
  acme:
    keys: ["file:{tmp_path / "acme.key"}", "env:ACME_SECOND_KEY"]
    limits: {{max_concurrent: 2}}
  globex: {{}}
""",
    )
    tenancy = load_tenancy(config, keys, environ={"ACME_SECOND_KEY": "sk-acme-second-key-0000"})
    auth = Authenticator(tenancy)
    assert auth.authenticate(f"Bearer {KEY_A}").tenant == "acme"
    assert auth.authenticate("Bearer sk-acme-second-key-0000").tenant == "acme"
    assert auth.authenticate(f"bearer {KEY_B}").tenant == "globex"
    assert auth.authenticate(f"Bearer {ADMIN}").admin
    assert auth.authenticate("Bearer sk-other-admin-key-000").admin
    for bad in (None, "", "Bearer", "Bearer wrong-key-0000000000", f"Basic {KEY_A}", KEY_A):
        assert auth.authenticate(bad) is None
    # the tenant's limits are its own over the defaults
    assert tenancy.tenants["acme"].limits == Limits(requests_per_minute=100, max_concurrent=2)
    assert tenancy.tenants["globex"].limits == Limits(requests_per_minute=100)
    assert KEY_A not in str(tenancy) and ADMIN not in str(tenancy)  # only hashes are held


def test_without_a_config_one_open_tenant_unless_a_key_is_set():
    auth = Authenticator(load_tenancy(None))
    assert auth.authenticate(None).tenant == "default" and auth.authenticate("Bearer x").tenant == "default"
    assert not load_tenancy(None).admin_enabled
    locked = Authenticator(load_tenancy(None, api_key=KEY_A, admin_key=ADMIN))
    assert locked.authenticate(f"Bearer {KEY_A}").tenant == "default"
    assert locked.authenticate(f"Bearer {ADMIN}").admin
    assert locked.authenticate("Bearer nope") is None and locked.authenticate(None) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tenants: {Acme: {}}", "tenant name"),
        ("tenants: {admin: {}}", "tenant name"),
        ("tenants: {a: {keys: ['sha256:xyz']}}", "64 hex digits"),
        ("tenants: {a: {keys: ['short']}}", "at least 16"),
        ("tenants: {a: {keys: ['env:NOPE_NOT_SET']}}", "NOPE_NOT_SET is not set"),
        (f"tenants: {{a: {{keys: ['{KEY_A}']}}, b: {{keys: ['{KEY_A}']}}}}", "same key"),
        ("tenants: {a: {limits: {requests_per_minute: 0}}}", "requests_per_minute"),
        ("tenants: {a: {colour: blue}}", "colour"),
        ("tenants: [", "not valid YAML"),
        ("", "is empty"),  # (a file caught while it is rewritten: a reload keeps the old config)
        ("# all commented out\n", "is empty"),
        ("tenants: {a: {}}", "nobody could use"),  # no key at all: everyone locked out, the admin too
    ],
)
def test_bad_configs_say_where_and_why(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_tenancy(write(tmp_path, text))


def test_keys_dir_file_must_name_a_tenant(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "nobody").write_text(KEY_A)
    with pytest.raises(ConfigError, match="names no tenant"):
        load_tenancy(write(tmp_path, "tenants: {a: {}}"), keys)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_requests_per_minute_refills_and_says_when():
    clock = Clock()
    limiter = TenantLimiter("a", Limits(requests_per_minute=3), clock)
    for _ in range(3):
        limiter.admit()
        limiter.release()
    with pytest.raises(RateLimited) as err:
        limiter.admit()
    assert err.value.retry_after == "20" and "3 requests per minute" in str(err.value)
    clock.now += 20
    limiter.admit()  # one request's worth came back


def test_tokens_per_minute_charges_prompt_and_completion():
    clock = Clock()
    limiter = TenantLimiter("a", Limits(tokens_per_minute=600), clock)
    limiter.admit()
    limiter.charge(500)  # the prompt
    limiter.charge(250)  # the completion: into debt
    limiter.release()
    with pytest.raises(RateLimited, match="600 tokens per minute") as err:
        limiter.admit()
    assert err.value.retry_after_s == pytest.approx(15.0)  # 150 tokens of debt at 10 tokens/s
    clock.now += 15.1
    limiter.admit()


def test_rate_limit_headers_say_the_limit_what_is_left_and_when_it_is_whole():
    """OpenAI's x-ratelimit-* headers: the per-minute limits, what is left (0 in debt), and the wait
    until each bucket is full again, written as OpenAI does ("6m0s", "1s", "120ms")."""
    from mygpt.tenancy.limits import duration

    clock = Clock()
    limiter = TenantLimiter("a", Limits(requests_per_minute=6, tokens_per_minute=600), clock)
    limiter.admit()
    limiter.charge(700)  # 100 tokens in debt
    assert limiter.headers() == {
        "x-ratelimit-limit-requests": "6",
        "x-ratelimit-remaining-requests": "5",
        "x-ratelimit-reset-requests": "10s",  # one request back at 6 a minute
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "1m10s",  # 700 tokens at 10 a second
    }
    clock.now += 10
    assert limiter.headers()["x-ratelimit-remaining-requests"] == "6"
    assert limiter.headers()["x-ratelimit-reset-requests"] == "0ms"
    assert TenantLimiter("b", Limits(max_concurrent=2)).headers() == {}  # no per-minute limit
    assert [duration(s) for s in (0.1204, 0.9996, 1.0, 59.5, 360.0)] == ["121ms", "1s", "1s", "1m0s", "6m0s"]


def test_concurrency_limit_counts_admitted_requests():
    limiter = TenantLimiter("a", Limits(max_concurrent=2))
    limiter.admit()
    limiter.admit()
    with pytest.raises(RateLimited, match="concurrent"):
        limiter.admit()
    limiter.release()
    limiter.admit()


def test_tickets_record_usage_once_and_release_their_slot():
    tenants = Tenants(load_tenancy(None))
    principal = tenants.authenticate(None)
    t1 = tenants.admit(principal, "m")
    t2 = tenants.admit(principal, "m")
    assert tenants.in_flight == 2
    t1.finish("stop", 10, 5)
    t1.finish("stop", 10, 5)  # idempotent
    t2.finish("cancelled", 7, 1)
    tenants.reject(principal, "m")
    assert tenants.in_flight == 0
    [row] = tenants.usage.report("default")
    assert row["prompt_tokens"] == 17 and row["completion_tokens"] == 6 and row["total_tokens"] == 23
    assert row["requests"] == {"stop": 1, "length": 0, "cancelled": 1, "error": 0, "rejected": 1}
    assert tenants.usage.report("other") == []


def test_new_limits_keep_requests_in_flight_and_what_was_used():
    clock = Clock()
    limiter = TenantLimiter("a", Limits(requests_per_minute=6, max_concurrent=2), clock)
    for _ in range(5):
        limiter.admit()
        limiter.release()
    limiter.admit()  # in flight across the reload
    limiter.update(Limits(requests_per_minute=3, max_concurrent=1))
    with pytest.raises(RateLimited, match="concurrent"):  # the request in flight still counts
        limiter.admit()
    limiter.release()
    with pytest.raises(RateLimited, match="3 requests per minute"):  # 6 used: none left, not a fresh 3
        limiter.admit()
    limiter.update(Limits())  # no limits at all
    limiter.admit()
    limiter.admit()
    raised = TenantLimiter("b", Limits(requests_per_minute=2), clock)
    raised.admit()
    raised.admit()
    raised.update(Limits(requests_per_minute=100))  # raised after 2 used: 98 left, not a wait
    for _ in range(98):
        raised.admit()
    with pytest.raises(RateLimited, match="100 requests per minute"):
        raised.admit()


def test_reload_swaps_keys_and_keeps_unchanged_limiters(tmp_path):
    def tenancy(text):
        (tmp_path / "c.yaml").write_text(text)
        return load_tenancy(tmp_path / "c.yaml")

    a, b = hash_key("key-a-0123456789"), hash_key("key-b-0123456789")
    tenants = Tenants(
        tenancy(f"tenants: {{a: {{keys: ['sha256:{a}']}}, b: {{limits: {{max_concurrent: 1}}}}}}")
    )
    kept = tenants.limiters["a"]
    summary = tenants.reload(
        tenancy(f"tenants: {{a: {{keys: ['sha256:{b}']}}, c: {{}}, b: {{limits: {{max_concurrent: 2}}}}}}")
    )
    assert summary == {"added": ["c"], "removed": [], "limits_changed": ["b"]}
    assert tenants.limiters["a"] is kept and tenants.limiters["b"].limits.max_concurrent == 2
    assert tenants.authenticate("Bearer key-a-0123456789") is None
    assert tenants.authenticate("Bearer key-b-0123456789").tenant == "a"
    assert tenants.reload(tenancy(f"tenants: {{c: {{keys: ['sha256:{a}']}}}}"))["removed"] == ["a", "b"]
    assert set(tenants.limiters) == {"c"}
