"""Bearer key -> Principal (a tenant, or an admin)."""

from __future__ import annotations

from dataclasses import dataclass

from mygpt.tenancy.config import Tenancy, hash_key

ADMIN = "admin"  # the usage/metrics label of admin callers (no tenant may have this name)


@dataclass(frozen=True)
class Principal:
    tenant: str | None  # None: an admin key, which sees every tenant's adapters as "<tenant>/<name>"

    @property
    def admin(self) -> bool:
        return self.tenant is None

    @property
    def label(self) -> str:
        return self.tenant or ADMIN


class Authenticator:
    """Only hashes of keys are held; a presented key is hashed and looked up."""

    def __init__(self, tenancy: Tenancy):
        self.tenancy = tenancy

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The caller behind an `Authorization: Bearer <key>` header; None for a missing or wrong key."""
        key = _bearer(authorization)
        if key:
            digest = hash_key(key)
            if digest in self.tenancy.key_hashes:
                # the lookup compares digests of secrets, never the secrets: no timing leak of a key
                return Principal(self.tenancy.key_hashes[digest])
        if self.tenancy.open_tenant is not None:
            return Principal(self.tenancy.open_tenant)  # an open server: any (or no) key is this tenant
        return None


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None
