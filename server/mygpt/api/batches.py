"""OpenAI's Batch API routes (/v1/batches): thin routes over the store and the batch runner
(mygpt/batches.py). Batches belong to tenants, as their files do."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict

from mygpt.api.auth import caller
from mygpt.api.errors import APIError, invalid
from mygpt.api.finetune import _no_file, _state, _tenant
from mygpt.api.protocol import Metadata, page
from mygpt.batches import ENDPOINTS, WINDOW_S, BatchRunner, validate_batch
from mygpt.finetune.data import DataError
from mygpt.finetune.store import off_loop
from mygpt.tenancy.auth import Principal

router = APIRouter()


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: Metadata | None = None


def runner(state: Any) -> BatchRunner:
    """The server's batch runner, started in this event loop (app.py starts it at start-up, to resume
    the batches a restart interrupted)."""
    if state.batches is None:
        state.batches = BatchRunner(state, concurrency=state.settings.max_num_seqs // 4)
    state.batches.ensure_started()
    return state.batches


@router.post("/v1/batches")
async def create_batch(body: CreateBatch, request: Request, principal: Principal = Depends(caller)) -> dict:
    state = _state(request)
    tenant = _tenant(principal)
    if body.endpoint not in ENDPOINTS:
        raise invalid(
            f"endpoint must be one of {', '.join(ENDPOINTS)}.", param="endpoint", code="unsupported_value"
        )
    if body.completion_window not in WINDOW_S:
        raise invalid("completion_window must be '24h'.", param="completion_window")
    store = state.finetune_store
    row = await off_loop(store.get_file, tenant, body.input_file_id)
    if row is None:
        raise _no_file(body.input_file_id, "input_file_id")
    if row["purpose"] != "batch":
        raise invalid(f"File '{body.input_file_id}' has purpose '{row['purpose']}': a batch's input file is "
                      "uploaded with purpose 'batch'.", param="input_file_id", code="invalid_file")  # fmt: skip
    try:
        raw = await off_loop(store.file_path(body.input_file_id).read_bytes)
        total, urls, models = await asyncio.to_thread(validate_batch, raw)
    except (OSError, DataError) as exc:
        raise invalid(f"Invalid input file: {exc}", param="input_file_id", code="invalid_file") from None
    if urls != {body.endpoint}:
        other = sorted(urls - {body.endpoint})[0]
        raise invalid(f"The input file's requests go to {other}, not to the batch's endpoint {body.endpoint}.",
                      param="endpoint")  # fmt: skip
    now = int(time.time())
    batch = await off_loop(store.add_batch, {
        "id": f"batch_{uuid.uuid4().hex}", "tenant": tenant, "endpoint": body.endpoint,
        "input_file_id": body.input_file_id, "completion_window": body.completion_window, "created_at": now,
        "expires_at": now + WINDOW_S[body.completion_window], "total": total, "metadata": body.metadata,
        "model": next(iter(models)) if len(models) == 1 else None,
    })  # fmt: skip
    runner(state)
    return _batch(batch)


@router.get("/v1/batches")
def list_batches(
    request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
    principal: Principal = Depends(caller),
) -> dict:  # fmt: skip
    batches = _state(request).finetune_store.list_batches(_tenant(principal))
    return page([_batch(b) for b in batches], after, limit)


@router.get("/v1/batches/{batch_id}")
def get_batch(batch_id: str, request: Request, principal: Principal = Depends(caller)) -> dict:
    return _batch(_find(request, principal, batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request, principal: Principal = Depends(caller)) -> dict:
    """Stops starting its requests; those running finish, then it ends "cancelled" with what it did."""
    batch = await off_loop(_cancel, request, principal, batch_id)
    runner(_state(request))  # (woken in this loop)
    return batch


def _cancel(request: Request, principal: Principal, batch_id: str) -> dict:
    batch = _find(request, principal, batch_id)
    if batch["status"] not in ("validating", "in_progress"):
        raise invalid(f"The batch is {batch['status']}.", param="batch_id", code="batch_not_cancellable")
    store = _state(request).finetune_store
    for status in ("validating", "in_progress"):  # not one that ended meanwhile
        store.update_batch(batch_id, if_status=status, status="cancelling", cancelling_at=int(time.time()))
    return _batch(store.get_batch(None, batch_id))


def _find(request: Request, principal: Principal, batch_id: str) -> dict:
    batch = _state(request).finetune_store.get_batch(_tenant(principal), batch_id)
    if batch is None:
        raise APIError(404, f"No such batch: '{batch_id}'.", param="batch_id", code="not_found")
    return batch


def _batch(b: dict) -> dict:
    return {
        "id": b["id"], "object": "batch", "endpoint": b["endpoint"], "errors": b["errors"],
        "input_file_id": b["input_file_id"], "completion_window": b["completion_window"], "status": b["status"],
        "output_file_id": b["output_file_id"], "error_file_id": b["error_file_id"], "created_at": b["created_at"],
        "in_progress_at": b["in_progress_at"], "expires_at": b["expires_at"], "finalizing_at": b["finalizing_at"],
        "completed_at": b["completed_at"], "failed_at": b["failed_at"], "expired_at": b["expired_at"],
        "cancelling_at": b["cancelling_at"], "cancelled_at": b["cancelled_at"],
        "request_counts": {"total": b["total"], "completed": b["completed"], "failed": b["failed"]},
        "metadata": b["metadata"] or {}, "model": b["model"],
        "usage": {
            "input_tokens": b["input_tokens"], "input_tokens_details": {"cached_tokens": b["cached_tokens"]},
            "output_tokens": b["output_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": b["input_tokens"] + b["output_tokens"],
        },
    }  # fmt: skip
