"""The OpenAI files and fine-tuning APIs: thin routes over the store and the job manager."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from mygpt.api.auth import caller
from mygpt.api.errors import APIError, invalid
from mygpt.api.protocol import Metadata, page
from mygpt.batches import validate_batch
from mygpt.finetune.data import DataError, validate_jsonl
from mygpt.finetune.jobs import SUFFIX
from mygpt.finetune.store import off_loop
from mygpt.lora.registry import ADAPTER_NAME
from mygpt.state import ServerState
from mygpt.tenancy.auth import Principal

router = APIRouter()


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # (strict numbers: true is no epoch count, as OpenAI answers)
    n_epochs: StrictInt | str = "auto"
    batch_size: StrictInt | str = "auto"
    learning_rate_multiplier: StrictFloat | StrictInt | str = "auto"
    lora_rank: StrictInt | str = "auto"  # ours: the adapter's LoRA rank


class Supervised(BaseModel):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    """OpenAI's `method`: supervised only here (its hyperparameters replace the top-level ones, which
    OpenAI deprecated for it); dpo and reinforcement are refused."""

    type: str
    supervised: Supervised | None = None
    dpo: Any = None
    reinforcement: Any = None


class CreateJob(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    metadata: Metadata | None = None
    integrations: list[Any] | None = None  # Weights & Biases: not here (refused)


log = logging.getLogger(__name__)

NO_TRAINER = (
    "No server trains fine-tuning jobs for this base model now: each one sharing this store serves with "
    "--no-train (settings.train: false), or none has started. This job stays queued until one does."
)
DEFAULTS = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0, "lora_rank": 8}
BOUNDS = {"n_epochs": (1, 50), "batch_size": (1, 64), "learning_rate_multiplier": (1e-3, 50.0)}


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.mygpt
    if not state.settings.finetune:  # a 404, not a 503: the SDK would retry a 503
        raise APIError(
            404, "Files, fine-tuning and batches are turned off on this server.", code="not_available"
        )
    if state.finetune_store is None or state.jobs is None:  # made together at start-up
        reason = state.not_ready_reason() or "fine-tuning is starting"
        raise APIError(
            503, f"The server is not ready: {reason}.", code="not_ready", headers={"Retry-After": "5"}
        )
    return state


def _tenant(principal: Principal) -> str:
    if principal.tenant is None:
        raise APIError(403, "Files and fine-tuning jobs belong to tenants: use a tenant's API key.",
                       code="insufficient_permissions")  # fmt: skip
    return principal.tenant


# ----------------------------------------------------------------------------- files


@router.post("/v1/files")
async def upload_file(
    request: Request,
    file: UploadFile = File(...),
    purpose: str = Form(...),
    anchor: str | None = Form(None, alias="expires_after[anchor]"),
    seconds: str | None = Form(None, alias="expires_after[seconds]"),
    principal: Principal = Depends(caller),
) -> dict:
    """OpenAI's upload; `expires_after` ({anchor: created_at, seconds: 3600 to 2592000}, as the SDK sends
    it: form fields expires_after[anchor] and expires_after[seconds]) deletes the file then."""
    state = _state(request)
    tenant = _tenant(principal)
    if purpose not in ("fine-tune", "batch"):
        raise invalid(f"purpose '{purpose}' is not supported; 'fine-tune' or 'batch'.", param="purpose")
    expires_at = None
    if anchor is not None or seconds is not None:
        if anchor != "created_at":
            raise invalid("expires_after.anchor must be 'created_at'.", param="expires_after.anchor")
        if not ((seconds or "").isascii() and seconds.isdigit()) or not 3600 <= int(seconds) <= 2_592_000:
            raise invalid("expires_after.seconds must be between 3600 (an hour) and 2592000 (30 days).",
                          param="expires_after.seconds")  # fmt: skip
        expires_at = int(time.time()) + int(seconds)
    limit = state.settings.max_file_bytes
    raw = await file.read(limit + 1)
    if len(raw) > limit:
        raise APIError(413, f"The file is larger than this server's limit of {limit} bytes.", param="file",
                       code="file_too_large")  # fmt: skip
    try:  # (a file of many megabytes: parsed off the event loop)
        if purpose == "fine-tune":
            examples = await asyncio.to_thread(validate_jsonl, raw)
        else:
            examples = (await asyncio.to_thread(validate_batch, raw))[0]  # (requests)
    except DataError as exc:
        kind = "training" if purpose == "fine-tune" else "batch"
        raise invalid(f"Invalid {kind} file: {exc}", param="file", code="invalid_file") from exc
    await off_loop(state.finetune_store.purge_expired)  # (and at each listing)
    row = await off_loop(
        state.finetune_store.add_file,
        f"file-{uuid.uuid4().hex[:24]}", tenant, file.filename or "upload.jsonl", purpose, raw, examples, expires_at,
    )  # fmt: skip
    return _file(row)


# Routes below without an await are plain functions: FastAPI runs them in its thread pool, so their
# SQLite calls (which may wait for a lock, on a network file system for seconds) never block the loop.


@router.get("/v1/files")
def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = 10_000,
    order: str = "desc",
    after: str | None = None,
    principal: Principal = Depends(caller),
) -> dict:
    """OpenAI's list: newest first by default (order), of one purpose if given, `limit` (1 to 10,000)
    after the file `after`."""
    if order not in ("asc", "desc"):
        raise invalid(f"order must be 'asc' or 'desc', got {order!r}.", param="order")
    if not 1 <= limit <= 10_000:
        raise invalid(f"limit must be between 1 and 10000, got {limit}.", param="limit")
    store = _state(request).finetune_store
    store.purge_expired()
    rows = store.list_files(_tenant(principal))
    files = [
        _file(r) for r in (rows if order == "asc" else reversed(rows)) if purpose in (None, r["purpose"])
    ]
    return page(files, after, limit)


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, request: Request, principal: Principal = Depends(caller)) -> dict:
    row = _state(request).finetune_store.get_file(_tenant(principal), file_id)
    if row is None:
        raise _no_file(file_id)
    return _file(row)


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, request: Request, principal: Principal = Depends(caller)) -> Response:
    """The file as it was uploaded (at most --max-file-bytes)."""
    state = _state(request)
    if state.finetune_store.get_file(_tenant(principal), file_id) is None:
        raise _no_file(file_id)
    try:
        raw = state.finetune_store.file_path(file_id).read_bytes()
    except FileNotFoundError:  # deleted meanwhile
        raise _no_file(file_id) from None
    return Response(raw, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, request: Request, principal: Principal = Depends(caller)) -> dict:
    store = _state(request).finetune_store
    reader = store.files_read().get(file_id)
    if reader is not None and store.get_file(_tenant(principal), file_id) is not None:
        raise invalid(f"File '{file_id}' is read by {reader}, which has not ended; cancel it first.",
                      param="file_id", code="file_in_use")  # fmt: skip
    if not store.delete_file(_tenant(principal), file_id):
        raise _no_file(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


def _no_file(file_id: str, param: str | None = None) -> APIError:
    return APIError(404 if param is None else 400, f"No such file: '{file_id}'.", param=param,
                    code="file_not_found")  # fmt: skip


def _file(row: dict) -> dict:
    return {
        "id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
        "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None,
        "expires_at": row.get("expires_at"),
    }  # fmt: skip


# ----------------------------------------------------------------------------- jobs


@router.post("/v1/fine_tuning/jobs")
def create_job(body: CreateJob, request: Request, principal: Principal = Depends(caller)) -> dict:
    state = _state(request)
    tenant = _tenant(principal)
    base = state.jobs.base_name
    if body.model != base:
        raise invalid(f"The model '{body.model}' cannot be fine-tuned here: this server fine-tunes '{base}'.",
                      param="model", code="model_not_available")  # fmt: skip
    for param, file_id in (("training_file", body.training_file), ("validation_file", body.validation_file)):
        row = state.finetune_store.get_file(tenant, file_id) if file_id is not None else None
        if file_id is not None and row is None:
            raise _no_file(file_id, param)
        if row is not None and row["purpose"] != "fine-tune":
            raise invalid(f"File '{file_id}' has purpose '{row['purpose']}': training and validation "
                          "files are uploaded with purpose 'fine-tune'.", param=param, code="invalid_file")  # fmt: skip
    if body.suffix is not None and not SUFFIX.fullmatch(body.suffix):
        raise invalid("suffix: up to 64 letters, digits and '.', '_' or '-', starting with a letter or digit.",
                      param="suffix")  # fmt: skip
    if body.integrations:
        raise invalid(
            "Integrations (Weights & Biases) are not available on this server.", param="integrations"
        )
    given, where = body.hyperparameters or Hyperparameters(), "hyperparameters"
    if body.method is not None:
        if body.method.type != "supervised":
            raise invalid(f"Fine-tuning method '{body.method.type}' is not available on this server: only "
                          "'supervised'.", param="method.type", code="invalid_value")  # fmt: skip
        for other in ("dpo", "reinforcement"):
            if getattr(body.method, other) is not None:
                raise invalid(
                    f"method.{other} does not go with method.type 'supervised'.", param=f"method.{other}"
                )
        if body.method.supervised is not None:
            if body.hyperparameters is not None:
                raise invalid("Give hyperparameters in method.supervised.hyperparameters or at the top level "
                              "(deprecated), not both.", param="hyperparameters")  # fmt: skip
            given, where = body.method.supervised.hyperparameters, "method.supervised.hyperparameters"
    hp = {}
    for key, default in DEFAULTS.items():
        value = getattr(given, key)
        value = default if value == "auto" else value
        if isinstance(value, str):
            raise invalid(f"{where}.{key} must be a number or 'auto'.", param=f"{where}.{key}")
        low, high = (1, state.settings.max_lora_rank) if key == "lora_rank" else BOUNDS[key]
        if not low <= value <= high:
            raise invalid(f"{where}.{key} must be between {low} and {high}, got {value}.",
                          param=f"{where}.{key}")  # fmt: skip
        hp[key] = value
    job_id = f"ftjob-{uuid.uuid4().hex[:24]}"
    name = state.jobs.adapter_name({"id": job_id, "tenant": tenant, "suffix": body.suffix})
    if not ADAPTER_NAME.fullmatch(name):  # refused now, not after the training
        raise invalid(f"The fine-tuned model's name would be '{name}', {len(name)} characters: a model name "
                      "has at most 128. Use a shorter suffix.", param="suffix")  # fmt: skip
    job = state.finetune_store.add_job({
        "id": job_id, "tenant": tenant, "model": base,
        "training_file": body.training_file, "validation_file": body.validation_file, "suffix": body.suffix,
        "hyperparameters": hp, "seed": body.seed if body.seed is not None else random.randrange(2**31),
        "metadata": body.metadata,
    })  # fmt: skip
    state.finetune_store.add_event(
        job["id"], f"Created fine-tuning job: {job['id']}", data={"type": "message"}
    )
    try:  # every server sharing the store runs --no-train: the job says so, not waits without a word
        if state.jobs.trainers_live() == 0:
            log.warning("fine-tuning job %s is queued, but no server trains jobs for %s", job["id"], base)
            state.finetune_store.add_event(job["id"], NO_TRAINER, level="warn", data={"type": "message"})
    except Exception:  # the job is stored: a failed check must not answer 500 (a retry would make two)
        log.warning("fine-tuning job %s: could not check for a server that trains", job["id"], exc_info=True)
    state.jobs.submitted()
    return _job(request, job)


@router.get("/v1/fine_tuning/jobs")
def list_jobs(
    request: Request, after: str | None = None, limit: int = 20, principal: Principal = Depends(caller)
) -> dict:
    """Newest first; metadata[k]=v filters by metadata (each pair must match), metadata=null lists the
    jobs without any."""
    jobs = _state(request).finetune_store.list_jobs(_tenant(principal))
    wanted = {
        k[9:-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k.endswith("]")
    }
    if request.query_params.get("metadata") == "null":
        jobs = [j for j in jobs if not j.get("metadata")]
    jobs = [j for j in jobs if all((j.get("metadata") or {}).get(k) == v for k, v in wanted.items())]
    return page([_job(request, j) for j in jobs], after, max(1, min(limit, 100)))


@router.get("/v1/fine_tuning/jobs/{job_id}")
def get_job(job_id: str, request: Request, principal: Principal = Depends(caller)) -> dict:
    return _job(request, _find_job(request, principal, job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def job_events(
    job_id: str,
    request: Request,
    after: str | None = None,
    limit: int = 20,
    principal: Principal = Depends(caller),
) -> dict:
    _find_job(request, principal, job_id)
    limit = max(1, min(limit, 1000))
    cursor = (after or "").removeprefix("ftevent-")
    if after and not (cursor.isascii() and cursor.isdigit()):
        raise invalid(f"after must be an event id (ftevent-<number>), got {after!r}.", param="after")
    seq = min(int(cursor), 2**63 - 1) if after else None  # SQLite's int64: past it, nothing comes after
    rows = _state(request).finetune_store.events(job_id, limit + 1, seq)
    data = [
        {"object": "fine_tuning.job.event", "id": f"ftevent-{r['seq']}", "created_at": r["created_at"],
         "level": r["level"], "message": r["message"], "data": r["data"],
         "type": "metrics" if (r["data"] or {}).get("type") == "metrics" else "message"}
        for r in rows[:limit]
    ]  # fmt: skip
    return {"object": "list", "data": data, "has_more": len(rows) > limit}


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, request: Request, principal: Principal = Depends(caller)) -> dict:
    job = _find_job(request, principal, job_id)
    if job["status"] in ("succeeded", "failed", "cancelled"):
        raise invalid(f"The job is already {job['status']}.", param="fine_tuning_job_id", code="job_finished")
    _state(request).jobs.cancel(job_id)  # (the store, and a trainer stopped)
    return _job(request, _find_job(request, principal, job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
def pause_job(job_id: str, request: Request, principal: Principal = Depends(caller)) -> dict:
    """A queued job is paused at once; a running one once its trainer has checkpointed (its status
    says `running` until then). It frees the device for serving; resume goes on from the checkpoint."""
    _find_job(request, principal, job_id)
    if not _state(request).jobs.pause(job_id):
        status = _find_job(request, principal, job_id)["status"]
        raise invalid(f"The job is {status}: only a queued or running job can be paused.",
                      param="fine_tuning_job_id", code="invalid_state")  # fmt: skip
    return _job(request, _find_job(request, principal, job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
def resume_job(job_id: str, request: Request, principal: Principal = Depends(caller)) -> dict:
    _find_job(request, principal, job_id)
    if not _state(request).jobs.resume(job_id):
        status = _find_job(request, principal, job_id)["status"]
        raise invalid(f"The job is {status}: only a paused job can be resumed.", param="fine_tuning_job_id",
                      code="invalid_state")  # fmt: skip
    return _job(request, _find_job(request, principal, job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def job_checkpoints(
    job_id: str, request: Request, after: str | None = None, limit: int = Query(10, ge=1, le=100),
    principal: Principal = Depends(caller),
) -> dict:  # fmt: skip
    """The checkpoints of the job's last epochs, newest first; each is served as its own model (its
    fine_tuned_model_checkpoint) once made."""
    job = _find_job(request, principal, job_id)
    rows = _state(request).finetune_store.list_checkpoints(job_id)
    data = [
        {"object": "fine_tuning.job.checkpoint", "id": c["id"], "created_at": c["created_at"],
         "fine_tuned_model_checkpoint": c["model"], "fine_tuning_job_id": job["id"], "step_number": c["step"],
         "metrics": {k: v for k, v in c["metrics"].items() if v is not None}}
        for c in rows if c["model"]
    ]  # fmt: skip
    return page(data, after, limit)


def _find_job(request: Request, principal: Principal, job_id: str) -> dict:
    job = _state(request).finetune_store.get_job(_tenant(principal), job_id)
    if job is None:
        raise APIError(
            404, f"No such fine-tuning job: '{job_id}'.", param="fine_tuning_job_id", code="job_not_found"
        )
    return job


def _job(request: Request, job: dict) -> dict:
    hp = job["hyperparameters"]
    estimate = _state(request).finetune_store.estimated_finish(job)
    return {
        "id": job["id"], "object": "fine_tuning.job", "created_at": job["created_at"],
        "finished_at": job["finished_at"], "model": job["model"], "fine_tuned_model": job["fine_tuned_model"],
        "organization_id": job["tenant"], "status": job["status"], "training_file": job["training_file"],
        "validation_file": job["validation_file"], "result_files": job["result_files"],
        "trained_tokens": job["trained_tokens"],
        "error": job["error"], "seed": job["seed"], "user_provided_suffix": job["suffix"],
        "estimated_finish": estimate, "integrations": [], "metadata": job["metadata"] or {},
        "hyperparameters": {k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {**hp}}},
    }  # fmt: skip
