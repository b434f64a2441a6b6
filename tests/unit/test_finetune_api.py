"""The fine-tuning API's checks at job creation, through the openai SDK (in process, the tiny model)."""

from __future__ import annotations

import io
import json

import openai
import pytest
from test_app import sdk_for, served_state  # noqa: F401 - served_state: the fixture

from mygpt.finetune.jobs import JobManager
from mygpt.finetune.store import Store
from mygpt.lora.registry import AdapterRegistry

pytestmark = pytest.mark.anyio
LONG_BASE = "a-served-model-name/" + "x" * 40  # "/" is not an adapter name's character


@pytest.fixture
def state(served_state, tmp_path):  # noqa: F811
    served_state.finetune_store = Store(tmp_path / "store")
    registry = AdapterRegistry(tmp_path / "adapters", ["default"], {}, 16)
    served_state.jobs = JobManager(served_state.finetune_store, registry, LONG_BASE, {}, 1)  # never started
    return served_state


async def test_a_job_whose_model_name_would_be_too_long_is_refused_at_creation(state):
    """The model's name (ft:<base>:<tenant>:<suffix>:<job>) must be a valid adapter name, or the job
    would fail after its training; the base's other characters are replaced."""
    sdk = sdk_for(state)
    line = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}
    train = await sdk.files.create(file=("t.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")),
                                   purpose="fine-tune")  # fmt: skip
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.fine_tuning.jobs.create(model=LONG_BASE, training_file=train.id, suffix="s" * 40)
    assert err.value.body["param"] == "suffix" and "at most 128" in err.value.body["message"]
    job = await sdk.fine_tuning.jobs.create(model=LONG_BASE, training_file=train.id, suffix="short")
    assert state.jobs.adapter_name(state.finetune_store.get_job(None, job.id)).startswith(
        "ft:a-served-model-name-xxxx"
    )


async def test_method_integrations_and_metadata_are_honoured_or_refused(state):
    """B2: OpenAI's `method` (supervised: its hyperparameters are used), `metadata` (kept and
    returned); dpo, reinforcement and integrations are refused naming the parameter."""
    sdk = sdk_for(state)
    line = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}
    train = await sdk.files.create(file=("t.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")),
                                   purpose="fine-tune")  # fmt: skip
    supervised = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 1}}}
    job = await sdk.fine_tuning.jobs.create(
        model=LONG_BASE, training_file=train.id, method=supervised, metadata={"team": "support"}
    )
    assert (job.hyperparameters.n_epochs, job.method.supervised.hyperparameters.batch_size) == (2, 1)
    assert job.metadata == {"team": "support"}
    assert (await sdk.fine_tuning.jobs.retrieve(job.id)).metadata == {"team": "support"}
    refused = [
        ({"method": {"type": "dpo", "dpo": {}}}, "method.type"),
        ({"method": {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.5}}}}, "method.dpo"),
        ({"method": supervised, "hyperparameters": {"n_epochs": 3}}, "hyperparameters"),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 99}}}},
         "method.supervised.hyperparameters.n_epochs"),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ]  # fmt: skip
    for extra, param in refused:
        with pytest.raises(openai.BadRequestError) as err:
            await sdk.fine_tuning.jobs.create(model=LONG_BASE, training_file=train.id, **extra)
        assert err.value.body["param"] == param, (extra, err.value.body)


async def test_pause_and_resume_through_the_sdk(state):
    """client.fine_tuning.jobs.pause / resume: a queued job pauses at once (a running one once its
    trainer has checkpointed: tests/unit/test_finetune_store.py); only a paused job resumes."""
    sdk = sdk_for(state)
    line = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}
    train = await sdk.files.create(file=("t.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")),
                                   purpose="fine-tune")  # fmt: skip
    job = await sdk.fine_tuning.jobs.create(model=LONG_BASE, training_file=train.id)
    assert (await sdk.fine_tuning.jobs.pause(job.id)).status == "paused"
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.fine_tuning.jobs.pause(job.id)
    assert err.value.body["code"] == "invalid_state"
    assert (await sdk.fine_tuning.jobs.resume(job.id)).status == "queued"
    with pytest.raises(openai.BadRequestError):
        await sdk.fine_tuning.jobs.resume(job.id)
    await sdk.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.BadRequestError):
        await sdk.fine_tuning.jobs.pause(job.id)


async def test_a_job_created_where_no_server_trains_says_so_and_the_gauge_shows_it(state):
    """Every server sharing the store runs --no-train: a new job waits queued, and its events say why
    (a warning), and mygpt_finetune_trainers reads 0. Once a server that trains is seen, a new job
    has no such event; the gauge counts it; it leaves the count when it stops."""
    from prometheus_client import generate_latest

    sdk = sdk_for(state)
    line = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}
    train = await sdk.files.create(file=("t.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")),
                                   purpose="fine-tune")  # fmt: skip

    def gauge() -> float:
        text = generate_latest(metrics.registry).decode()
        return float(
            next(x for x in text.splitlines() if x.startswith("mygpt_finetune_trainers ")).split()[1]
        )

    from mygpt.metrics import CostModel, Metrics

    metrics = Metrics(CostModel())
    metrics.watch_background(state._background)
    alone = await sdk.fine_tuning.jobs.create(model=LONG_BASE, training_file=train.id)
    events = (await sdk.fine_tuning.jobs.list_events(alone.id)).data
    warned = [e for e in events if e.level == "warn"]
    assert len(warned) == 1 and "--no-train" in warned[0].message and "stays queued" in warned[0].message
    assert state.jobs.trainers_live() == 0 and gauge() == 0
    other = JobManager(state.finetune_store, state.jobs.registry, LONG_BASE, {}, 1)
    other._seen()  # as its worker does each round (another replica, sharing the store)
    JobManager(state.finetune_store, state.jobs.registry, "another-base", {}, 1)._seen()  # not this base's
    trained = await sdk.fine_tuning.jobs.create(model=LONG_BASE, training_file=train.id)
    assert not [e for e in (await sdk.fine_tuning.jobs.list_events(trained.id)).data if e.level == "warn"]
    assert state.jobs.trainers_live() == 1 and gauge() == 1
    other.stop()  # its worker never started: stop only leaves the count
    assert state.jobs.trainers_live() == 0


async def test_a_store_error_in_the_trainer_check_does_not_fail_a_stored_job(state, monkeypatch):
    """The check for a server that trains runs after the job is stored: a store error there (a lock
    on a network file system) logs a warning, and the job is created, once (a 500 would make the
    client retry into a second job)."""
    import sqlite3

    sdk = sdk_for(state)
    line = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}
    train = await sdk.files.create(file=("t.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")),
                                   purpose="fine-tune")  # fmt: skip

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(state.finetune_store, "trainers", locked)
    job = await sdk.fine_tuning.jobs.create(model=LONG_BASE, training_file=train.id)
    assert [j["id"] for j in state.finetune_store.jobs_with_status("queued")] == [job.id]


async def test_lists_filters_and_files_in_use_as_openai_answers(state):
    """Files: `purpose`, newest first, `limit` and `after`; a job's file cannot be deleted before the job
    ends; lists are in creation order within one second too (newest first: the last created);
    jobs.list(metadata=...) filters; OpenAI's suffixes; true is no epoch count."""
    sdk = sdk_for(state)
    line = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}
    data = json.dumps(line).encode() + b"\n"
    batch_line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}}  # fmt: skip
    train = [
        await sdk.files.create(file=(f"t{i}.jsonl", io.BytesIO(data)), purpose="fine-tune") for i in range(3)
    ]
    batch = await sdk.files.create(
        file=("b.jsonl", io.BytesIO(json.dumps(batch_line).encode())), purpose="batch"
    )
    listed = await sdk.files.list()
    assert [f.id for f in listed.data] == [batch.id, *(f.id for f in reversed(train))]  # newest first
    assert [f.id for f in (await sdk.files.list(purpose="batch")).data] == [batch.id]
    assert [f.id for f in (await sdk.files.list(purpose="fine-tune", order="asc")).data] == [
        f.id for f in train
    ]
    one = await sdk.files.list(limit=1)
    assert [f.id for f in one.data] == [batch.id] and one.has_more
    assert [f.id for f in (await sdk.files.list(limit=2, after=batch.id)).data] == [train[2].id, train[1].id]
    with pytest.raises(openai.BadRequestError):
        await sdk.files.list(order="sideways")

    jobs = [
        await sdk.fine_tuning.jobs.create(
            model=LONG_BASE, training_file=train[0].id, validation_file=train[1].id,
            metadata={"run": str(i)}, suffix="custom_suffix" if i == 0 else None,
        )
        for i in range(4)
    ]  # fmt: skip
    assert [j.id for j in (await sdk.fine_tuning.jobs.list()).data] == [j.id for j in reversed(jobs)]
    assert [j.id for j in (await sdk.fine_tuning.jobs.list(metadata={"run": "2"})).data] == [jobs[2].id]
    assert (
        state.jobs.adapter_name(state.finetune_store.get_job(None, jobs[0].id)).count(":custom_suffix:") == 1
    )
    for file in train[:2]:  # the training and the validation file of queued jobs
        with pytest.raises(openai.BadRequestError) as err:
            await sdk.files.delete(file.id)
        assert err.value.body["code"] == "file_in_use"
    assert (await sdk.files.delete(train[2].id)).deleted
    for job in jobs:
        await sdk.fine_tuning.jobs.cancel(job.id)
    assert (await sdk.files.delete(train[0].id)).deleted  # the jobs ended
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.fine_tuning.jobs.create(
            model=LONG_BASE, training_file=train[1].id, hyperparameters={"n_epochs": True}
        )
    assert err.value.body["param"] == "hyperparameters.n_epochs"


async def test_files_expire_as_asked(state):
    """expires_after (as the SDK sends it): the file says when; past it, it is gone for every caller
    and deleted, but not while an unfinished job reads it."""
    sdk = sdk_for(state)
    store = state.finetune_store
    line = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}
    data = json.dumps(line).encode() + b"\n"
    upload = {"file": ("t.jsonl", io.BytesIO(data)), "purpose": "fine-tune"}
    brief = await sdk.files.create(**upload, expires_after={"anchor": "created_at", "seconds": 3600})
    assert brief.expires_at == brief.created_at + 3600
    read = await sdk.files.create(
        file=("r.jsonl", io.BytesIO(data)),
        purpose="fine-tune",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    job = await sdk.fine_tuning.jobs.create(model=LONG_BASE, training_file=read.id)
    for bad in (
        {"anchor": "created_at", "seconds": 60},
        {"anchor": "last_active_at", "seconds": 3600},
        {"anchor": "created_at", "seconds": "³³³³"},  # digits, not ASCII ones: a 500 before (review)
    ):
        with pytest.raises(openai.BadRequestError) as err:
            await sdk.files.create(file=("t.jsonl", io.BytesIO(data)), purpose="fine-tune", expires_after=bad)
        assert err.value.body["param"].startswith("expires_after.")
    store._q(
        "UPDATE file_expiry SET expires_at=? WHERE id IN (?, ?)", brief.created_at - 1, brief.id, read.id
    )
    assert [f.id for f in (await sdk.files.list()).data] == []  # both past their time
    with pytest.raises(openai.NotFoundError):
        await sdk.files.retrieve(brief.id)
    assert not store.file_path(brief.id).exists() and store.file_path(read.id).exists()  # the job's: kept
    await sdk.fine_tuning.jobs.cancel(job.id)
    await sdk.files.list()
    assert not store.file_path(read.id).exists()
    assert store._q("SELECT * FROM file_expiry") == []
