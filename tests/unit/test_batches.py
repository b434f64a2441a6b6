"""The Batch API through the openai SDK (in process, the tiny model): a batch's answers equal the same
requests sent one by one; bad lines are refused at upload naming the line; a request's own error is
its result in the error file; cancelling keeps what finished; a resumed batch (after a restart) runs
only what it had not finished; capacity refusals wait instead of failing."""

from __future__ import annotations

import asyncio
import io
import json
import time
from types import SimpleNamespace

import openai
import pytest
from test_app import sdk_for, served_state  # noqa: F401 - served_state: the fixture

from mygpt.api.batches import runner
from mygpt.batches import BatchRunner
from mygpt.finetune.jobs import JobManager
from mygpt.finetune.store import Store

pytestmark = pytest.mark.anyio
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
async def state(served_state, tmp_path):  # noqa: F811
    served_state.finetune_store = Store(tmp_path / "store")
    served_state.jobs = JobManager(served_state.finetune_store, None, "tiny", {}, 1)  # never started
    yield served_state
    if served_state.batches is not None:
        await asyncio.wait_for(served_state.batches.stop(), 60)  # (a stop that hangs: an error here, at once)


def lines(*requests: dict) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(r) + "\n" for r in requests).encode())


def chat_line(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": HI, "max_tokens": 4, "temperature": 0, **body}}  # fmt: skip


async def until(read, done, timeout: float = 60):
    """Reads (await read()) until done(value); fails after `timeout` seconds, with the last value."""
    deadline = time.monotonic() + timeout
    while not done(value := await read()):
        assert time.monotonic() < deadline, value
        await asyncio.sleep(0.01)
    return value


async def finished(sdk, batch_id: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = await sdk.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        await asyncio.sleep(0.05)
    raise AssertionError(f"batch still {batch.status}")


async def results(sdk, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    text = (await sdk.files.content(file_id)).text
    return {r["custom_id"]: r for r in map(json.loads, text.splitlines())}


async def test_a_batch_answers_as_its_requests_sent_one_by_one(state):
    sdk = sdk_for(state)
    requests = [chat_line(f"r{i}", messages=[{"role": "user", "content": f"Count to {i}"}]) for i in range(3)]
    requests.append(chat_line("bad", temperature=5))  # its own error: a result, not the batch's failure
    upload = await sdk.files.create(file=("b.jsonl", lines(*requests)), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"team": "qa"},
    )
    assert batch.object == "batch" and batch.request_counts.total == 4 and batch.metadata == {"team": "qa"}
    batch = await finished(sdk, batch.id)
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (
        3,
        1,
    )
    out, err = await results(sdk, batch.output_file_id), await results(sdk, batch.error_file_id)
    usages = [out[f"r{i}"]["response"]["body"]["usage"] for i in range(3)]
    assert batch.model == "tiny" and batch.usage.input_tokens == sum(u["prompt_tokens"] for u in usages)
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in usages) > 0
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    for i in range(3):
        alone = await sdk.chat.completions.create(**requests[i]["body"])
        body = out[f"r{i}"]["response"]["body"]
        assert out[f"r{i}"]["response"]["status_code"] == 200
        assert body["choices"][0]["message"]["content"] == alone.choices[0].message.content
        assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (
            alone.usage.prompt_tokens,
            alone.usage.completion_tokens,
        )
    assert err["bad"]["response"]["status_code"] == 400
    assert err["bad"]["response"]["body"]["error"]["param"] == "temperature"
    assert batch.id in [b.id for b in (await sdk.batches.list()).data]


async def test_an_embeddings_batch_answers_as_its_requests_sent_one_by_one(state):
    sdk = sdk_for(state)
    texts = [["The cat sat on the mat.", "Revenue rose."], "How do I reset my password?", ""]
    requests = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "tiny", "input": t},
        }
        for i, t in enumerate(texts)
    ]
    upload = await sdk.files.create(file=("e.jsonl", lines(*requests)), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    batch = await finished(sdk, batch.id)
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (
        2,
        1,
    )
    out, err = await results(sdk, batch.output_file_id), await results(sdk, batch.error_file_id)
    for i in range(2):
        alone = await sdk.embeddings.create(model="tiny", input=texts[i], encoding_format="float")
        body = out[f"e{i}"]["response"]["body"]
        assert body["object"] == "list" and len(body["data"]) == len(alone.data)
        for got, want in zip(body["data"], alone.data, strict=True):
            assert got["embedding"] == pytest.approx(want.embedding, abs=2e-5)  # floats: the API's default
        assert body["usage"]["prompt_tokens"] == alone.usage.prompt_tokens
    assert batch.usage.input_tokens == sum(
        out[f"e{i}"]["response"]["body"]["usage"]["prompt_tokens"] for i in range(2)
    )
    assert batch.usage.output_tokens == 0
    assert (
        err["e2"]["response"]["status_code"] == 400
        and err["e2"]["response"]["body"]["error"]["param"] == "input"
    )


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ({"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}, "line 1: method"),
        ({"custom_id": "a", "method": "POST", "url": "/v1/moderations", "body": {}}, "line 1: url"),
        ({"method": "POST", "url": "/v1/chat/completions", "body": {}}, "line 1: custom_id"),
        (
            {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"stream": True}},
            "stream",
        ),
    ],
)
async def test_bad_lines_are_refused_at_upload_naming_the_line(state, line, needle):
    with pytest.raises(openai.BadRequestError) as err:
        await sdk_for(state).files.create(file=("b.jsonl", lines(line)), purpose="batch")
    assert needle in err.value.message and err.value.body["code"] == "invalid_file"


async def test_a_batch_refuses_a_training_file_and_another_endpoint(state):
    sdk = sdk_for(state)
    upload = await sdk.files.create(file=("b.jsonl", lines(chat_line("a"))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    assert err.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="1h"
        )
    assert err.value.body["param"] == "completion_window"
    with pytest.raises(openai.NotFoundError):
        await sdk.batches.retrieve("batch_nope")


async def test_cancelling_keeps_what_finished(state):
    sdk = sdk_for(state)
    requests = [chat_line(f"r{i}", max_tokens=40, logit_bias={"2": -100}) for i in range(12)]
    upload = await sdk.files.create(file=("b.jsonl", lines(*requests)), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await until(lambda: sdk.batches.retrieve(batch.id), lambda b: b.request_counts.completed >= 1)
    assert (await sdk.batches.cancel(batch.id)).status == "cancelling"
    batch = await finished(sdk, batch.id)
    done = await results(sdk, batch.output_file_id)
    assert batch.status == "cancelled" and 1 <= len(done) < 12 == batch.request_counts.total
    assert batch.request_counts.completed == len(done) and batch.cancelled_at is not None
    with pytest.raises(openai.BadRequestError):
        await sdk.batches.cancel(batch.id)


async def test_a_resumed_batch_runs_only_what_it_had_not_finished(state):
    """A restart in the middle: the results already appended stay, the others run, none twice."""
    sdk = sdk_for(state)
    store = state.finetune_store
    upload = await sdk.files.create(
        file=("b.jsonl", lines(*[chat_line(f"r{i}") for i in range(3)])), purpose="batch"
    )
    now = int(time.time())
    store.add_batch({"id": "batch_resumed", "tenant": "default", "endpoint": "/v1/chat/completions",
                     "input_file_id": upload.id, "completion_window": "24h", "created_at": now,
                     "expires_at": now + 3600, "total": 3})  # fmt: skip
    store.update_batch("batch_resumed", status="in_progress", in_progress_at=now, completed=1)
    earlier = {
        "id": "batch_req_x",
        "custom_id": "r1",
        "response": {"status_code": 200, "body": {"earlier": True}},
    }
    (store.batch_dir() / "batch_resumed.out.jsonl").write_text(
        json.dumps(earlier) + "\n" + '{"custom_id": "r2", "resp'
    )
    runner(state)  # as app.py starts it at start-up
    batch = await finished(sdk, "batch_resumed")
    out = await results(sdk, batch.output_file_id)
    assert (
        batch.status == "completed"
        and set(out) == {"r0", "r1", "r2"}
        and out["r1"]["response"]["body"] == {"earlier": True}
    )
    assert batch.request_counts.completed == 3


async def test_capacity_refusals_wait_and_an_expired_batch_ends_with_what_it_did(state, monkeypatch):
    """A 429 (the tenant's limits, a full queue) is waited out, not a failed request; a batch past its
    window ends "expired"."""
    from mygpt.api.errors import APIError

    sdk = sdk_for(state)
    real, refusals = state.chat.prepare, {"n": 0}

    async def busy_once(principal, req):
        if refusals["n"] < 2:
            refusals["n"] += 1
            raise APIError(429, "busy", code="rate_limit_exceeded", headers={"Retry-After": "0"})
        return await real(principal, req)

    monkeypatch.setattr(state.chat, "prepare", busy_once)
    upload = await sdk.files.create(file=("b.jsonl", lines(chat_line("a"), chat_line("b"))), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = await finished(sdk, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 2 and refusals["n"] == 2

    store = state.finetune_store
    store.add_batch({"id": "batch_old", "tenant": "default", "endpoint": "/v1/chat/completions",
                     "input_file_id": upload.id, "completion_window": "24h", "created_at": 0, "expires_at": 1,
                     "total": 2})  # fmt: skip
    runner(state)
    batch = await finished(sdk, "batch_old")
    assert batch.status == "expired" and batch.request_counts.completed == 0 and batch.expired_at is not None
    unrun = await results(sdk, batch.error_file_id)  # as OpenAI's: each unrun request, batch_expired
    assert {r["error"]["code"] for r in unrun.values()} == {"batch_expired"} and set(unrun) == {"a", "b"}
    assert batch.request_counts.failed == 2


async def test_a_batch_waiting_out_a_long_refusal_is_cancelled_at_once(state, monkeypatch):
    """A request told to come back in a minute (429 Retry-After: 60) does not hold a cancel back."""
    from mygpt.api.errors import APIError

    sdk = sdk_for(state)
    refused = asyncio.Event()

    async def busy(principal, req):
        refused.set()
        raise APIError(429, "busy", code="rate_limit_exceeded", headers={"Retry-After": "60"})

    monkeypatch.setattr(state.chat, "prepare", busy)
    upload = await sdk.files.create(file=("b.jsonl", lines(chat_line("a"))), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await asyncio.wait_for(refused.wait(), 30)
    await sdk.batches.cancel(batch.id)
    batch = await finished(sdk, batch.id, timeout=10)  # the runner looks every 2 s while it waits
    assert batch.status == "cancelled" and batch.request_counts.completed == 0


def test_the_runner_keeps_room_for_interactive_requests():
    """At most the runner's concurrency, and half of a tenant's concurrency limit: its batch never
    takes every slot its interactive requests need."""
    from mygpt.tenancy.config import Limits
    from mygpt.tenancy.limits import TenantLimiter

    limiters = {
        "two": TenantLimiter("two", Limits(max_concurrent=2)),
        "free": TenantLimiter("free", Limits()),
    }
    chat = SimpleNamespace(tenants=SimpleNamespace(limiters=limiters))
    runner_ = BatchRunner(None, concurrency=4)
    assert [runner_._concurrency(chat, t) for t in ("two", "free", "unknown")] == [1, 4, 4]
    assert BatchRunner(None, concurrency=0).concurrency == 1


async def test_a_draining_server_leaves_its_batch_to_resume(state):
    """SIGTERM: no new request starts, the batch stays in progress (not "completed" with what it
    did), and the next runner finishes it with every request run once."""
    sdk = sdk_for(state)
    upload = await sdk.files.create(file=("b.jsonl", lines(*[chat_line(f"r{i}", max_tokens=12) for i in range(10)])),
                                    purpose="batch")  # fmt: skip
    batch = await sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await until(lambda: sdk.batches.retrieve(batch.id), lambda b: b.request_counts.completed >= 1)
    state.draining = True
    await asyncio.sleep(1.0)  # the requests running finish
    paused = await sdk.batches.retrieve(batch.id)
    assert paused.status == "in_progress" and paused.request_counts.completed < 10
    await state.batches.stop()  # the process ends
    state.draining, state.batches = False, None
    runner(state)  # the next process
    batch = await finished(sdk, batch.id)
    out = await results(sdk, batch.output_file_id)
    assert batch.status == "completed" and sorted(out) == sorted(f"r{i}" for i in range(10))
    assert batch.request_counts.completed == 10


async def test_one_request_that_breaks_the_server_is_its_own_500(state, monkeypatch):
    sdk = sdk_for(state)
    real = state.chat.complete

    async def breaks_on_b(req, gen, ticket):
        if req.messages[0].content == "b":
            raise RuntimeError("a bug")
        return await real(req, gen, ticket)

    monkeypatch.setattr(state.chat, "complete", breaks_on_b)
    requests = [chat_line(x, messages=[{"role": "user", "content": x}]) for x in "abc"]
    upload = await sdk.files.create(file=("b.jsonl", lines(*requests)), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = await finished(sdk, batch.id)
    err = await results(sdk, batch.error_file_id)
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (
        2,
        1,
    )
    assert err["b"]["response"]["status_code"] == 500 and "a bug" not in json.dumps(err["b"])


async def test_an_input_file_in_use_cannot_be_deleted_and_a_vanished_one_fails_the_batch(state, monkeypatch):
    sdk = sdk_for(state)
    store = state.finetune_store
    upload = await sdk.files.create(file=("b.jsonl", lines(chat_line("a"), chat_line("b"))), purpose="batch")
    now = int(time.time())
    store.add_batch({"id": "batch_waiting", "tenant": "default", "endpoint": "/v1/chat/completions",
                     "input_file_id": upload.id, "completion_window": "24h", "created_at": now,
                     "expires_at": now + 3600, "total": 2})  # fmt: skip
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.files.delete(upload.id)
    assert err.value.body["code"] == "file_in_use"
    store.file_path(upload.id).unlink()  # gone anyway (the disk, an operator)
    runner(state)
    batch = await finished(sdk, "batch_waiting")
    assert batch.status == "failed" and batch.errors.data[0].code == "input_file_missing"


async def test_the_runner_survives_a_store_error_and_replicas_never_run_a_batch_twice(state, monkeypatch):
    """Two runners on one store (two replicas): each request runs once. A store error while looking
    for work does not stop a runner."""
    sdk = sdk_for(state)
    store = state.finetune_store
    real, failures = store.batches_with_status, {"n": 0}

    def flaky(*statuses):
        if failures["n"] < 1:
            failures["n"] += 1
            raise RuntimeError("database is locked")
        return real(*statuses)

    monkeypatch.setattr(store, "batches_with_status", flaky)
    other = BatchRunner(state, concurrency=2)  # the other replica's
    other.ensure_started()
    upload = await sdk.files.create(
        file=("b.jsonl", lines(*[chat_line(f"r{i}") for i in range(6)])), purpose="batch"
    )
    batch = await sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    try:
        batch = await finished(sdk, batch.id)
    finally:
        await other.stop()
    text = (await sdk.files.content(batch.output_file_id)).text
    assert sorted(json.loads(line)["custom_id"] for line in text.splitlines()) == [f"r{i}" for i in range(6)]
    assert failures["n"] == 1 and batch.request_counts.completed == 6


def test_a_batch_leaves_half_of_its_tenants_per_minute_budgets():
    from mygpt.tenancy.config import Limits
    from mygpt.tenancy.limits import TenantLimiter

    clock = type("Clock", (), {"now": 0.0, "__call__": lambda self: self.now})()
    limiter = TenantLimiter("a", Limits(requests_per_minute=10), clock)
    for _ in range(5):
        assert limiter.wait_s(reserve=0.5) == 0
        limiter.admit()
    assert limiter.wait_s(reserve=0.5) == pytest.approx(6.0)  # one request back at 10 a minute
    assert limiter.wait_s() == 0  # interactive requests still pass


# ----------------------------------------------------------------------------- the runner on its own
# (a fake ChatService that answers with the request's text: the runner's bookkeeping, fast)


class FakeChat:
    def __init__(self, delay: float = 0.02, limiters: dict | None = None):
        self.delay, self.calls = delay, []
        self.tenants = SimpleNamespace(limiters=limiters or {})

    async def prepare(self, principal, req):
        return req, None

    async def complete(self, req, gen, ticket):
        await asyncio.sleep(self.delay)
        self.calls.append(req.messages[0].content)
        return SimpleNamespace(model_dump=lambda mode=None: {"content": req.messages[0].content})


def fake_state(tmp_path, tenants=("t",), **chat) -> SimpleNamespace:
    return SimpleNamespace(finetune_store=Store(tmp_path), chat=FakeChat(**chat), ready=True, draining=False,
                           tenants=SimpleNamespace(names=list(tenants)), batches=None)  # fmt: skip


def add_batch(state, batch_id: str, n: int, tenant: str = "t", status: str | None = None) -> None:
    store = state.finetune_store
    raw = "".join(
        json.dumps(chat_line(f"r{i}", messages=[{"role": "user", "content": f"r{i}"}])) + "\n"
        for i in range(n)
    )
    store.add_file(f"file-{batch_id}", tenant, "in.jsonl", "batch", raw.encode(), n)
    now = int(time.time())
    store.add_batch({"id": batch_id, "tenant": tenant, "endpoint": "/v1/chat/completions", "input_file_id": f"file-{batch_id}",
                     "completion_window": "24h", "created_at": now, "expires_at": now + 3600, "total": n})  # fmt: skip
    if status:
        store.update_batch(batch_id, status=status)


async def ended(state, batch_id: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = state.finetune_store.get_batch(None, batch_id)
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return batch
        await asyncio.sleep(0.02)
    raise AssertionError(f"{batch_id} still {batch['status']}")


def ids_in_files(state, batch: dict) -> list[str]:
    store = state.finetune_store
    return [json.loads(line)["custom_id"] for key in ("output_file_id", "error_file_id") if batch[key]
            for line in store.file_path(batch[key]).read_text().splitlines()]  # fmt: skip


async def test_a_line_cut_before_its_newline_runs_again(tmp_path):
    state = fake_state(tmp_path)
    add_batch(state, "batch_torn", 3, status="in_progress")
    r1 = {"custom_id": "r1", "response": {"status_code": 200, "body": {}}, "error": None}
    (state.finetune_store.batch_dir() / "batch_torn.out.jsonl").write_text(
        json.dumps(r1)
    )  # no "\n": cut by a crash
    runner_ = BatchRunner(state, 2)
    runner_.ensure_started()
    batch = await ended(state, "batch_torn")
    await runner_.stop()
    assert sorted(ids_in_files(state, batch)) == ["r0", "r1", "r2"] and sorted(state.chat.calls) == [
        "r0",
        "r1",
        "r2",
    ]


async def test_a_runner_that_loses_its_claim_stops_and_no_request_runs_twice(tmp_path):
    """Renewals failing for a moment (the store busy): the other replica takes the batch over; the
    first stops instead of running on beside it."""
    state = fake_state(tmp_path, delay=0.1)
    add_batch(state, "batch_l", 20)
    store = state.finetune_store
    a, b = BatchRunner(state, 1), BatchRunner(state, 1)
    a.LEASE_S = b.LEASE_S = 0.6
    real, t0 = store.claim_batch, time.monotonic()

    def claim(batch_id, owner, lease_s):
        if owner == a.owner and 0.3 < time.monotonic() - t0 < 1.2:
            raise RuntimeError("database is locked")
        return real(batch_id, owner, lease_s)

    store.claim_batch = claim
    a.ensure_started()
    await asyncio.sleep(1.0)
    b.ensure_started()
    batch = await ended(state, "batch_l")
    await a.stop()
    await b.stop()
    assert batch["status"] == "completed" and sorted(ids_in_files(state, batch)) == sorted(
        f"r{i}" for i in range(20)
    )
    assert len(state.chat.calls) == len(set(state.chat.calls)) == 20


async def test_a_transient_store_error_is_retried_not_the_end_of_the_batch(tmp_path):
    state = fake_state(tmp_path)
    add_batch(state, "batch_e", 6)
    store, errors = state.finetune_store, {"n": 0}
    real = store.update_batch

    def update(batch_id, if_status=None, if_owner=None, **fields):
        if "completed" in fields and "status" not in fields and errors["n"] < 1:
            errors["n"] += 1
            raise RuntimeError("database is locked")
        return real(batch_id, if_status=if_status, if_owner=if_owner, **fields)

    store.update_batch = update
    runner_ = BatchRunner(state, 2)
    runner_.ensure_started()
    batch = await ended(state, "batch_e")
    await runner_.stop()
    assert batch["status"] == "completed" and batch["completed"] == 6 and errors["n"] == 1


async def test_batches_waiting_on_their_tenants_budgets_do_not_hold_the_others_back(tmp_path):
    throttled = SimpleNamespace(limits=SimpleNamespace(max_concurrent=None), wait_s=lambda reserve=0.0: 60.0)
    names = ["a", "b", "c", "d", "e"]
    state = fake_state(tmp_path, tenants=names, limiters={n: throttled for n in "abcd"})
    for n in names:
        add_batch(state, f"batch_{n}", 2, tenant=n)
    runner_ = BatchRunner(state, 4)
    runner_.ensure_started()
    batch = await ended(state, "batch_e")
    await runner_.stop()
    assert batch["status"] == "completed"
    assert {state.finetune_store.get_batch(None, f"batch_{n}")["status"] for n in "abcd"} == {"validating"}


async def test_a_cancel_that_comes_as_the_batch_ends_makes_it_cancelled(tmp_path, monkeypatch):
    state = fake_state(tmp_path)
    add_batch(state, "batch_c", 3)
    real = BatchRunner._finalize

    def cancelled_first(self, store_, run, end, errors=None):  # what the cancel route does, just then
        for status in ("validating", "in_progress"):
            store_.update_batch(run.id, if_status=status, status="cancelling", cancelling_at=int(time.time()))
        return real(self, store_, run, end, errors)

    monkeypatch.setattr(BatchRunner, "_finalize", cancelled_first)
    runner_ = BatchRunner(state, 2)
    runner_.ensure_started()
    batch = await ended(state, "batch_c")
    await runner_.stop()
    assert batch["status"] == "cancelled" and batch["cancelled_at"] is not None


async def test_stopping_waits_for_a_finalize_under_way(tmp_path, monkeypatch):
    """stop() while the output files are being made: the claim is released only once they are."""
    state = fake_state(tmp_path)
    add_batch(state, "batch_s", 2)
    store = state.finetune_store
    real = BatchRunner._finalize

    def slow(self, *args, **kwargs):
        time.sleep(0.5)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BatchRunner, "_finalize", slow)
    runner_ = BatchRunner(state, 2)
    runner_.ensure_started()
    await until(lambda: asyncio.to_thread(store.get_batch, None, "batch_s"), lambda b: b["completed"] >= 2)
    await asyncio.sleep(0.1)
    await runner_.stop()
    batch = store.get_batch(None, "batch_s")
    assert batch["status"] == "completed" and batch["owner"] is None


def test_a_batch_line_holds_its_engine_rows():
    """A /v1/completions line with k prompts runs k engine requests at once (times n): it takes k of
    the runner's rows, so a batch keeps to its share; an embeddings line takes one."""
    from mygpt.batches import rows_of

    def line(url, **body):
        return {"url": url, "body": body}

    assert rows_of(line("/v1/chat/completions", n=3)) == 3
    assert rows_of(line("/v1/completions", prompt=["a", "b", "c"], n=2)) == 6
    assert rows_of(line("/v1/completions", prompt=[1, 2, 3])) == 1  # one prompt of token ids
    assert rows_of(line("/v1/completions", prompt=[[1], [2]])) == 2
    assert rows_of(line("/v1/embeddings", input=["a"] * 100)) == 1
    assert rows_of(line("/v1/chat/completions", n="x")) == rows_of({"url": "x"}) == 1
    assert rows_of(line("/v1/chat/completions", n="2")) == rows_of(line("/v1/chat/completions", n=2.0)) == 2


async def test_rows_are_granted_in_order_and_never_overdrawn():
    from mygpt.batches import Rows

    rows = Rows(4)
    held, order = [0], []

    async def request(name: str, n: int, hold: float) -> None:
        async with rows.take(n):
            held[0] += min(n, 4)
            assert held[0] <= 4, held
            order.append(name)
            await asyncio.sleep(hold)
            held[0] -= min(n, 4)

    first = asyncio.ensure_future(request("small-1", 3, 0.05))
    await asyncio.sleep(0)
    tasks = [
        asyncio.ensure_future(request(name, n, 0.01)) for name, n in (("big", 4), ("small-2", 1), ("huge", 9))
    ]
    cancelled = asyncio.ensure_future(request("cancelled", 2, 0.01))
    await asyncio.sleep(0)
    cancelled.cancel()  # waiting in line: it leaves the line, and the rest goes on
    await asyncio.gather(first, *tasks)
    assert order == ["small-1", "big", "small-2", "huge"]  # small-2 did not pass big, though 1 row was free
    assert rows.free == 4 and not rows._waiting


async def test_a_waiter_cancelled_as_rows_come_back_takes_none():
    """A waiter cancelled on the same loop tick as rows are given back (a failing batch's workers
    cancelled together, or another batch's line ending): it takes no rows and none are lost."""
    from mygpt.batches import Rows

    rows = Rows(2)
    release = asyncio.Event()

    async def holder() -> None:
        async with rows.take(2):
            await release.wait()

    async def waiter() -> None:
        async with rows.take(1):
            pass

    h = asyncio.ensure_future(holder())
    await asyncio.sleep(0)
    w = asyncio.ensure_future(waiter())
    await asyncio.sleep(0)
    w.cancel()
    release.set()  # the holder gives its rows back before the waiter's task sees its cancellation
    results = await asyncio.gather(h, w, return_exceptions=True)
    assert results[0] is None and isinstance(results[1], asyncio.CancelledError)
    assert rows.free == 2 and not rows._waiting
    for step in (1, -1):  # both cancelled, in either order
        h = asyncio.ensure_future(holder())
        release.clear()
        await asyncio.sleep(0)
        w = asyncio.ensure_future(waiter())
        await asyncio.sleep(0)
        for t in (h, w)[::step]:
            t.cancel()
        await asyncio.gather(h, w, return_exceptions=True)
        assert rows.free == 2 and not rows._waiting
