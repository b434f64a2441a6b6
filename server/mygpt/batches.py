"""OpenAI's Batch API: a tenant's JSONL file of chat or text completion requests, run in the background
through ChatService as the tenant's own requests (its adapters, limits, usage and cost apply), at most
`concurrency` at a time so that interactive traffic keeps the rest of the batch slots; the answers go to
an output file and the failures to an error file (`files.content`).

A batch is kept in the store beside the fine-tuning jobs, and its results are appended to partial
files as they come: a restart resumes it where it stood (a request that was running then runs again;
none that had finished does). A request refused for capacity (429, 503: the tenant's limits, a full
queue) waits as its Retry-After says and runs, instead of failing; other refusals are its result.
Cancelling stops new requests; those running finish. A batch not done within its completion window
(24 h) ends "expired" with what it finished.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mygpt.api import completions
from mygpt.api.errors import APIError
from mygpt.api.protocol import ChatCompletionRequest, CompletionRequest
from mygpt.finetune.data import DataError, _lines, _parse
from mygpt.finetune.store import Store
from mygpt.tenancy.auth import Principal

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_REQUESTS = 50_000  # per batch, as OpenAI's
WINDOW_S = {"24h": 24 * 3600}
OPEN = ("validating", "in_progress", "finalizing", "cancelling")  # a runner's work, after a restart too
RETRY_S = 1.0  # a refusal for capacity without Retry-After


def validate_batch(raw: bytes) -> tuple[int, set[str]]:
    """Checks every line of an uploaded batch file; returns the number of requests and their urls.
    The error names the line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"the file is not UTF-8 text (byte {exc.start})") from None
    ids: set[str] = set()
    urls: set[str] = set()
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        item = _parse(line, number)
        if not isinstance(item, dict):
            raise DataError(f"line {number}: expected an object with custom_id, method, url and body")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise DataError(f"line {number}: custom_id must be a non-empty string")
        if custom_id in ids:
            raise DataError(f"line {number}: custom_id {custom_id!r} is not unique in the file")
        if item.get("method") != "POST":
            raise DataError(f"line {number}: method must be POST")
        if item.get("url") not in ENDPOINTS:
            raise DataError(f"line {number}: url must be one of {', '.join(ENDPOINTS)}")
        body = item.get("body")
        if not isinstance(body, dict):
            raise DataError(f"line {number}: body must be an object (the request's JSON body)")
        if body.get("stream"):
            raise DataError(f"line {number}: a batch request cannot stream")
        ids.add(custom_id)
        urls.add(item["url"])
        if len(ids) > MAX_REQUESTS:
            raise DataError(f"more than {MAX_REQUESTS} requests")
    if not ids:
        raise DataError(
            'the file has no requests: one JSON object per line, {"custom_id", "method", "url", "body"}'
        )
    return len(ids), urls


class BatchFailed(Exception):
    """A batch that cannot go on (its input file gone, its tenant removed): it ends failed, with the
    results it has."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class BatchRunner:
    """Runs the store's open batches in the server's event loop: up to MAX_ACTIVE at once, one per
    tenant, their requests `concurrency` at a time in all (each tenant's at most half of its own
    concurrency limit, and only while half of its per-minute budgets is left). A batch is claimed
    in the store for LEASE_S seconds, renewed while it runs, so that replicas sharing the store never
    run one batch twice."""

    MAX_ACTIVE = 4
    LEASE_S = 60.0

    def __init__(self, state: Any, concurrency: int):
        self.state = state  # the ServerState: its store and ChatService once the model is loaded
        self.concurrency = max(1, concurrency)
        self.owner = f"runner-{uuid.uuid4().hex}"
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._active: dict[str, tuple[str, asyncio.Task]] = {}  # batch id -> (tenant, its task)

    def ensure_started(self) -> None:
        """Starts the runner in the running event loop (once), and wakes it for new work."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._slots = asyncio.Semaphore(self.concurrency)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mygpt-batches")
        self._wake.set()

    async def stop(self) -> None:
        """Stops at once: running requests are aborted and run again when the batch resumes."""
        tasks = [t for t in (self._task, *(task for _, task in self._active.values())) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self._schedule()
            except Exception:  # the store unreachable a moment, say: the runner goes on
                log.exception("the batch runner could not look for work")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 2.0)

    async def _schedule(self) -> None:
        state = self.state
        store, chat = state.finetune_store, state.chat
        if store is None or chat is None or not state.ready or state.draining:
            return
        self._active = {b: (t, task) for b, (t, task) in self._active.items() if not task.done()}
        for batch in await asyncio.to_thread(store.batches_with_status, *OPEN):
            busy = {tenant for tenant, _ in self._active.values()}
            runs = batch["status"] in ("validating", "in_progress") and time.time() < batch["expires_at"]
            if batch["id"] in self._active or (
                runs and (batch["tenant"] in busy or len(self._active) >= self.MAX_ACTIVE)
            ):
                continue  # (one that only ends, cancelled or expired, does not wait its turn)
            if not await asyncio.to_thread(store.claim_batch, batch["id"], self.owner, self.LEASE_S):
                continue  # another replica's
            task = asyncio.get_running_loop().create_task(self._guarded(store, chat, batch))
            task.add_done_callback(lambda _: self._wake.set())
            self._active[batch["id"]] = (batch["tenant"], task)

    async def _guarded(self, store: Store, chat: Any, batch: dict) -> None:
        """_process, the batch's claim renewed meanwhile; a failure ends the batch failed, with what it did."""
        renew = asyncio.get_running_loop().create_task(self._renew(store, batch["id"]))
        try:
            await self._process(store, chat, batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, BatchFailed):
                code, message = exc.code, str(exc)
            else:
                log.exception("batch %s failed", batch["id"])
                code, message = "internal_error", "The server had an error while running this batch."
            error = {"code": code, "message": message, "param": None, "line": None}
            await asyncio.to_thread(
                self._finalize, store, batch["id"], "failed", {"object": "list", "data": [error]}
            )
        finally:
            renew.cancel()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(store.release_batch, batch["id"], self.owner)

    async def _renew(self, store: Store, batch_id: str) -> None:
        while True:
            await asyncio.sleep(self.LEASE_S / 3)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(store.claim_batch, batch_id, self.owner, self.LEASE_S)

    async def _process(self, store: Store, chat: Any, batch: dict) -> None:
        batch_id = batch["id"]
        if batch["status"] == "validating":  # (a cancel that came meanwhile stays)
            store.update_batch(
                batch_id, if_status="validating", status="in_progress", in_progress_at=int(time.time())
            )
        out_path, err_path = _partials(store, batch_id)
        current = store.get_batch(None, batch_id)
        if current["status"] == "in_progress" and time.time() < batch["expires_at"]:
            requests = await asyncio.to_thread(_requests, store, batch)
            done = await asyncio.to_thread(_finished_ids, out_path, err_path)
            todo = collections.deque(r for r in requests if r["custom_id"] not in done)
            counts = await asyncio.to_thread(_counts, out_path, err_path)  # (a torn last line cut)
            principal = Principal(batch["tenant"])
            async with asyncio.TaskGroup() as workers:  # one failing: the others stop, the batch fails
                for _ in range(min(self._concurrency(chat, batch["tenant"]), len(todo))):
                    workers.create_task(
                        self._work(store, chat, batch, principal, todo, counts, out_path, err_path)
                    )
            if self.state.draining:
                return  # the server stops: the batch stays in progress and resumes after the restart
            if batch["tenant"] not in self.state.tenants.names:
                raise BatchFailed(
                    "tenant_removed", f"Tenant '{batch['tenant']}' no longer exists on this server."
                )
        current = store.get_batch(None, batch_id)
        if current["cancelling_at"] is not None:
            end = "cancelled"
        elif (
            time.time() >= batch["expires_at"] and current["completed"] + current["failed"] < current["total"]
        ):
            end = "expired"
        else:
            end = "completed"
        await asyncio.to_thread(self._finalize, store, batch_id, end)

    async def _work(
        self, store, chat, batch, principal, todo, counts, out_path: Path, err_path: Path
    ) -> None:
        limiter = chat.tenants.limiters.get(batch["tenant"])
        while todo and self._going(store, batch):
            if limiter is not None and (wait := limiter.wait_s(reserve=0.5)) > 0:
                await asyncio.sleep(min(wait, 5.0))  # half of the tenant's budgets stays for its others
                continue
            request = todo.popleft()
            async with self._slots:
                status, body, request_id = await self._call(chat, principal, request, store, batch)
            if status is None:  # the batch stopped while the request waited for capacity: not run
                return
            result = {
                "id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request["custom_id"],
                "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None,
            }  # fmt: skip
            with open(out_path if status == 200 else err_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
            counts["completed" if status == 200 else "failed"] += 1
            store.update_batch(batch["id"], **counts)

    def _concurrency(self, chat: Any, tenant: str) -> int:
        """Requests at a time: the runner's, and at most half of a tenant's concurrency limit, so that
        its batch never takes the slots of its interactive requests."""
        limiter = chat.tenants.limiters.get(tenant)
        most = limiter.limits.max_concurrent if limiter is not None else None
        return self.concurrency if not most else max(1, min(self.concurrency, most // 2))

    def _going(self, store: Store, batch: dict) -> bool:
        """Whether to start another request: not cancelled, not expired, the server not stopping, the
        tenant still there."""
        if self.state.draining or time.time() >= batch["expires_at"]:
            return False
        if batch["tenant"] not in self.state.tenants.names:
            return False
        return store.get_batch(None, batch["id"])["status"] == "in_progress"

    async def _call(self, chat, principal: Principal, request: dict, store: Store, batch: dict):
        """(status, body, request id) of one request; (None, None, None) if the batch stopped while it
        waited for capacity. Any error of the request's own is its result (a 500 for the server's)."""
        request_id = f"{batch['id']}-{request['custom_id']}"[:128]
        url, body = request["url"], {**request["body"], "stream": False}
        while True:
            try:
                if url == "/v1/chat/completions":
                    req = ChatCompletionRequest.model_validate(body)
                    gen, ticket = await chat.prepare(principal, req)
                    answer = await chat.complete(req, gen, ticket)
                else:
                    req = CompletionRequest.model_validate(body)
                    prompts = await completions.prepare(chat, principal, req)
                    answer = await completions.complete(chat, req, prompts)
                return 200, answer.model_dump(mode="json"), request_id
            except ValidationError as exc:
                err = exc.errors()[0]
                param = ".".join(str(p) for p in err["loc"]) or None
                error = {"message": f"Invalid value for '{param}': {err['msg']}", "type": "invalid_request_error",
                         "param": param, "code": "invalid_value"}  # fmt: skip
                return 400, {"error": error}, request_id
            except APIError as exc:
                if exc.status not in (429, 503):
                    return exc.status, {"error": exc.info.model_dump()}, request_id
                await asyncio.sleep(float((exc.headers or {}).get("Retry-After", RETRY_S)))
                if not self._going(store, batch):
                    return None, None, None
            except Exception:
                log.exception("batch %s: request %s failed", batch["id"], request["custom_id"])
                error = {"message": "The server had an error while processing the request.", "type": "server_error",
                         "param": None, "code": None}  # fmt: skip
                return 500, {"error": error}, request_id

    def _finalize(self, store: Store, batch_id: str, end: str, errors: dict | None = None) -> None:
        """The partial files become the batch's output and error files (each made once: a restart
        during this finds it made), then the batch ends `end`. An expired batch's unrun requests are
        in its error file, as OpenAI's are."""
        batch = store.get_batch(None, batch_id)
        if batch["status"] in FINAL:
            return
        now = int(time.time())
        store.update_batch(batch_id, if_status="in_progress", status="finalizing", finalizing_at=now)
        out_path, err_path = _partials(store, batch_id)
        for path in (out_path, err_path):
            _cut_torn_line(path)
        if end == "expired" and store.file_path(batch["input_file_id"]).is_file():
            done = _finished_ids(out_path, err_path)
            with open(err_path, "a", encoding="utf-8") as f:
                for request in _requests(store, batch):
                    if request["custom_id"] not in done:
                        f.write(json.dumps({
                            "id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request["custom_id"], "response": None,
                            "error": {"code": "batch_expired",
                                      "message": "This request could not be executed before the completion window expired."},
                        }) + "\n")  # fmt: skip
        files = {}
        for key, path, kind in (("output_file_id", out_path, "output"), ("error_file_id", err_path, "error")):
            file_id = f"file-{batch_id.removeprefix('batch_')[:24]}-{kind}"
            if store.get_file(None, file_id) is not None:
                files[key] = file_id  # made before a restart
            elif path.is_file() and path.stat().st_size:
                raw = path.read_bytes()
                store.add_file(
                    file_id,
                    batch["tenant"],
                    f"{batch_id}_{kind}.jsonl",
                    "batch_output",
                    raw,
                    raw.count(b"\n"),
                )
                files[key] = file_id
        counts = dict(zip(("completed", "failed"), _line_counts(out_path, err_path), strict=True))
        if end == "expired":  # its unrun requests count as failed
            counts["failed"] = batch["total"] - counts["completed"]
        store.update_batch(batch_id, status=end, **{f"{end}_at": now}, **files, **counts, errors=errors)
        out_path.unlink(missing_ok=True)
        err_path.unlink(missing_ok=True)


FINAL = ("completed", "failed", "expired", "cancelled")


def _partials(store: Store, batch_id: str) -> tuple[Path, Path]:
    return store.batch_dir() / f"{batch_id}.out.jsonl", store.batch_dir() / f"{batch_id}.err.jsonl"


def _requests(store: Store, batch: dict) -> list[dict]:
    try:
        raw = store.file_path(batch["input_file_id"]).read_bytes()
    except FileNotFoundError:
        raise BatchFailed(
            "input_file_missing", f"The input file {batch['input_file_id']} was deleted."
        ) from None
    return [json.loads(line) for line in _lines(raw.decode("utf-8")) if line.strip()]


def _finished_ids(*paths: Path) -> set[str]:
    return {r["custom_id"] for path in paths for r in _results(path)}


def _counts(out_path: Path, err_path: Path) -> dict[str, int]:
    for path in (out_path, err_path):
        _cut_torn_line(path)
    return dict(zip(("completed", "failed"), _line_counts(out_path, err_path), strict=True))


def _line_counts(*paths: Path) -> list[int]:
    return [path.read_bytes().count(b"\n") if path.is_file() else 0 for path in paths]


def _cut_torn_line(path: Path) -> None:
    """A partial file's last line cut by a crash is removed: the results appended next start a line of
    their own (its request runs again)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _results(path: Path) -> list[dict]:
    """The results appended to a partial file; a line cut by a crash is dropped (its request runs
    again)."""
    if not path.is_file():
        return []
    results = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            results.append(json.loads(line))
        except ValueError:
            continue
    return results
