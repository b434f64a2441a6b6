"""The fine-tuning loop through the openai SDK against a real server on the tiny model: files, jobs,
events, the adapter served at once to its tenant only; bad input; cancel; a restart loses nothing."""

from __future__ import annotations

import csv
import io
import json
import time

import httpx
import openai
import pytest

from conftest import ServerProcess
from mygpt.lora.synthetic import make_adapter
from mygpt.tenancy.config import hash_key

KEYS = {"acme": "sk-ft-acme-0123456789abcdef", "globex": "sk-ft-globex-0123456789abcdef"}
BASE = "tiny"


def examples(n: int, start: int = 0) -> bytes:
    lines = [
        {"messages": [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": f"Tell me about ship number {i}."},
            {"role": "assistant", "content": f"Arr, ship {i} be a fine vessel, matey! Yo ho ho!"},
        ]}
        for i in range(start, start + n)
    ]  # fmt: skip
    return "\n".join(json.dumps(x) for x in lines).encode() + b"\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    config = {"tenants": {t: {"keys": [f"sha256:{hash_key(k)}"]} for t, k in KEYS.items()}}
    (root / "mygpt.yaml").write_text(json.dumps(config))
    return root


def start(tiny_model_dir, store, name="ft") -> ServerProcess:
    return ServerProcess(
        "--model", str(tiny_model_dir), "--served-model-name", BASE, "--config", str(store / "mygpt.yaml"),
        "--adapter-dir", str(store / "adapters"), name=name, env={"MYGPT_MAX_FILE_BYTES": "20000"},
    ).wait_ready()  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_model_dir, store):
    srv = start(tiny_model_dir, store)
    yield srv
    srv.stop()


def client(server, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEYS[tenant], max_retries=0)


def wait_for(c: openai.OpenAI, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status}")


def test_the_whole_loop(server):
    acme, globex = client(server, "acme"), client(server, "globex")
    train = acme.files.create(file=("train.jsonl", io.BytesIO(examples(24))), purpose="fine-tune")
    valid = acme.files.create(file=("valid.jsonl", io.BytesIO(examples(6, 100))), purpose="fine-tune")
    assert train.id.startswith("file-") and train.bytes > 0 and train.purpose == "fine-tune"
    assert {f.id for f in acme.files.list().data} >= {train.id, valid.id}
    assert globex.files.list().data == []  # files are per tenant
    job = acme.fine_tuning.jobs.create(
        model=BASE, training_file=train.id, validation_file=valid.id, suffix="pirate", seed=7,
        hyperparameters={"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 25},
    )  # fmt: skip
    assert job.status == "queued" and job.hyperparameters.n_epochs == 3
    job = wait_for(acme, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{BASE}:acme:pirate:{job.id}" and job.trained_tokens > 0
    assert job.estimated_finish is None  # (a running job's is estimated)
    events = acme.fine_tuning.jobs.list_events(job.id, limit=100).data
    messages = [e.message for e in events]
    assert any("Base model validation loss" in m for m in messages)
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all("train_loss" in e.data for e in metrics)
    epochs = sorted(
        (e.data for e in events if (e.data or {}).get("type") == "epoch"), key=lambda d: d["epoch"]
    )
    base_loss = next(e.data["valid_loss"] for e in events if (e.data or {}).get("type") == "base_valid_loss")
    assert epochs[-1]["valid_loss"] < base_loss  # it learned the style
    # OpenAI's result file: a CSV row per step, each epoch's validation loss on its last step
    (results,) = job.result_files
    assert acme.files.retrieve(results).purpose == "fine-tune-results"
    rows = list(csv.DictReader(io.StringIO(acme.files.content(results).text)))
    assert [int(r["step"]) for r in rows] == sorted(e.data["step"] for e in metrics)
    assert [float(r["valid_loss"]) for r in rows if r["valid_loss"]] == [e["valid_loss"] for e in epochs]
    with pytest.raises(openai.BadRequestError) as err:  # not a training file
        acme.fine_tuning.jobs.create(model=BASE, training_file=results)
    assert err.value.body["param"] == "training_file"
    # served at once, to its tenant only
    assert job.fine_tuned_model in {m.id for m in acme.models.list().data}
    assert job.fine_tuned_model not in {m.id for m in globex.models.list().data}
    with pytest.raises(openai.NotFoundError):
        globex.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}]
        )
    ask = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Tell me about ship number 3."},
    ]
    tuned = acme.chat.completions.create(
        model=job.fine_tuned_model, messages=ask, max_tokens=12, temperature=0
    )
    base = acme.chat.completions.create(model=BASE, messages=ask, max_tokens=12, temperature=0)
    assert tuned.choices[0].message.content != base.choices[0].message.content
    assert [j.id for j in acme.fine_tuning.jobs.list().data][0] == job.id
    with pytest.raises(openai.NotFoundError):
        globex.fine_tuning.jobs.retrieve(job.id)
    # the checkpoints of the epochs before the last (6 steps each), newest first, served as models
    ckpts = acme.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [12, 6]
    assert [c.metrics.full_valid_loss for c in ckpts] == [e["valid_loss"] for e in epochs[1::-1]]
    assert ckpts[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-12"
    assert {c.fine_tuned_model_checkpoint for c in ckpts} <= {m.id for m in acme.models.list().data}
    early = acme.chat.completions.create(
        model=ckpts[1].fine_tuned_model_checkpoint, messages=ask, max_tokens=12, temperature=0
    )
    assert early.choices[0].message.content != tuned.choices[0].message.content  # one epoch in
    assert [c.id for c in acme.fine_tuning.jobs.checkpoints.list(job.id, after=ckpts[0].id).data] == [
        ckpts[1].id
    ]
    with pytest.raises(openai.NotFoundError):
        globex.fine_tuning.jobs.checkpoints.list(job.id)
    acme.models.delete(ckpts[1].fine_tuned_model_checkpoint)  # the tenant's to delete, like the model
    assert [c.id for c in acme.fine_tuning.jobs.checkpoints.list(job.id).data] == [ckpts[0].id]


def test_a_tenant_deletes_its_fine_tuned_model_and_reads_its_files(server, tiny_model_dir, store):
    """OpenAI's models.delete on a fine-tuned model: only its tenant's, only fine-tuned ones (not the
    base, not what the operator loaded), gone from /v1/models, from routing and from the store (a
    restart would not find it again); files.content returns an uploaded file."""
    acme, globex = client(server, "acme"), client(server, "globex")
    raw = examples(8)
    train = acme.files.create(file=("short.jsonl", io.BytesIO(raw)), purpose="fine-tune")
    assert acme.files.content(train.id).content == raw
    with pytest.raises(openai.NotFoundError):
        globex.files.content(train.id)
    job = acme.fine_tuning.jobs.create(model=BASE, training_file=train.id, hyperparameters={"n_epochs": 1})
    job = wait_for(acme, job.id)
    assert job.status == "succeeded", job.error
    model = job.fine_tuned_model
    make_adapter(tiny_model_dir, store / "adapters" / "acme" / "operators", 4, ["q_proj"], seed=5)
    assert {model, "operators"} <= {m.id for m in acme.models.list().data}

    with pytest.raises(openai.NotFoundError):  # another tenant's: as if it did not exist
        globex.models.delete(model)
    for other in (BASE, "operators"):
        with pytest.raises(openai.PermissionDeniedError):
            acme.models.delete(other)
    deleted = acme.models.delete(model)
    assert (deleted.id, deleted.deleted) == (model, True)
    assert model not in {m.id for m in acme.models.list().data}
    assert "operators" in {m.id for m in acme.models.list().data}
    assert not (store / "adapters" / "acme" / model).exists()
    with pytest.raises(openai.NotFoundError):
        acme.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        acme.models.delete(model)
    assert acme.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == model  # the job's record stays


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"messages": [{"role": "user", "content": "hi"}]\n', "line 1: not valid JSON"),
        (
            examples(2) + b'{"messages": [{"role": "robot", "content": "x"}]}\n',
            "line 3: messages[0].role 'robot'",
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: no assistant message"),
        (b"", "no examples"),
        (b"\n\n", "no examples"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_files_name_the_problem(server, content, needle):
    with pytest.raises(openai.BadRequestError) as err:
        client(server, "acme").files.create(file=("bad.jsonl", io.BytesIO(content)), purpose="fine-tune")
    assert needle in err.value.message and err.value.code == "invalid_file"


def test_bad_requests_are_4xx_naming_the_problem(server):
    acme, globex = client(server, "acme"), client(server, "globex")
    with pytest.raises(openai.APIStatusError) as err:
        acme.files.create(file=("big.jsonl", io.BytesIO(examples(400))), purpose="fine-tune")
    assert err.value.status_code == 413 and "20000 bytes" in err.value.message
    with pytest.raises(openai.BadRequestError, match="purpose"):
        acme.files.create(file=("a.jsonl", io.BytesIO(examples(2))), purpose="assistants")
    theirs = globex.files.create(file=("t.jsonl", io.BytesIO(examples(4))), purpose="fine-tune")
    mine = acme.files.create(file=("m.jsonl", io.BytesIO(examples(4))), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as err:
        acme.fine_tuning.jobs.create(model=BASE, training_file=theirs.id)
    assert err.value.body["param"] == "training_file" and "No such file" in err.value.message
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(theirs.id)  # exactly as a file that does not exist
    with pytest.raises(openai.BadRequestError, match="cannot be fine-tuned here"):
        acme.fine_tuning.jobs.create(model="gpt-4o", training_file=mine.id)
    for hp, param in [({"n_epochs": 1000}, "n_epochs"), ({"batch_size": 0}, "batch_size"),
                      ({"learning_rate_multiplier": -1}, "learning_rate_multiplier"), ({"lora_rank": 64}, "lora_rank")]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as err:
            acme.fine_tuning.jobs.create(model=BASE, training_file=mine.id, hyperparameters=hp)
        assert err.value.body["param"] == f"hyperparameters.{param}"
    for suffix in ("Not OK!", "ok\n"):  # the pattern ended in $, which let a trailing newline in
        with pytest.raises(openai.BadRequestError, match="suffix"):
            acme.fine_tuning.jobs.create(model=BASE, training_file=mine.id, suffix=suffix)
    with pytest.raises(openai.BadRequestError) as err:  # past SQLite's int64: was a 500
        acme.fine_tuning.jobs.create(model=BASE, training_file=mine.id, seed=2**63)
    assert err.value.body["param"] == "seed"
    assert acme.files.delete(mine.id).deleted
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(mine.id)
    r = httpx.get(server.base_url + "/v1/files", headers={"Authorization": "Bearer wrong-key-0123456789"})
    assert r.status_code == 401


def test_a_batch_on_a_real_server_belongs_to_its_tenant(server):
    """The Batch API through the SDK on a real server: the answers of a tenant's batch file, which
    another tenant cannot see."""
    acme, globex = client(server, "acme"), client(server, "globex")
    requests = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": BASE, "messages": [{"role": "user", "content": f"Ship {i}?"}], "max_tokens": 5,
                  "temperature": 0}}
        for i in range(3)
    ]  # fmt: skip
    raw = "".join(json.dumps(r) + "\n" for r in requests).encode()
    upload = acme.files.create(file=("batch.jsonl", io.BytesIO(raw)), purpose="batch")
    batch = acme.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.NotFoundError):
        globex.batches.retrieve(batch.id)
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = acme.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 3, batch
    out = [json.loads(line) for line in acme.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == ["q0", "q1", "q2"]
    alone = acme.chat.completions.create(**requests[1]["body"])
    answer = next(r for r in out if r["custom_id"] == "q1")["response"]["body"]
    assert answer["choices"][0]["message"]["content"] == alone.choices[0].message.content
    assert globex.batches.list().data == []


def test_cancel_and_restart_lose_nothing(server, tiny_model_dir, store):
    acme = client(server, "acme")
    train = acme.files.create(file=("long.jsonl", io.BytesIO(examples(60))), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(model=BASE, training_file=train.id, hyperparameters={"n_epochs": 50})
    running = wait_for(acme, job.id, statuses=("running",), timeout=60)
    cancelled = acme.fine_tuning.jobs.cancel(running.id)
    assert cancelled.status == "cancelled" and wait_for(acme, cancelled.id).status == "cancelled"
    # a job running when the server stops checkpoints and resumes after the restart; a queued one runs
    long_job = acme.fine_tuning.jobs.create(
        model=BASE, training_file=train.id, hyperparameters={"n_epochs": 50}
    )
    deadline = time.monotonic() + 120
    while not acme.fine_tuning.jobs.checkpoints.list(long_job.id).data:  # an epoch's end, served
        assert time.monotonic() < deadline
        time.sleep(0.5)
    estimate = acme.fine_tuning.jobs.retrieve(long_job.id).estimated_finish  # 48 epochs to go
    assert estimate is not None and estimate > time.time()
    queued = acme.fine_tuning.jobs.create(model=BASE, training_file=train.id, hyperparameters={"n_epochs": 1})
    trained = {j.fine_tuned_model for j in acme.fine_tuning.jobs.list().data if j.status == "succeeded"}
    served = {m.id for m in acme.models.list().data}  # the trained ones less those deleted
    server.stop()  # SIGTERM: the trainer checkpoints at its step's end
    again = start(tiny_model_dir, store, name="ft-restart")
    try:
        acme = client(again, "acme")
        deadline = time.monotonic() + 120
        while True:
            events = acme.fine_tuning.jobs.list_events(long_job.id, limit=1000).data  # newest first
            at = next((i for i, e in enumerate(events) if "resumed from its checkpoint" in e.message), None)
            if at is not None:
                break
            assert time.monotonic() < deadline
            time.sleep(0.5)
        before = max(e.data["step"] for e in events[at:] if e.type == "metrics")
        assert events[at].message.endswith(f"at step {before}."), (events[at].message, before)  # lost none
        ckpt = acme.fine_tuning.jobs.checkpoints.list(long_job.id).data[0].fine_tuned_model_checkpoint
        assert ckpt in {m.id for m in acme.models.list().data}  # served again after the restart
        # paused: the trainer checkpoints and stops; resumed: it goes on from that step
        acme.fine_tuning.jobs.pause(long_job.id)
        paused = wait_for(acme, long_job.id, statuses=("paused",), timeout=60)
        message = acme.fine_tuning.jobs.list_events(paused.id, limit=1).data[0].message
        assert message.startswith("Fine-tuning job paused at step"), message
        step = int(message.removeprefix("Fine-tuning job paused at step ").rstrip("."))
        assert acme.fine_tuning.jobs.resume(long_job.id).status == "queued"
        deadline = time.monotonic() + 60
        while True:  # newest first: the pause's event, and newer ones once it runs again
            messages = [e.message for e in acme.fine_tuning.jobs.list_events(long_job.id, limit=1000).data]
            newer = messages[: messages.index(message)]
            if f"Fine-tuning job resumed from its checkpoint at step {step}." in newer:
                break
            assert time.monotonic() < deadline, newer
            time.sleep(0.5)
        assert acme.fine_tuning.jobs.cancel(long_job.id).status == "cancelled"
        assert ckpt not in {m.id for m in acme.models.list().data}  # a cancelled job made nothing
        assert train.id in {f.id for f in acme.files.list().data}
        assert wait_for(acme, queued.id).status == "succeeded"
        models = {m.id for m in acme.models.list().data}
        assert trained & served <= models  # adapters trained before the restart are still served
        assert not (trained - served) & models  # and deleted ones stay deleted
    finally:
        again.stop()


@pytest.mark.slow
def test_the_loop_on_the_default_model(default_checkpoint, tmp_path):
    """The same loop on the real default model (NF4 SmolLM2-135M): one short epoch, served after."""
    server = ServerProcess("--adapter-dir", str(tmp_path / "adapters"), name="ft-default").wait_ready()
    try:
        c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        base = c.models.list().data[0].id
        train = c.files.create(file=("t.jsonl", io.BytesIO(examples(8))), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(model=base, training_file=train.id, validation_file=train.id,
                                        suffix="smoke", hyperparameters={"n_epochs": 1, "batch_size": 8})  # fmt: skip
        job = wait_for(c, job.id, timeout=300)
        assert job.status == "succeeded", job.error
        ask = [{"role": "user", "content": "Tell me about ship number 3."}]
        r = c.chat.completions.create(model=job.fine_tuned_model, messages=ask, max_tokens=8, temperature=0)
        assert r.model == job.fine_tuned_model and r.usage.completion_tokens > 0
    finally:
        server.stop()


def test_the_shipped_demo_adapters_show_their_effect(default_server):
    """adapters/default/{pirate,json}, trained by scripts/make_demo_adapters.py, change one answer visibly."""
    c = openai.OpenAI(base_url=default_server.base_url + "/v1", api_key="x", max_retries=0)
    ask = [{"role": "user", "content": "What is the capital of Spain?"}]
    answers = {
        m: c.chat.completions.create(model=m, messages=ask, max_tokens=40, temperature=0)
        .choices[0]
        .message.content
        for m in ("SmolLM2-135M-Instruct", "pirate", "json")
    }
    assert "Madrid" in answers["SmolLM2-135M-Instruct"]
    assert any(w in answers["pirate"] for w in ("Arr", "matey", "Yo ho", "Ahoy", "Savvy", "Yarr")), answers
    assert "Madrid" in json.loads(answers["json"])["answer"], answers
