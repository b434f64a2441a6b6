"""Route dependencies: who is calling (401 invalid_api_key), and whether it may administer (403)."""

from __future__ import annotations

from fastapi import Request

from mygpt.api.errors import APIError
from mygpt.tenancy.auth import Principal


def caller(request: Request) -> Principal:
    """The tenant (or admin) behind the request's Bearer key."""
    principal = request.app.state.mygpt.tenants.authenticate(request.headers.get("authorization"))
    if principal is None:
        raise APIError(
            401,
            "Incorrect API key provided. Pass a key of this server as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


def admin(request: Request) -> Principal:
    """An admin key's caller; tenants get 403."""
    tenants = request.app.state.mygpt.tenants
    principal = caller(request)
    if not principal.admin:
        disabled = (
            "" if tenants.tenancy.admin_enabled else " The admin API is off: no admin key is configured."
        )
        raise APIError(403, "This API key has no admin rights." + disabled, code="insufficient_permissions")
    return principal
