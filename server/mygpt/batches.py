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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mygpt.api import completions
from mygpt.api.errors import APIError, invalid_value
from mygpt.api.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, one_or_many
from mygpt.finetune.data import DataError, json_lines
from mygpt.finetune.store import OPEN_BATCHES, Store, off_loop
from mygpt.tenancy.auth import Principal

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_REQUESTS = 50_000  # per batch, as OpenAI's
WINDOW_S = {"24h": 24 * 3600}
OPEN = OPEN_BATCHES
RETRY_S = 1.0  # a refusal for capacity without Retry-After


def validate_batch(raw: bytes) -> tuple[int, set[str], set[str]]:
    """Checks every line of an uploaded batch file; returns the number of requests, their urls and
    their models. The error names the line."""
    ids: set[str] = set()
    urls: set[str] = set()
    models: set[str] = set()
    for number, item in json_lines(raw):
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
        models.add(str(body.get("model")))
        if len(ids) > MAX_REQUESTS:
            raise DataError(f"more than {MAX_REQUESTS} requests")
    if not ids:
        raise DataError(
            'the file has no requests: one JSON object per line, {"custom_id", "method", "url", "body"}'
        )
    return len(ids), urls, models


def rows_of(request: dict) -> int:
    """The engine rows a batch line's request holds at once: its choices (n), for each of its prompts
    (a /v1/completions line may hold several); an embeddings line, one (its inputs run one at a time).
    A malformed body counts one: it fails validation before it runs."""
    body = request.get("body") or {}
    try:  # as the request's model reads it ("2" and 2.0 are 2)
        n = max(int(body.get("n") or 1), 1)
    except (TypeError, ValueError, OverflowError):
        n = 1
    if request.get("url") == "/v1/embeddings":
        return 1
    prompts = len(one_or_many(body.get("prompt"))) if request.get("url") == "/v1/completions" else 1
    return n * prompts


class Rows:
    """The batch runner's share of the engine's rows: a request takes as many as it holds at once
    (rows_of, at most all of them), granted in arrival order (a large request is not passed for good
    by small ones). Giving rows back never waits (it runs in finally blocks, cancellations included)."""

    def __init__(self, total: int):
        self.total = total
        self.free = total
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @contextlib.asynccontextmanager
    async def take(self, rows: int):
        rows = min(max(rows, 1), self.total)
        if self._waiting or self.free < rows:
            granted = asyncio.get_running_loop().create_future()
            self._waiting.append((rows, granted))
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():  # granted as it was cancelled
                    self._give(rows)
                else:
                    with contextlib.suppress(ValueError):  # (_grant may have dropped it already)
                        self._waiting.remove((rows, granted))
                    self._grant()  # it may have been first in line
                raise
        else:
            self.free -= rows
        try:
            yield
        finally:
            self._give(rows)

    def _give(self, rows: int) -> None:
        self.free += rows
        self._grant()

    def _grant(self) -> None:
        while self._waiting and (self._waiting[0][1].done() or self._waiting[0][0] <= self.free):
            rows, granted = self._waiting.popleft()
            if granted.done():  # cancelled, its task not yet run: it takes nothing
                continue
            self.free -= rows
            granted.set_result(None)


class BatchFailed(Exception):
    """A batch that cannot go on (its input file gone, its tenant removed): it ends failed, with the
    results it has."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class _Run:
    """One batch being run by this runner: lost once another runner holds its claim."""

    batch: dict
    lost: bool = False
    # its finished requests are recorded one at a time, in order: the stored counts only grow
    recording: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def id(self) -> str:
        return self.batch["id"]


class BatchRunner:
    """Runs the store's open batches in the server's event loop: up to MAX_ACTIVE at once, one per
    tenant, their requests `concurrency` at a time in all (each tenant's at most half of its own
    concurrency limit, at least one, and only while half of its per-minute budgets is left: a batch
    that waits THROTTLED_S for them gives its place up to others and comes back). A batch is claimed
    in the store for LEASE_S seconds and the claim renewed while it runs, so that replicas sharing
    the store never run one batch at once; a runner that loses the claim stops. An unexpected error
    (the store busy, say) is retried with backoff, RETRIES times, before the batch ends failed."""

    MAX_ACTIVE = 4
    LEASE_S = 60.0
    THROTTLED_S = 30.0
    RETRIES = 5

    def __init__(self, state: Any, concurrency: int):
        self.state = state  # the ServerState: its store and ChatService once the model is loaded
        self.concurrency = max(1, concurrency)
        self.owner = f"runner-{uuid.uuid4().hex}"
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._slots: Rows | None = None
        self._active: dict[str, tuple[str, asyncio.Task]] = {}  # batch id -> (tenant, its task)
        self._errors: collections.Counter[str] = collections.Counter()  # batch id -> unexpected errors
        self._not_before: dict[str, float] = {}  # batch id -> when to try it again

    def ensure_started(self) -> None:
        """Starts the runner in the running event loop (once), and wakes it for new work."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._slots = Rows(self.concurrency)
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
            self._wake.clear()  # before looking: a wake while it looks is not lost
            try:
                await self._schedule()
            except Exception:  # the store unreachable a moment, say: the runner goes on
                log.exception("the batch runner could not look for work")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 2.0)

    async def _schedule(self) -> None:
        state = self.state
        store, chat = state.finetune_store, state.chat
        if store is None or chat is None or not state.ready or state.draining:
            return
        self._active = {b: (t, task) for b, (t, task) in self._active.items() if not task.done()}
        now = time.time()
        for batch in await off_loop(store.batches_with_status, *OPEN):
            if batch["id"] in self._active or now < self._not_before.get(batch["id"], 0.0):
                continue
            if (
                batch["status"] in ("validating", "in_progress") and now < batch["expires_at"]
            ):  # it runs requests
                busy = {tenant for tenant, _ in self._active.values()}
                if batch["tenant"] in busy or len(self._active) >= self.MAX_ACTIVE:
                    continue
                limiter = chat.tenants.limiters.get(batch["tenant"])
                if limiter is not None and limiter.wait_s(reserve=0.5) > 0:
                    continue  # its tenant's budgets are low: other tenants' batches first
            if not await off_loop(store.claim_batch, batch["id"], self.owner, self.LEASE_S):
                continue  # another runner's (a replica's)
            run = _Run(batch)
            task = asyncio.get_running_loop().create_task(self._guarded(store, chat, run))
            task.add_done_callback(lambda _: self._wake.set())
            self._active[batch["id"]] = (batch["tenant"], task)

    async def _guarded(self, store: Store, chat: Any, run: _Run) -> None:
        """_process with its claim renewed; a BatchFailed ends the batch failed with what it did; an
        unexpected error is retried later, and ends it failed after RETRIES."""
        renew = asyncio.get_running_loop().create_task(self._renew(store, run))
        try:
            try:
                await self._process(store, chat, run)
                self._errors.pop(run.id, None)
            except BatchFailed as exc:
                await self._finalized(store, run, "failed", _errors(exc.code, str(exc)))
            except asyncio.CancelledError:
                raise
            except Exception:
                self._errors[run.id] += 1
                log.exception("batch %s: error %d of %d", run.id, self._errors[run.id], self.RETRIES)
                if self._errors[run.id] < self.RETRIES:
                    self._not_before[run.id] = time.time() + 2.0 ** self._errors[run.id]
                else:
                    message = "The server had an error while running this batch."
                    await self._finalized(store, run, "failed", _errors("internal_error", message))
        except asyncio.CancelledError:
            raise
        except Exception:  # finalizing failed too: tried again later
            log.exception("batch %s could not be finalized", run.id)
            self._not_before[run.id] = time.time() + 30.0
        finally:
            renew.cancel()
            with contextlib.suppress(Exception):
                await off_loop(store.release_batch, run.id, self.owner)

    async def _renew(self, store: Store, run: _Run) -> None:
        """Renews the claim; lost when another runner holds it, or the store has refused the renewal
        for half the lease (the other runner may take it soon)."""
        failing_since = None
        while True:
            await asyncio.sleep(self.LEASE_S / 4)
            try:
                held = await off_loop(store.claim_batch, run.id, self.owner, self.LEASE_S)
                failing_since = None
            except Exception:
                failing_since = failing_since or time.time()
                held = time.time() - failing_since < self.LEASE_S / 2
            if not held:
                log.warning("batch %s: another runner holds it now; this one stops", run.id)
                run.lost = True
                return

    async def _process(self, store: Store, chat: Any, run: _Run) -> None:
        batch = run.batch
        if batch["status"] == "validating":  # (a cancel that came meanwhile stays)
            await off_loop(
                store.update_batch,
                run.id, if_status="validating", status="in_progress", in_progress_at=int(time.time()),
            )  # fmt: skip
        out_path, err_path = _partials(store, run.id)
        if await self._in_progress(store, run):
            counts, done = await off_loop(_tally, out_path, err_path)  # (a torn last line cut first)
            requests = await off_loop(_requests, store, batch)
            todo = collections.deque(r for r in requests if r["custom_id"] not in done)
            principal = Principal(batch["tenant"])
            async with asyncio.TaskGroup() as workers:
                for _ in range(min(self._concurrency(chat, batch["tenant"]), len(todo))):
                    workers.create_task(
                        self._work(store, chat, run, principal, todo, counts, out_path, err_path)
                    )
            if batch["tenant"] not in self.state.tenants.names:
                raise BatchFailed(
                    "tenant_removed", f"Tenant '{batch['tenant']}' no longer exists on this server."
                )
            if run.lost or self.state.draining:
                return  # another runner has it, or the server stops: it resumes as it stood
            if todo and await self._in_progress(store, run):
                return  # gave its place up (its tenant's budgets): scheduled again later
        await self._finalized(store, run, None)

    async def _finalized(self, store: Store, run: _Run, end: str | None, errors: dict | None = None) -> None:
        """_finalize in a thread, waited for even when the runner stops meanwhile (its claim is released
        only after)."""
        job = asyncio.ensure_future(off_loop(self._finalize, store, run, end, errors))
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            await asyncio.wait({job})
            raise

    async def _work(
        self, store, chat, run: _Run, principal, todo, counts, out_path: Path, err_path: Path
    ) -> None:
        limiter = chat.tenants.limiters.get(run.batch["tenant"])
        waited = 0.0
        while todo and await self._going(store, run):
            if limiter is not None and (wait := limiter.wait_s(reserve=0.5)) > 0:
                if waited >= self.THROTTLED_S:
                    return  # its place goes to another batch; this one comes back
                await asyncio.sleep(min(wait, 2.0))  # half of the tenant's budgets stays for its others
                waited += min(wait, 2.0)
                continue
            waited = 0.0
            request = todo.popleft()
            async with self._slots.take(rows_of(request)):
                result = (
                    await self._call(chat, principal, request, store, run)
                    if await self._going(store, run)
                    else None
                )
            if result is None:  # not run: stopped meanwhile
                todo.appendleft(request)
                return
            status, body, request_id = result
            line = {
                "id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request["custom_id"],
                "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None,
            }  # fmt: skip
            counts["completed" if status == 200 else "failed"] += 1
            if status == 200:
                _add_usage(counts, body)
            async with run.recording:
                path = out_path if status == 200 else err_path
                if not await off_loop(self._record, store, run, path, line, dict(counts)):
                    run.lost = True  # another runner holds it: this one stops

    def _record(self, store: Store, run: _Run, path: Path, line: dict, counts: dict) -> bool:
        """A finished request's line appended to its partial file, and the batch's counts stored (in a
        thread: a commit waits for the disk). False if another runner holds the batch now."""
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        return store.update_batch(run.id, if_owner=self.owner, **counts)

    def _concurrency(self, chat: Any, tenant: str) -> int:
        """Requests at a time: the runner's, and at most half of a tenant's concurrency limit (at least
        one), so that its batch does not take the slots of its interactive requests."""
        limiter = chat.tenants.limiters.get(tenant)
        most = limiter.limits.max_concurrent if limiter is not None else None
        return self.concurrency if not most else max(1, min(self.concurrency, most // 2))

    async def _going(self, store: Store, run: _Run) -> bool:
        """Whether to start another request: the claim held, not cancelled, not expired, the server not
        stopping, the tenant still there."""
        if run.lost or self.state.draining or run.batch["tenant"] not in self.state.tenants.names:
            return False
        return await self._in_progress(store, run)

    @staticmethod
    async def _in_progress(store: Store, run: _Run) -> bool:
        """In progress in the store (not cancelled, by any replica) and not expired."""
        if time.time() >= run.batch["expires_at"]:
            return False
        return (await off_loop(store.get_batch, None, run.id))["status"] == "in_progress"

    async def _call(self, chat, principal: Principal, request: dict, store: Store, run: _Run):
        """(status, body, request id) of one request; None if the batch stopped while it waited for
        capacity. Any error of the request's own is its result (a 500 for the server's)."""
        request_id = f"{run.id}-{request['custom_id']}"[:128]
        url, body = request["url"], {**request["body"], "stream": False}
        while True:
            try:
                if url == "/v1/chat/completions":
                    req = ChatCompletionRequest.model_validate(body)
                    gen, ticket = await chat.prepare(principal, req)
                    answer = await chat.complete(req, gen, ticket)
                elif url == "/v1/embeddings":
                    # one input in the engine at a time: the one row rows_of counts for it
                    req = EmbeddingRequest.model_validate(body)
                    answer = await self.state.embeddings.embed(principal, req, window=1)
                else:
                    req = CompletionRequest.model_validate(body)
                    prompts = await completions.prepare(chat, principal, req)
                    answer = await completions.complete(chat, req, prompts)
                return 200, answer.model_dump(mode="json"), request_id
            except ValidationError as exc:
                return 400, {"error": invalid_value(exc.errors()).info.model_dump()}, request_id
            except APIError as exc:
                if exc.status not in (429, 503):
                    return exc.status, {"error": exc.info.model_dump()}, request_id
                until = time.time() + float((exc.headers or {}).get("Retry-After", RETRY_S))
                while True:  # the wait it asks for, a cancel seen within 2 s
                    await asyncio.sleep(max(0.0, min(2.0, until - time.time())))
                    if not await self._going(store, run):
                        return None
                    if time.time() >= until:
                        break
            except Exception:
                log.exception("batch %s: request %s failed", run.id, request["custom_id"])
                error = {"message": "The server had an error while processing the request.", "type": "server_error",
                         "param": None, "code": None}  # fmt: skip
                return 500, {"error": error}, request_id

    def _finalize(self, store: Store, run: _Run, end: str | None, errors: dict | None = None) -> None:
        """The partial files become the batch's output and error files, then it ends: `end` (failed),
        or what it came to (cancelled, expired, completed). The end is recorded first, so a restart
        during this ends it the same; each file is made once. An expired batch's unrun requests are
        in its error file, as OpenAI's are."""
        batch = store.get_batch(None, run.id)
        if batch["status"] in FINAL or batch["owner"] not in (None, self.owner) or run.lost:
            return
        out_path, err_path = _partials(store, run.id)
        for path in (out_path, err_path):
            _cut_torn_line(path)
        now = int(time.time())
        if batch["ending"] is not None:  # decided before a restart
            end, errors = batch["ending"], batch["errors"]
        else:
            if batch["status"] in ("validating", "in_progress"):
                store.update_batch(run.id, if_status=batch["status"], status="finalizing", finalizing_at=now)
                batch = store.get_batch(None, run.id)  # a cancel may have come first
            if end is None:
                finished = sum(_line_counts(out_path, err_path))
                expired = time.time() >= batch["expires_at"] and finished < batch["total"]
                end = (
                    "cancelled" if batch["status"] == "cancelling" else "expired" if expired else "completed"
                )
            store.update_batch(run.id, ending=end, errors=errors)
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
            file_id = f"file-{run.id.removeprefix('batch_')[:24]}-{kind}"
            if store.get_file(None, file_id) is not None:
                files[key] = file_id  # made before a restart
            elif path.is_file() and path.stat().st_size:
                raw = path.read_bytes()
                store.add_file(
                    file_id, batch["tenant"], f"{run.id}_{kind}.jsonl", "batch_output", raw, raw.count(b"\n")
                )
                files[key] = file_id
        counts, _ = _tally(out_path, err_path)
        if end == "expired":  # its unrun requests count as failed
            counts["failed"] = batch["total"] - counts["completed"]
        store.update_batch(
            run.id, if_status=batch["status"], status=end, **{f"{end}_at": now}, **files, **counts
        )
        out_path.unlink(missing_ok=True)
        err_path.unlink(missing_ok=True)


def _errors(code: str, message: str) -> dict:
    return {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]}


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
    return [item for _, item in json_lines(raw)]


def _finished_ids(*paths: Path) -> set[str]:
    return {r["custom_id"] for path in paths for r in _results(path)}


def _tally(out_path: Path, err_path: Path) -> tuple[dict[str, int], set[str]]:
    """The batch's request counts and token usage, and the custom ids it has finished, from its
    partial files (a torn last line cut first), each read once."""
    for path in (out_path, err_path):
        _cut_torn_line(path)
    answers, failures = _results(out_path), _results(err_path)
    counts = dict(zip(("completed", "failed"), _line_counts(out_path, err_path), strict=True))
    counts.update(input_tokens=0, cached_tokens=0, output_tokens=0)
    for result in answers:
        _add_usage(counts, (result.get("response") or {}).get("body") or {})
    return counts, {r["custom_id"] for r in answers + failures}


def _add_usage(counts: dict[str, int], body: dict) -> None:
    """Adds an answer's usage (chat and text completions' and embeddings' shapes) to the batch's totals."""
    usage = body.get("usage") or {}
    counts["input_tokens"] += usage.get("prompt_tokens") or 0
    counts["cached_tokens"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    counts["output_tokens"] += usage.get("completion_tokens") or 0


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
