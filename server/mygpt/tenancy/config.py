"""The tenancy config file (`mygpt serve --config mygpt.yaml`) and the key sources beside it.

    admin_keys: ["sha256:<hex>"]
    limits: {requests_per_minute: 600}            # defaults for every tenant
    tenants:
      acme:
        keys: ["sha256:<hex>", "env:ACME_KEY", "file:/run/secrets/acme"]
        limits: {requests_per_minute: 60, tokens_per_minute: 50000, max_concurrent: 4}
        adapters:                                   # optional: others in adapters/acme/ are found too
          support: {path: support-v3, pinned: true}

A key is "sha256:<hex>" (the hash of the key: plain keys need not sit in files), "env:NAME", "file:PATH"
or, discouraged, the plain key. A keys directory (a mounted Kubernetes Secret) adds the keys in its
files: `<tenant>` for a tenant, `admin` for admins, one key a line.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # fullmatch
ADMIN_FILE = "admin"


class ConfigError(ValueError):
    """The tenancy config cannot be used; the message says where and why."""


class Limits(BaseModel):
    """Per-tenant limits; None = unlimited."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt + completion tokens")
    max_concurrent: int | None = Field(None, ge=1, description="requests waiting or running at once")

    def merged_over(self, defaults: Limits) -> Limits:
        mine = self.model_dump(exclude_unset=True)
        return Limits(**{**defaults.model_dump(), **mine})


class AdapterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="inside adapters/<tenant>/; default: the adapter's name")
    pinned: bool = Field(False, description="loaded at start and never evicted from the device")


class TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    adapters: dict[str, AdapterSpec] = Field(default_factory=dict)


class TenancyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    admin_keys: list[str] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    tenants: dict[str, TenantSpec] = Field(default_factory=dict)

    @field_validator("tenants")
    @classmethod
    def _names(cls, tenants: dict[str, TenantSpec]) -> dict[str, TenantSpec]:
        for name in tenants:
            if not TENANT_NAME.fullmatch(name) or name == ADMIN_FILE:
                raise ValueError(
                    f"tenant name {name!r}: use lowercase letters, digits, '-' and '_' (and not 'admin')"
                )
        return tenants


@dataclass
class Tenant:
    name: str
    limits: Limits
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)


@dataclass
class Tenancy:
    """Resolved tenancy: tenants, and key hashes -> tenant name (None = an admin key)."""

    tenants: dict[str, Tenant]
    key_hashes: dict[str, str | None]  # sha256 hex of a key -> tenant name, None for admin keys
    open_tenant: str | None = None  # no keys at all: every caller is this tenant

    @property
    def admin_enabled(self) -> bool:
        return any(t is None for t in self.key_hashes.values())


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_tenancy(
    config: Path | None,
    keys_dir: Path | None = None,
    api_key: str | None = None,
    admin_key: str | None = None,
    default_tenant: str = "default",
    environ: Mapping[str, str] | None = None,
) -> Tenancy:
    """Builds the Tenancy from the config file, the keys directory and the two single keys.

    Without a config file there is one tenant, `default_tenant`: open to every caller unless
    `api_key` is set. The admin API is enabled only where an admin key exists.
    """
    environ = environ or {}
    spec = TenancyFile(tenants={default_tenant: TenantSpec()}) if config is None else _read(Path(config))
    hashes: dict[str, str | None] = {}

    def add(entry: str, tenant: str | None, where: str) -> None:
        digest = _digest(entry, where, environ)
        owner = hashes.setdefault(digest, tenant)
        if owner != tenant:
            raise ConfigError(f"{where}: the same key is given to {owner or 'admin'} and {tenant or 'admin'}")

    for entry in spec.admin_keys:
        add(entry, None, "admin_keys")
    for name, tenant in spec.tenants.items():
        for entry in tenant.keys:
            add(entry, name, f"tenants.{name}.keys")
    if admin_key:
        add(admin_key, None, "admin key setting")
    if api_key:
        if config is not None:
            raise ConfigError("api_key is for a server without a config file; give the key in the config")
        add(api_key, default_tenant, "api key setting")
    if keys_dir is not None:
        try:
            files = sorted(Path(keys_dir).iterdir())
            texts = {f: f.read_text() for f in files if not f.name.startswith(".") and f.is_file()}
        except (OSError, UnicodeDecodeError) as exc:  # e.g. read while a mounted Secret is swapped
            raise ConfigError(f"keys dir {keys_dir}: {exc}") from exc
        for file, text in texts.items():  # a mounted Secret's ..data symlinks and the like are skipped
            owner = None if file.name == ADMIN_FILE else file.name
            if owner is not None and owner not in spec.tenants:
                raise ConfigError(f"keys dir: file {file.name!r} names no tenant of the config")
            for line in text.splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    add(line.strip(), owner, f"keys dir file {file.name!r}")
    tenants = {
        name: Tenant(name, t.limits.merged_over(spec.limits), dict(t.adapters))
        for name, t in spec.tenants.items()
    }
    tenant_keys = [t for t in hashes.values() if t is not None]
    open_tenant = None
    if config is None and not tenant_keys:
        open_tenant = default_tenant
    elif config is not None:
        if not hashes:  # (an empty file, or one caught while it is rewritten: refused, not applied)
            raise ConfigError(f"{config}: no tenant key and no admin key: nobody could use the server")
        for name in tenants:
            if name not in tenant_keys:
                log.warning("tenant %s has no API key: nobody can use it", name)
    return Tenancy(tenants=tenants, key_hashes=hashes, open_tenant=open_tenant)


def _read(path: Path) -> TenancyFile:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the tenancy config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if raw is None:  # an empty file (or one caught while it is written): never "no tenants"
        raise ConfigError(f"{path}: the tenancy config is empty")
    try:
        return TenancyFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path}: {where}: {err['msg']}") from None


def _digest(entry: str, where: str, environ: Mapping[str, str]) -> str:
    """The SHA-256 hex digest a key entry stands for: "env:NAME" and "file:PATH" are read first; the
    value is then either "sha256:<hex>" or the key itself."""
    entry = entry.strip()
    if entry.startswith("env:"):
        name = entry.removeprefix("env:")
        if not environ.get(name):
            raise ConfigError(f"{where}: environment variable {name} is not set")
        value = environ[name].strip()
    elif entry.startswith("file:"):
        file = Path(entry.removeprefix("file:"))
        try:
            value = file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read key file {file} ({exc.strerror})") from None
    else:
        value = entry
        if not value.startswith("sha256:") and len(value) < 16:
            raise ConfigError(f"{where}: a key must be at least 16 characters")
    if value.startswith("sha256:"):
        hexdigest = value.removeprefix("sha256:").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
            raise ConfigError(f"{where}: 'sha256:' must be followed by 64 hex digits")
        return hexdigest
    return hash_key(value)


def load_tenancy_from(settings, environ: Mapping[str, str] | None = None) -> Tenancy:
    """load_tenancy with the settings' fields (config, keys_dir, api_key, admin_key, default_tenant)."""

    def secret(v):
        return v.get_secret_value() if v is not None else None

    return load_tenancy(
        settings.config, settings.keys_dir, secret(settings.api_key), secret(settings.admin_key),
        settings.default_tenant, environ,
    )  # fmt: skip
