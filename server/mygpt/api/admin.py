"""Runtime adapter management (admin keys only) and usage: thin routes over the registry and engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from mygpt.api.auth import admin, caller
from mygpt.api.errors import APIError, adapter_changing, invalid
from mygpt.api.protocol import LoadAdapterRequest, VLLMLoadLoRARequest, VLLMUnloadLoRARequest
from mygpt.engine.types import AdapterRef
from mygpt.lora.registry import AdapterConflict, AdapterEntry, AdapterRegistry, usable_path
from mygpt.lora.weights import AdapterChanging, AdapterError
from mygpt.state import ServerState
from mygpt.tenancy.auth import Principal
from mygpt.tenancy.config import ConfigError

router = APIRouter()


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.mygpt
    if state.registry is None:
        raise APIError(503, "The server is not ready: loading the model.", code="not_ready",
                       headers={"Retry-After": "5"})  # fmt: skip
    return state


@router.get("/v1/admin/adapters")
async def list_adapters(request: Request, _: Principal = Depends(admin)) -> dict:
    state = _state(request)
    entries = state.registry.list()
    cache = state.adapter_cache_snapshot()
    current = {e.key for e in entries}
    problems = await asyncio.to_thread(lambda: [state.registry.problem(e) for e in entries])  # file reads
    return {
        "object": "list",
        "data": [{**_describe(e, cache), "error": p} for e, p in zip(entries, problems, strict=True)],
        "retiring": sorted(k for k in cache if k not in current),  # old versions finishing requests
    }


@router.post("/v1/admin/adapters")
async def load_adapter(body: LoadAdapterRequest, request: Request, _: Principal = Depends(admin)) -> dict:
    state = _state(request)
    entry, changed = await _load(state, body.tenant, body.name, body.path, body.replace, body.pinned)
    return {**_describe(entry, state.adapter_cache_snapshot()), "changed": changed}


@router.delete("/v1/admin/adapters/{tenant}/{name}")
async def unload_adapter(tenant: str, name: str, request: Request, _: Principal = Depends(admin)) -> dict:
    entry = _unload(_state(request), tenant, name)
    return {"tenant": tenant, "name": name, "version": entry.version, "deleted": True}


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def vllm_load(body: VLLMLoadLoRARequest, request: Request, _: Principal = Depends(admin)) -> str:
    state = _state(request)
    tenant, name = _vllm_name(state.registry, body.lora_name, body.tenant, body.lora_path)
    await _load(state, tenant, name, body.lora_path, body.load_inplace, False)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def vllm_unload(body: VLLMUnloadLoRARequest, request: Request, _: Principal = Depends(admin)) -> str:
    state = _state(request)
    tenant, name = _vllm_name(state.registry, body.lora_name, body.tenant, None)
    _unload(state, tenant, name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


@router.post("/v1/admin/reload")
async def reload_tenancy(request: Request, _: Principal = Depends(admin)) -> dict:
    """Re-reads the tenancy config and key files (as SIGHUP does): keys, tenants, limits, adapters."""
    state: ServerState = request.app.state.mygpt
    try:
        summary = await asyncio.to_thread(state.reload_tenancy)
    except ConfigError as exc:
        raise invalid(f"The tenancy config was not reloaded: {exc}", code="invalid_config") from exc
    return {"object": "tenancy.reload", **summary}


@router.get("/v1/usage")
async def usage(request: Request, tenant: str | None = None, principal: Principal = Depends(caller)) -> dict:
    """A tenant's own usage since the server started; an admin's view of every tenant (or one)."""
    ledger = request.app.state.mygpt.tenants.usage
    scope = tenant if principal.admin else principal.tenant
    return {"object": "list", "data": ledger.report(scope)}


async def _load(
    state: ServerState, tenant: str, name: str, path: str | None, replace: bool, pinned: bool
) -> tuple[AdapterEntry, bool]:
    try:
        entry, changed = await asyncio.to_thread(state.registry.load, tenant, name, path, replace, pinned)
    except AdapterConflict as exc:
        raise invalid(str(exc), param="name", code="adapter_exists") from exc
    except AdapterChanging as exc:
        raise adapter_changing(exc) from exc
    except AdapterError as exc:
        raise invalid(str(exc), param="path", code="invalid_adapter") from exc
    if entry.pinned:
        try:
            await state.pin_adapter(AdapterRef(entry.key, entry.weights))
        except APIError as exc:  # loaded and routable, not pinned: say so, and list it so
            entry.pinned = False
            exc.info.message += " The adapter is loaded, not pinned."
            raise
    return entry, changed


def _unload(state: ServerState, tenant: str, name: str) -> AdapterEntry:
    entry = state.registry.unload(tenant, name)
    if entry is None:
        raise APIError(
            404, f"Tenant '{tenant}' has no adapter '{name}'.", param="name", code="adapter_not_found"
        )
    return entry


def _describe(entry: AdapterEntry, cache: dict[str, dict]) -> dict:
    slot = cache.get(entry.key)
    # evicted: on disk (and maybe in host memory), not on the device
    where = "evicted" if slot is None else "pinned" if slot["pinned"] else "resident"
    return {**entry.info(), "key": entry.key, "state": where, "in_use": slot["in_use"] if slot else 0}


def _vllm_name(
    registry: AdapterRegistry, lora_name: str, tenant: str | None, path: str | None
) -> tuple[str, str]:
    """vLLM's bodies name no tenant: "<tenant>/<name>", a `tenant` field, the store the path lies in,
    or the only tenant there is."""
    if "/" in lora_name:
        tenant, _, lora_name = lora_name.partition("/")
    elif tenant is None and path is not None and usable_path(path):
        real = Path(path).resolve() if Path(path).is_absolute() else (registry.root / path).resolve()
        tenant = next((t for t in registry.tenants if registry.store_of(t).resolve() in real.parents), None)
    if tenant is None and len(registry.tenants) == 1:
        tenant = registry.tenants[0]
    if tenant is None:
        raise invalid("Name the tenant: lora_name '<tenant>/<name>' or a 'tenant' field.", param="lora_name")
    return tenant, lora_name
