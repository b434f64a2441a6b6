"""The fine-tuning store's SQLite schema across versions, and a job's result file."""

from __future__ import annotations

import csv
import io
import sqlite3
import sys
import time

import pytest

from mygpt.finetune.jobs import results_csv
from mygpt.finetune.store import Store

OLD_JOBS = """CREATE TABLE jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model TEXT NOT NULL, training_file TEXT NOT NULL,
    validation_file TEXT, suffix TEXT, hyperparameters TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL, created_at INTEGER NOT NULL, finished_at INTEGER, fine_tuned_model TEXT,
    trained_tokens INTEGER, error TEXT)"""


def test_a_store_written_before_result_files_opens_with_its_jobs(tmp_path):
    """An upgraded server opens the store an older one wrote: its jobs come back, with no result
    files, and new results are recorded."""
    db = sqlite3.connect(tmp_path / "mygpt.sqlite3")
    db.execute(OLD_JOBS)
    db.execute(
        "INSERT INTO jobs VALUES ('ftjob-1','acme','tiny','file-1',NULL,NULL,'{}',7,'succeeded',1,2,'ft:x',10,NULL)"
    )
    db.commit()
    db.close()
    store = Store(tmp_path)
    job = store.get_job("acme", "ftjob-1")
    assert (job["fine_tuned_model"], job["result_files"]) == ("ft:x", [])
    store.update_job("ftjob-1", result_files=["file-2"])
    assert Store(tmp_path).get_job("acme", "ftjob-1")["result_files"] == ["file-2"]


def test_the_result_file_has_a_row_per_step_and_each_epochs_validation_loss():
    step = {"event": "step", "total_steps": 4, "tokens_per_s": 1.0}
    curve = [
        {**step, "step": 1, "epoch": 1, "train_loss": 2.5, "trained_tokens": 10},
        {**step, "step": 2, "epoch": 1, "train_loss": 2.0, "trained_tokens": 20},
        {"event": "epoch", "epoch": 1, "valid_loss": 1.75},
        {**step, "step": 3, "epoch": 2, "train_loss": 9.0, "trained_tokens": 30},  # then interrupted
        {**step, "step": 3, "epoch": 2, "train_loss": 1.5, "trained_tokens": 30},  # resumed at step 2
        {"event": "epoch", "epoch": 2, "valid_loss": None},  # no validation file
    ]
    rows = list(csv.DictReader(io.StringIO(results_csv(curve).decode())))
    assert [(r["step"], r["epoch"], r["train_loss"], r["valid_loss"], r["trained_tokens"]) for r in rows] == [
        ("1", "1", "2.5", "", "10"),
        ("2", "1", "2.0", "1.75", "20"),
        ("3", "2", "1.5", "", "30"),
    ]


def test_a_batches_table_without_the_later_columns_gains_them(tmp_path):
    """A store whose batches table lacks the claim, ending, model and usage columns opens with them."""
    db = sqlite3.connect(tmp_path / "mygpt.sqlite3")
    db.execute(
        "CREATE TABLE batches (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, endpoint TEXT NOT NULL, input_file_id TEXT"
        " NOT NULL, completion_window TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL, expires_at"
        " INTEGER, in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,"
        " expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER, output_file_id TEXT, error_file_id TEXT,"
        " total INTEGER NOT NULL, completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,"
        " metadata TEXT, errors TEXT)"
    )
    db.execute("INSERT INTO batches (id, tenant, endpoint, input_file_id, completion_window, status, created_at, total)"
               " VALUES ('batch_1','acme','/v1/chat/completions','file-1','24h','in_progress',1,2)")  # fmt: skip
    db.commit()
    db.close()
    store = Store(tmp_path)
    assert store.claim_batch("batch_1", "runner-a", 60)
    batch = store.get_batch("acme", "batch_1")
    assert (batch["owner"], batch["input_tokens"], batch["ending"]) == ("runner-a", 0, None)


def add_jobs(store: Store, *ids: str) -> None:
    for job_id in ids:
        store.add_job({"id": job_id, "tenant": "acme", "model": "tiny", "training_file": "file-1",
                       "validation_file": None, "suffix": None, "hyperparameters": {}, "seed": 1})  # fmt: skip


def test_a_queued_job_starts_once_across_servers_sharing_the_store(tmp_path):
    """Replicas sharing the store: the first claim of a queued job wins; the others (and a job
    cancelled meanwhile) are not started again."""
    from mygpt.finetune.jobs import JobManager

    store = Store(tmp_path)
    add_jobs(store, "ftjob-1", "ftjob-2")
    assert store.claim_job("ftjob-1", "a", 60) and not store.claim_job("ftjob-1", "b", 60)
    store.update_job("ftjob-2", status="cancelled")
    assert not store.claim_job("ftjob-2", "a", 60)
    other = JobManager(store, None, "tiny", {}, 1)  # no registry: it would fail if it went on
    other._run(store.get_job(None, "ftjob-1"))  # the other replica's worker, one step behind: returns
    assert store.get_job(None, "ftjob-1")["status"] == "running" and other._current is None


@pytest.fixture
def manager(tmp_path):
    """A JobManager on a store whose trainer sleeps (a job that runs until stopped)."""
    from mygpt.finetune.jobs import JobManager
    from mygpt.lora.registry import AdapterRegistry

    store = Store(tmp_path / "store")
    registry = AdapterRegistry(tmp_path / "adapters", ["acme"], {}, 16)
    made: list[JobManager] = []

    def make(trainer: str = "import time; time.sleep(60)") -> JobManager:
        jobs = JobManager(store, registry, "tiny", {}, 1)
        jobs.TRAINER = (sys.executable, "-c", trainer)  # + the spec's path
        jobs.BEAT_S = jobs.IDLE_S = 0.05
        made.append(jobs)
        return jobs

    yield store, make
    for jobs in made:
        if jobs._thread.is_alive():
            jobs.stop()


def wait_until(check, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def status_events(store: Store, job_id: str) -> list[str]:
    """The job's end events, newest first."""
    ends = ("succeeded", "failed", "cancelled")
    return [s for e in store.events(job_id, 100) if (s := (e["data"] or {}).get("status")) in ends]


def test_a_job_cancelled_through_another_server_stops_where_it_runs(manager):
    """Replicas sharing the store: the cancel is in the store at once, and the server running the job
    stops its trainer at its next renewal; nothing ends the job a second time."""
    store, make = manager
    runs, other = make(), make()
    add_jobs(store, "ftjob-1")
    runs.start()
    wait_until(lambda: runs._proc is not None)
    assert store.get_job(None, "ftjob-1")["owner"] == runs.owner
    other.cancel("ftjob-1")
    assert store.get_job(None, "ftjob-1")["status"] == "cancelled"
    wait_until(lambda: runs._current is None, timeout=5)  # the trainer stopped (it sleeps 60 s)
    assert store.get_job(None, "ftjob-1")["status"] == "cancelled"
    assert status_events(store, "ftjob-1") == ["cancelled"]


def test_a_job_whose_server_stops_resumes_on_another_and_one_running_is_left_alone(manager):
    """A second server that starts leaves the job another one runs (its lease is renewed). When that
    server stops, its lease ends with it, and the job is queued again and runs on the other."""
    store, make = manager
    runs, other = make(), make()
    add_jobs(store, "ftjob-1")
    runs.start()
    wait_until(lambda: runs._current == "ftjob-1")
    other.start()
    time.sleep(0.3)  # several of the other's rounds
    assert store.get_job(None, "ftjob-1")["owner"] == runs.owner and other._current is None
    runs.stop()
    wait_until(lambda: other._current == "ftjob-1")
    job = store.get_job(None, "ftjob-1")
    assert (job["status"], job["owner"], job["stalls"]) == ("running", other.owner, 1)
    assert any("starts again from the beginning" in e["message"] for e in store.events("ftjob-1", 100))
    assert status_events(store, "ftjob-1") == []


def test_an_orphan_resumes_from_its_newest_checkpoint_and_fails_after_stalling(manager):
    """A job whose lease ended is queued again: to resume from its newest checkpoint, or from the
    start without one. Interrupted MAX_STALLS times in a row without a new checkpoint, it fails."""
    from mygpt.finetune.trainer import STATE

    store, make = manager
    finder = make()  # its worker is not started: _end_orphans() is called here
    add_jobs(store, "ftjob-1")

    def interrupted() -> dict:
        assert store.claim_job("ftjob-1", "killed-server", lease_s=-1)  # claimed, its lease already over
        finder._end_orphans()
        return store.get_job(None, "ftjob-1")

    job = interrupted()
    assert (job["status"], job["stalls"], job["resume_step"]) == ("queued", 1, 0)
    ckpt = store.checkpoint_dir("ftjob-1") / "step-00000005"
    ckpt.mkdir(parents=True)
    (ckpt / STATE).touch()
    job = interrupted()  # progress since: the count starts again
    assert (job["status"], job["stalls"], job["resume_step"]) == ("queued", 0, 5)
    assert "resumes from its checkpoint at step 5" in store.events("ftjob-1", 1)[0]["message"]
    for stalls in range(1, finder.MAX_STALLS):
        job = interrupted()
        assert (job["status"], job["stalls"]) == ("queued", stalls)
    job = interrupted()
    assert job["status"] == "failed" and job["error"]["code"] == "server_restarted"
    assert "3 times in a row" in job["error"]["message"] and not store.checkpoint_dir("ftjob-1").exists()


def test_metrics_show_the_stores_open_work_and_the_tokens_this_replica_trained(manager, tmp_path):
    """mygpt_finetune_jobs and mygpt_batches: open jobs and batches by tenant and status (zeros for
    every tenant, nothing of a removed one); mygpt_finetune_trained_tokens_total: the steps' tokens,
    a resumed run's counted from its checkpoint (not again)."""
    from prometheus_client.parser import text_string_to_metric_families

    from mygpt.config import Settings
    from mygpt.cost import CostModel
    from mygpt.metrics import Metrics
    from mygpt.state import ServerState
    from mygpt.tenancy.config import load_tenancy
    from mygpt.tenancy.tenants import Tenants

    store, make = manager
    add_jobs(store, "ftjob-1", "ftjob-2", "ftjob-3")
    assert store.claim_job("ftjob-1", "a", 60)
    store.update_job("ftjob-3", status="succeeded")
    state = ServerState(Settings(), Tenants(load_tenancy(None)))  # one open tenant: "default"
    state.finetune_store, state.jobs, state.metrics = store, make(), Metrics(CostModel())
    state.metrics.watch_background(state._background)
    store._q("UPDATE jobs SET tenant='default' WHERE id IN ('ftjob-1','ftjob-2')")
    job = store.get_job(None, "ftjob-1")
    step = {"event": "step", "step": 1, "total_steps": 9, "epoch": 1, "train_loss": 1.0}
    state.jobs._record(job, {**step, "trained_tokens": 10})
    state.jobs._record(job, {**step, "trained_tokens": 25})
    state.jobs._record(
        job, {"event": "resumed", "step": 1, "epoch": 1, "trained_tokens": 10}
    )  # from a checkpoint
    state.jobs._record(job, {**step, "trained_tokens": 25})  # its step 2 again: counted again, it ran again
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(state.metrics.exposition().decode())
        for s in f.samples
        if s.name.startswith(("mygpt_finetune", "mygpt_batches"))
    }
    assert values[("mygpt_finetune_jobs", (("status", "queued"), ("tenant", "default")))] == 1
    assert values[("mygpt_finetune_jobs", (("status", "running"), ("tenant", "default")))] == 1
    assert values[("mygpt_batches", (("status", "in_progress"), ("tenant", "default")))] == 0
    assert values[("mygpt_finetune_trained_tokens_total", (("tenant", "default"),))] == 40
    assert not [k for k in values if ("tenant", "acme") in k[1]]  # ftjob-3's tenant is not configured


# a trainer that writes a checkpoint every 20 ms until it is killed
CHECKPOINTING = """
import json, sys, time
from pathlib import Path
spec = json.loads(Path(sys.argv[1]).read_text())
for step in range(1, 3000):
    path = Path(spec["checkpoint_dir"]) / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "trainer_state.pt").touch()
    time.sleep(0.02)
"""

# a trainer that ends its training when told to stop (SIGTERM in its last step): its adapter is done
DONE_ON_SIGTERM = """
import json, signal, sys, time
def done(*_):
    print(json.dumps({"event": "done", "trained_tokens": 5, "tokens_per_s": 1.0}), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
time.sleep(60)
"""


def test_a_server_that_lost_a_jobs_lease_runs_it_again_once_it_is_queued(manager):
    """Its renewal fails (another server queued the job again, as after a stall of LEASE_S): the
    trainer stops, and the job is this server's to claim again like any queued job (no spin on it)."""
    store, make = manager
    runs = make()
    add_jobs(store, "ftjob-1", "ftjob-2")
    runs.start()
    wait_until(lambda: runs._current == "ftjob-1" and runs._proc is not None)
    first = runs._proc
    store.update_job("ftjob-1", status="queued", owner=None, lease_until=None)  # as _end_orphans does
    wait_until(lambda: runs._current == "ftjob-1" and runs._proc not in (None, first))
    assert first.poll() is not None and store.get_job(None, "ftjob-1")["owner"] == runs.owner
    assert store.get_job(None, "ftjob-2")["status"] == "queued"  # next in line, not lost


def test_a_cancelled_job_leaves_no_checkpoint_even_one_its_trainer_wrote_after_the_cancel(manager):
    store, make = manager
    runs, other = make(CHECKPOINTING), make()
    add_jobs(store, "ftjob-1")
    runs.start()
    wait_until(lambda: len(list(store.checkpoint_dir("ftjob-1").glob("step-*"))) >= 3)
    # a checkpoint served as the cancel deleted its record (a race): found by its name all the same
    served = (
        runs.registry.store_of("acme") / f"{runs.adapter_name(store.get_job(None, 'ftjob-1'))}:ckpt-step-3"
    )
    served.mkdir(parents=True)
    (served / "adapter_config.json").write_text("{}")
    other.cancel("ftjob-1")  # through another server: its trainer writes on until the next renewal
    wait_until(lambda: runs._current is None)
    assert store.get_job(None, "ftjob-1")["status"] == "cancelled"
    wait_until(lambda: not store.checkpoint_dir("ftjob-1").exists() and not served.exists(), timeout=5)
    time.sleep(0.2)  # the trainer is gone: nothing comes back
    assert not store.checkpoint_dir("ftjob-1").exists() and not served.exists()


def test_a_trainer_that_finishes_while_the_server_stops_ends_its_job(manager):
    """SIGTERM in the last step: nothing is left to checkpoint, the trainer ends its training, and the
    job ends with it (here failed: the fake trainer wrote no adapter), not queued to run again."""
    store, make = manager
    runs = make(DONE_ON_SIGTERM)
    add_jobs(store, "ftjob-1")
    runs.start()
    wait_until(lambda: runs._proc is not None)
    time.sleep(0.3)  # the fake trainer's signal handler is set
    runs.stop()
    job = store.get_job(None, "ftjob-1")
    assert job["status"] == "failed" and "adapter" in job["error"]["message"], job  # it looked for it


# a trainer that checkpoints and exits on SIGTERM, as the real one does at its step's end
PAUSES_ON_SIGTERM = """
import json, signal, sys, time
from pathlib import Path
def paused(*_):
    path = Path(json.loads(Path(sys.argv[1]).read_text())["checkpoint_dir"]) / "step-00000003"
    path.mkdir(parents=True)
    (path / "trainer_state.pt").touch()
    print(json.dumps({"event": "paused", "step": 3}), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, paused)
time.sleep(60)
"""


def test_a_job_paused_through_another_server_checkpoints_stops_and_resumes_when_asked(manager):
    store, make = manager
    runs, other = make(PAUSES_ON_SIGTERM), make()
    add_jobs(store, "ftjob-1", "ftjob-2")
    runs.start()
    wait_until(lambda: runs._current == "ftjob-1")
    time.sleep(0.3)  # the fake trainer's signal handler is set
    other.pause("ftjob-1")
    assert store.get_job(None, "ftjob-1")["status"] == "running"  # until its trainer has checkpointed
    wait_until(lambda: store.events("ftjob-1", 1)[0]["message"] == "Fine-tuning job paused at step 3.")
    assert store.get_job(None, "ftjob-1")["status"] == "paused"
    wait_until(lambda: runs._current == "ftjob-2")  # the device goes to the next job
    other.pause("ftjob-2")
    wait_until(lambda: store.get_job(None, "ftjob-2")["status"] == "paused")
    assert other.resume("ftjob-1") and not other.resume("ftjob-1")  # (queued now, not paused)
    wait_until(lambda: runs._current == "ftjob-1")
    job = store.get_job(None, "ftjob-1")
    assert (job["status"], job["owner"], job["pause_requested"]) == ("running", runs.owner, 0)
    other.cancel("ftjob-2")  # a paused job can be cancelled
    assert store.get_job(None, "ftjob-2")["status"] == "cancelled"


def test_a_pause_that_could_not_finish_where_it_ran_still_pauses_the_job(manager):
    """The trainer died on the pause's SIGTERM before it could checkpoint (its handler not set yet),
    or the server running it stopped: the job is paused all the same (from its newest checkpoint),
    not failed, nor queued to run again."""
    store, make = manager
    runs, other = make(), make()  # this fake trainer dies on SIGTERM, as the real one would at its start
    add_jobs(store, "ftjob-1", "ftjob-2")
    runs.start()
    wait_until(lambda: runs._current == "ftjob-1")
    assert other.pause("ftjob-1")
    wait_until(lambda: store.events("ftjob-1", 1)[0]["message"] == "Fine-tuning job paused.")
    assert store.get_job(None, "ftjob-1")["status"] == "paused"
    runs.stop()
    add_jobs(store, "ftjob-3")
    assert store.claim_job("ftjob-3", "killed-server", lease_s=-1)  # its server died: an orphan
    store.update_job("ftjob-3", pause_requested=1)  # after a pause was asked for
    other._end_orphans()
    job = store.get_job(None, "ftjob-3")
    assert (job["status"], job["pause_requested"], job["owner"]) == ("paused", 0, None)
    assert not other.pause("ftjob-3")  # (already paused)


MOUNTINFO = """22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 27 0:50 / /data rw,relatime shared:5 - nfs4 10.0.0.2:/export rw,vers=4.1
41 40 0:51 / /data/local rw,relatime - ext4 /dev/sdb1 rw
42 27 0:52 / /mnt/efs rw - fuse.efs-proxy efs rw
43 27 0:53 / /my\\040disk rw - ceph 10.0.0.3:/ rw
"""


def test_the_store_uses_the_rollback_journal_on_a_network_file_system(tmp_path, monkeypatch):
    """SQLite's WAL needs every process on one host (shared memory): replicas on several nodes that
    share the store's volume over NFS, CephFS or EFS get the rollback journal."""
    from mygpt.finetune import store as store_module
    from mygpt.finetune.store import fs_type

    kinds = {
        p: fs_type(p, MOUNTINFO) for p in ("/data/adapters", "/data/local/x", "/", "/mnt/efs/a", "/my disk/a")
    }
    assert kinds == {"/data/adapters": "nfs4", "/data/local/x": "ext4", "/": "ext4", "/mnt/efs/a": "fuse.efs-proxy",
                     "/my disk/a": "ceph"}  # fmt: skip
    assert Store(tmp_path / "local").journal == "WAL"
    monkeypatch.setattr(store_module, "fs_type", lambda path: "nfs4")
    shared = Store(tmp_path / "shared")
    assert shared.journal == "DELETE"
    assert shared._q("PRAGMA journal_mode")[0][0] == "delete"


def test_an_orphans_leftovers_go_but_not_the_work_of_the_server_that_claims_it_next(manager, monkeypatch):
    store, make = manager
    finder = make()
    add_jobs(store, "ftjob-1")
    assert store.claim_job("ftjob-1", "killed-server", lease_s=-1)
    tenant_dir = finder.registry.store_of("acme")
    (tenant_dir / ".ftjob-1-dead").mkdir(parents=True)  # the killed server's run
    update = store.update_job

    def and_claimed_at_once(job_id, **kw):  # another server claims the job the moment it is queued
        changed = update(job_id, **kw)
        if changed and kw.get("status") == "queued":
            (tenant_dir / ".ftjob-1-next").mkdir()
        return changed

    monkeypatch.setattr(store, "update_job", and_claimed_at_once)
    finder._end_orphans()
    assert store.get_job(None, "ftjob-1")["status"] == "queued"
    assert not (tenant_dir / ".ftjob-1-dead").exists() and (tenant_dir / ".ftjob-1-next").exists()


def test_a_job_an_earlier_version_runs_is_left_while_its_trainer_reports(manager):
    """A rolling upgrade: a job claimed by an earlier version has no lease. While its events keep
    coming, its trainer runs on the old server: it is not queued again (it would train twice); once
    quiet for LEGACY_QUIET_S, it is an orphan like any other."""
    store, make = manager
    finder = make()
    add_jobs(store, "ftjob-old")
    store.update_job("ftjob-old", status="running")  # as the earlier version claimed it: no owner, no lease
    store.add_event("ftjob-old", "Step 7/90: training loss=1.0")
    finder._end_orphans()
    assert store.get_job(None, "ftjob-old")["status"] == "running"
    store._q("UPDATE events SET created_at=created_at-? WHERE job_id='ftjob-old'", finder.LEGACY_QUIET_S + 1)
    finder._end_orphans()
    assert store.get_job(None, "ftjob-old")["status"] == "queued"


@pytest.mark.anyio
async def test_store_calls_that_wait_never_hold_the_threads_prompts_are_rendered_in():
    """Store calls from the event loop (off_loop) run in the store's own threads: with every one of
    them waiting (a lock held on a network file system), asyncio.to_thread, where chat prompts are
    rendered, still answers at once."""
    import asyncio
    import threading

    from mygpt.finetune.store import STORE_THREADS, off_loop

    release = threading.Event()
    waiting = [asyncio.ensure_future(off_loop(release.wait, 30)) for _ in range(STORE_THREADS + 8)]
    try:
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(asyncio.to_thread(sum, [1, 2]) for _ in range(20))), 5)
        assert time.monotonic() - t0 < 2
    finally:
        release.set()
        assert await asyncio.gather(*waiting) == [True] * (STORE_THREADS + 8)


def test_a_replica_that_does_not_train_leaves_its_jobs_to_one_that_does(manager, tmp_path):
    """--no-train: the APIs stay (the store, a JobManager that answers them), no worker runs; a job
    created there waits queued until a replica that trains, sharing the store, claims it."""
    from mygpt.config import Settings
    from mygpt.state import ServerState
    from mygpt.tenancy.config import load_tenancy
    from mygpt.tenancy.tenants import Tenants

    store, make = manager
    settings = Settings(train=False, finetune_dir=store.root, adapter_dir=tmp_path / "adapters")
    state = ServerState(settings, Tenants(load_tenancy(None)))
    state._start_finetuning("tiny", make().registry)
    assert state.finetune_store is not None and not state.jobs._thread.is_alive()
    add_jobs(state.finetune_store, "ftjob-q")
    state.jobs.submitted()
    time.sleep(0.3)
    assert store.get_job(None, "ftjob-q")["status"] == "queued"
    trainer = make()
    trainer.start()
    wait_until(lambda: store.get_job(None, "ftjob-q")["status"] == "running")
    assert store.get_job(None, "ftjob-q")["owner"] == trainer.owner
    state.jobs.stop()  # (a drain on the replica that does not train: nothing to stop)
