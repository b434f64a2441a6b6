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


class BatchRunner:
    """Runs the store's open batches one after another, in the server's event loop."""

    def __init__(self, state: Any, concurrency: int):
        self.state = state  # the ServerState: its store and ChatService once the model is loaded
        self.concurrency = max(1, concurrency)
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    def ensure_started(self) -> None:
        """Starts the runner in the running event loop (once), and wakes it for new work."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mygpt-batches")
        self._wake.set()

    async def stop(self) -> None:
        """Stops at once: running requests are aborted and run again when a runner resumes the batch."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            store, chat = self.state.finetune_store, self.state.chat
            if store is None or chat is None or not self.state.ready or self.state.draining:
                await asyncio.sleep(0.5)
                continue
            open_batches = await asyncio.to_thread(store.batches_with_status, *OPEN)
            if not open_batches:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 5.0)
                continue
            batch = open_batches[0]
            try:
                await self._process(store, chat, batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never a batch lost silently: it ends failed, with the reason
                log.exception("batch %s failed", batch["id"])
                error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}", "param": None,
                         "line": None}  # fmt: skip
                store.update_batch(
                    batch["id"],
                    status="failed",
                    failed_at=int(time.time()),
                    errors={"object": "list", "data": [error]},
                )

    async def _process(self, store: Store, chat: Any, batch: dict) -> None:
        batch_id = batch["id"]
        if batch["status"] == "validating":  # (a cancel that came meanwhile stays)
            store.update_batch(
                batch_id, if_status="validating", status="in_progress", in_progress_at=int(time.time())
            )
        out_path, err_path = (store.batch_dir() / f"{batch_id}.{kind}.jsonl" for kind in ("out", "err"))
        if batch["status"] in ("validating", "in_progress"):
            for path in (out_path, err_path):
                _cut_torn_line(path)
            raw = await asyncio.to_thread(store.file_path(batch["input_file_id"]).read_bytes)
            requests = [json.loads(line) for line in _lines(raw.decode("utf-8")) if line.strip()]
            done = {r["custom_id"] for path in (out_path, err_path) for r in _results(path)}
            todo = collections.deque(r for r in requests if r["custom_id"] not in done)
            counts = {"completed": len(_results(out_path)), "failed": len(_results(err_path))}
            principal = Principal(batch["tenant"])
            workers = [
                self._work(store, chat, batch, principal, todo, counts, out_path, err_path)
                for _ in range(min(self._concurrency(chat, batch["tenant"]), len(todo)))
            ]
            await asyncio.gather(*workers)
        current = store.get_batch(None, batch_id)
        if current["status"] == "cancelling":
            end = "cancelled"
        elif (
            time.time() >= batch["expires_at"] and current["completed"] + current["failed"] < current["total"]
        ):
            end = "expired"
        else:
            end = "completed"
        await asyncio.to_thread(self._finalize, store, current, end, out_path, err_path)

    async def _work(
        self, store, chat, batch, principal, todo, counts, out_path: Path, err_path: Path
    ) -> None:
        while todo and self._going(store, batch):
            request = todo.popleft()
            status, body, request_id = await self._call(chat, principal, request, store, batch)
            if status is None:  # cancelled or expired while it waited for capacity
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
        """Whether to start another request: not cancelled, not expired, the server not stopping."""
        if self.state.draining or time.time() >= batch["expires_at"]:
            return False
        return store.get_batch(None, batch["id"])["status"] == "in_progress"

    async def _call(self, chat, principal: Principal, request: dict, store: Store, batch: dict):
        """(status, body, request id) of one request; (None, None, None) if the batch stopped while it
        waited for capacity."""
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

    def _finalize(self, store: Store, batch: dict, end: str, out_path: Path, err_path: Path) -> None:
        """The partial files become the batch's output and error files; then the batch ends `end`."""
        now = int(time.time())
        store.update_batch(batch["id"], status="finalizing", finalizing_at=batch["finalizing_at"] or now)
        files = {}
        for key, path, purpose in (
            ("output_file_id", out_path, "batch_output"),
            ("error_file_id", err_path, "batch_output"),
        ):
            results = _results(path)
            if results and batch[key] is None:
                raw = "".join(json.dumps(r) + "\n" for r in results).encode()
                name = f"{batch['id']}_{'output' if key == 'output_file_id' else 'error'}.jsonl"
                row = store.add_file(
                    f"file-{uuid.uuid4().hex[:24]}", batch["tenant"], name, purpose, raw, len(results)
                )
                files[key] = row["id"]
                store.update_batch(batch["id"], **files)  # recorded at once: a restart does not make it twice
        counts = {"completed": len(_results(out_path)), "failed": len(_results(err_path))}
        store.update_batch(batch["id"], status=end, **{f"{end}_at": now}, **counts)
        out_path.unlink(missing_ok=True)
        err_path.unlink(missing_ok=True)


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
