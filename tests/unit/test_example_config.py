"""The example tenancy config in the repo stays valid."""

from __future__ import annotations

from conftest import ROOT
from mygpt.tenancy.auth import Authenticator
from mygpt.tenancy.config import load_tenancy


def test_the_example_config_loads(tmp_path):
    (tmp_path / "finance").write_text("sk-finance-0123456789abcdef\n")
    text = (ROOT / "deploy" / "mygpt.example.yaml").read_text().replace("/run/secrets/mygpt", str(tmp_path))
    (tmp_path / "mygpt.yaml").write_text(text)
    tenancy = load_tenancy(
        tmp_path / "mygpt.yaml", environ={"MYGPT_EXAMPLE_ADMIN_KEY": "sk-admin-0123456789abcdef"}
    )
    assert set(tenancy.tenants) == {"support", "finance"}
    assert tenancy.tenants["support"].limits.max_concurrent == 8
    assert tenancy.tenants["support"].limits.requests_per_minute == 600
    assert tenancy.tenants["support"].adapters["tone"].pinned
    auth = Authenticator(tenancy)
    assert auth.authenticate("Bearer sk-finance-0123456789abcdef").tenant == "finance"
    assert auth.authenticate("Bearer sk-admin-0123456789abcdef").admin
