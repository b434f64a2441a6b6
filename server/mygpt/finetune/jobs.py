"""Fine-tuning jobs: a queue run one at a time by a worker thread, each training in its own process.

Status: queued -> running -> succeeded | failed | cancelled; a running or queued job can be paused
(running: its trainer checkpoints first) and resumed (queued again, to go on from the checkpoint). A finished adapter is written into the
tenant's store, validated like any other (the registry's load) and served at once as
`ft:<base>:<tenant>:<suffix>:<job-id>`, and the checkpoints of its last epochs beside it as
`...:ckpt-step-<step>`. On start, queued jobs are picked up again.

A job survives its server: the trainer checkpoints at each epoch's end, every CHECKPOINT_S, and when
the server stops (SIGTERM: at the end of the step under way). Servers may share the store (replicas):
the one that claims a queued job holds a lease on it, renewed every BEAT_S while its trainer runs. A
job whose lease ended (its server stopped, or was killed) is queued again by whichever server finds
it, and resumes from its newest checkpoint, or starts again without one. Interrupted MAX_STALLS
times in a row without a new checkpoint, it ends `failed` (`server_restarted`). A cancel reaches the
store at once, through any server; the server running the job sees it at its next renewal and stops
the trainer.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import glob
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from mygpt.finetune.store import OPEN_JOBS, Store
from mygpt.finetune.trainer import checkpoints
from mygpt.lora.registry import ADAPTER_NAME, AdapterRegistry
from mygpt.lora.weights import CONFIG, WEIGHTS, AdapterError

log = logging.getLogger(__name__)
SUFFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch (OpenAI's: up to 64 characters)


RESULTS = "fine-tune-results"  # the purpose of a job's result file, as OpenAI names it


def results_csv(curve: list[dict]) -> bytes:
    """OpenAI's result file of a job: a CSV row per training step (its loss and the tokens trained so
    far); the step that ends an epoch also has that epoch's validation loss (empty without a
    validation file)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "epoch", "train_loss", "valid_loss", "trained_tokens"])
    rows: dict[int, list] = {}  # by step: a resumed run's steps replace those it ran again
    for event in curve:
        if event["event"] == "step":
            rows[event["step"]] = [
                event["step"],
                event["epoch"],
                event["train_loss"],
                "",
                event["trained_tokens"],
            ]
        elif event.get("valid_loss") is not None:  # on the epoch's last step
            last = max((k for k, row in rows.items() if row[1] == event["epoch"]), default=None)
            if last is not None:
                rows[last][3] = event["valid_loss"]
    writer.writerows(rows[k] for k in sorted(rows))
    return out.getvalue().encode()


class JobManager:
    LEASE_S = 60.0  # how long a claim on a running job lasts unless renewed
    BEAT_S = 2.0  # how often the running job's lease is renewed and its status read (a cancel elsewhere)
    CHECKPOINT_S = 600.0  # the trainer's checkpoints within an epoch, at most this far apart
    CHECKPOINTS_SERVED = 2  # the newest epochs' checkpoints served beside a job's model
    MAX_STALLS = 3  # interruptions in a row without a new checkpoint before a job ends failed
    LEGACY_QUIET_S = 600.0  # a job an earlier version runs (no lease) is orphaned once quiet this long
    STOP_S = 20.0  # how long a stopping server waits for its trainer's checkpoint before killing it
    IDLE_S = 5.0  # how often an idle worker looks for queued jobs and orphans (a submit wakes it at once)
    # a server trains jobs while the store has seen its worker within this (each round and beat says so);
    # a job created where none does waits queued, and says why (trainers_live)
    TRAINER_SEEN_S = 30.0
    TRAINER = (sys.executable, "-m", "mygpt.finetune.trainer")  # + the spec's path

    def __init__(
        self, store: Store, registry: AdapterRegistry, base_name: str, settings: dict, cpu_threads: int = 1
    ):
        self.store = store
        self.registry = registry
        self.base_name = base_name
        self.settings = settings  # the model settings the trainer loads the base with
        self.cpu_threads = cpu_threads
        self._wake = threading.Event()
        # why the trainer under way was stopped from outside: "ended" (the job ended in the store:
        # cancelled, through any server) or "lost" (its lease could not be renewed); None while it runs
        self._halt: str | None = None
        self._proc: subprocess.Popen | None = None
        self._current: str | None = None
        self._stopping = False
        self._lock = threading.Lock()  # _current, _proc and _halt change together
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this server
        self.trained_tokens: collections.Counter[str] = collections.Counter()  # by tenant, this process
        self._run_tokens = 0  # the tokens the trainer under way had trained at its last step
        self._thread = threading.Thread(target=self._loop, name="mygpt-finetune", daemon=True)

    def start(self) -> None:
        self._seen()
        self._end_orphans()
        self._thread.start()
        self._wake.set()

    def _end_orphans(self) -> None:
        """Running jobs whose lease ended (the server that ran them stopped) are queued again, to
        resume from their newest checkpoint; after MAX_STALLS interruptions without progress, failed."""
        now = time.time()
        for job in self.store.jobs_with_status("running"):
            if job["lease_until"] is not None and job["lease_until"] >= now:
                continue  # a server runs it
            if job["owner"] is None and now - self.store.last_event_at(job["id"]) < self.LEGACY_QUIET_S:
                continue  # claimed by an earlier version (no lease) whose trainer still reports: a rolling upgrade
            step = self._newest_step(job["id"])
            # the stopped run's hidden directories, listed before the job changes hands: a server that
            # claims it next makes its own, which must stay
            left = self._work_of(job)
            if job["pause_requested"]:  # its pause did not finish where it ran: paused here
                if self._paused(job["id"], step, if_lease_before=now):
                    _remove(left)
                continue
            stalls = 0 if step > job["resume_step"] else job["stalls"] + 1
            if stalls >= self.MAX_STALLS:
                error = {"code": "server_restarted", "param": None, "message": (
                    f"The server running this job stopped {stalls} times in a row before it saved a new "
                    "checkpoint; create the job again.")}  # fmt: skip
                if self._finish(
                    job["id"], "failed", error=error, if_status=("running",), if_lease_before=now
                ):
                    log.warning(
                        "fine-tuning job %s failed: interrupted %d times without progress", job["id"], stalls
                    )
                continue
            if self.store.update_job(
                job["id"], if_status=("running",), if_lease_before=now, status="queued", owner=None,
                lease_until=None, resume_step=step, stalls=stalls,
            ):  # fmt: skip
                where = (
                    f"resumes from its checkpoint at step {step}"
                    if step
                    else "starts again from the beginning"
                )
                log.info("fine-tuning job %s was interrupted; it %s", job["id"], where)
                _remove(left)  # the stopped trainer's half-written output
                self.store.add_event(job["id"], f"The server running this job stopped; it {where}.")
                self._wake.set()

    def stop(self) -> None:
        """Stops the worker. A running trainer checkpoints at the end of its step and exits (SIGTERM);
        the job stays `running`, its lease ended, and resumes on the next server that starts (or on
        another replica at once). Past STOP_S the trainer is killed: it resumes from an older one."""
        self._stopping = True
        self._wake.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
        if self._thread.is_alive():
            self._thread.join(timeout=self.STOP_S)
        proc = self._proc
        if self._thread.is_alive() and proc is not None and proc.poll() is None:
            log.warning("the fine-tuning trainer did not stop within %.0f s; killing it", self.STOP_S)
            proc.kill()
            self._thread.join(timeout=5)
        with self._lock:
            current = self._current
        if current is not None:  # the worker did not get there: the job's lease ends now all the same
            self.store.update_job(current, if_status=("running",), if_owner=self.owner, lease_until=0)
        with contextlib.suppress(Exception):
            self.store.trainer_gone(self.owner)

    def _seen(self) -> None:
        try:
            self.store.trainer_seen(self.owner, self.base_name)
        except Exception:  # the next round or beat says it again
            log.warning("the store could not record this fine-tuning worker", exc_info=True)

    def trainers_live(self) -> int:
        """Servers sharing the store (this one too, where it trains) that train jobs for this base."""
        return self.store.trainers(self.base_name, time.time() - self.TRAINER_SEEN_S)

    def submitted(self) -> None:
        self._wake.set()

    def pause(self, job_id: str) -> bool:
        """A queued job is paused now; a running one once its trainer has checkpointed (at the end of
        its step: the server running it, any replica, sees the request at its next renewal). False if
        the job is neither queued nor running."""
        now = self.store.request_pause(job_id)
        if now == "paused":
            self.store.add_event(
                job_id, "Fine-tuning job paused.", data={"type": "status", "status": "paused"}
            )
        return now is not None

    def resume(self, job_id: str) -> bool:
        """A paused job is queued again, to go on from its checkpoint; False if it is not paused."""
        if not self.store.update_job(
            job_id, if_status=("paused",), status="queued", pause_requested=0, owner=None, lease_until=None,
            stalls=0, resume_step=self._newest_step(job_id),
        ):  # fmt: skip
            return False
        self.store.add_event(job_id, "Fine-tuning job queued to resume.", data={"type": "message"})
        self._wake.set()
        return True

    def cancel(self, job_id: str) -> None:
        """The job ends `cancelled` in the store now. If this server runs it, its trainer stops now;
        if another server does, that one stops it at its next renewal (BEAT_S)."""
        self._finish(job_id, "cancelled")
        self._halt_trainer(job_id, "ended")

    def _halt_trainer(self, job_id: str, why: str) -> None:
        """Kills the trainer of `job_id` if it runs here (no checkpoint: the job is not this server's
        to run any more); the worker then leaves the job as the store has it."""
        with self._lock:
            if self._current != job_id:
                return
            self._halt = self._halt or why
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def forget_model(self, tenant: str, name: str) -> None:
        """A model of the tenant's jobs was deleted (models.delete): a checkpoint's is no longer listed."""
        self.store.forget_checkpoint_model(tenant, name)

    def made(self, tenant: str, name: str) -> bool:
        """Whether one of `tenant`'s jobs made the adapter `name` (which the tenant may then delete)."""
        return self.store.job_made(tenant, name)

    def adapter_name(self, job: dict) -> str:
        """The job's model: ft:<base>:<tenant>:<suffix>:<job id>, the base's name in adapter-name
        characters (a served name may hold others: "/", spaces)."""
        base = re.sub(r"[^A-Za-z0-9._-]", "-", self.base_name)
        return f"ft:{base}:{job['tenant']}:{job['suffix'] or 'ft'}:{job['id']}"

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        while not self._stopping:
            job = None
            try:
                self._seen()
                self._end_orphans()
                # this server's base only: replicas of another base (or a restart on another --model)
                # leave theirs queued
                queued = [j for j in self.store.jobs_with_status("queued") if j["model"] == self.base_name]
                if not queued:
                    self._wake.wait(self.IDLE_S)
                    self._wake.clear()
                    continue
                job = queued[0]
                self._run(job)
            except Exception as exc:  # never lose a job silently, nor the worker
                if job is None:
                    log.exception("the fine-tuning worker's round failed")
                    self._wake.wait(self.IDLE_S)
                    continue
                log.exception("fine-tuning job %s failed", job["id"])
                error = {"code": "internal_error", "param": None, "message": str(exc)}
                with contextlib.suppress(Exception):
                    self._finish(job["id"], "failed", error=error)

    def _run(self, job: dict) -> None:
        job_id = job["id"]
        with self._lock:
            if self._stopping or not self.store.claim_job(job_id, self.owner, self.LEASE_S):
                return  # a replica sharing the store runs it (or it was cancelled)
            self._current, self._halt = job_id, None
        store_dir = self.registry.store_of(job["tenant"])
        store_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{job_id}-", dir=store_dir))  # hidden: not an adapter yet
        beating = threading.Event()
        beat = threading.Thread(
            target=self._beat, args=(job_id, beating), name="mygpt-finetune-lease", daemon=True
        )
        proc = None
        try:
            proc = self._start_trainer(job, work)
            beat.start()
            last, error = self._follow(job, proc)
            proc.wait()
            beating.set()
            beat.join()
            with self._lock:
                halted, self._current = self._halt, None
            if halted is not None:  # the job is not this server's any more
                log.info("fine-tuning job %s: its trainer was stopped (%s)", job_id, halted)
            elif proc.returncode == 0 and last.get("event") == "done":  # (a stopping server too)
                self._succeed(job, work, last)
            elif last.get("event") != "error" and self.store.pause_requested(job_id):
                # (paused at its step's end, or killed before it could: from its newest checkpoint then)
                self._paused(job_id, self._newest_step(job_id), if_owner=self.owner)
            elif self._stopping or last.get("event") == "paused":
                # the trainer checkpointed and exited (or was killed): the job stays `running`, its lease
                # ends now, and the next server that looks (this one after a restart, or a replica at
                # once) queues it again to resume
                self.store.update_job(job_id, if_status=("running",), if_owner=self.owner, lease_until=0)
            else:
                tail = (work / "stderr.log").read_text(errors="replace")[-2000:]
                reason = error or (tail.strip().splitlines() or ["the trainer stopped"])[-1]
                log.warning("fine-tuning job %s failed: %s\n%s", job_id, reason, tail)
                self._finish(
                    job_id, "failed", error={"code": "training_failed", "param": None, "message": reason}
                )
        finally:
            beating.set()
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            with self._lock:
                self._proc, self._current, self._halt = None, None, None
            shutil.rmtree(work, ignore_errors=True)
            ended = self.store.get_job(None, job_id)
            if ended is not None and ended["status"] in ("failed", "cancelled"):
                self._discard(ended)  # again, now that the trainer is gone: it may have written since

    def _start_trainer(self, job: dict, work: Path) -> subprocess.Popen:
        job_id = job["id"]
        ckpt_dir = self.store.checkpoint_dir(job_id)
        newest = checkpoints(ckpt_dir)
        self._run_tokens = 0
        spec = {
            "settings": self.settings, "base_name": self.base_name, "seed": job["seed"],
            "hyperparameters": job["hyperparameters"], "cpu_threads": self.cpu_threads,
            "train_path": str(self.store.file_path(job["training_file"])),
            "valid_path": str(self.store.file_path(job["validation_file"])) if job["validation_file"] else None,
            "out_dir": str(work / "adapter"), "checkpoint_dir": str(ckpt_dir), "checkpoint_s": self.CHECKPOINT_S,
            "resume": str(newest[-1]) if newest else None, "parent_pid": os.getpid(),
        }  # fmt: skip
        (work / "spec.json").write_text(json.dumps(spec))
        if not newest:
            self.store.add_event(
                job_id, "Fine-tuning job started.", data={"type": "status", "status": "running"}
            )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(work / "stderr.log", "w") as stderr:
            proc = subprocess.Popen(
                [*self.TRAINER, str(work / "spec.json")], stdout=subprocess.PIPE, stderr=stderr, text=True,
                env=env, start_new_session=True,  # a terminal's Ctrl-C is the server's to handle, not its
            )  # fmt: skip
        with self._lock:
            self._proc = proc
            if self._halt is not None:  # cancelled while the process was starting
                proc.kill()
            elif self._stopping:  # the server began to stop meanwhile: checkpoint and exit
                proc.terminate()
        return proc

    def _follow(self, job: dict, proc: subprocess.Popen) -> tuple[dict, str | None]:
        """Records the trainer's events until it exits: (its last event, its error message)."""
        last: dict = {}
        error = None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            last = event
            self._record(job, event)
            if event["event"] == "error":
                error = event["message"]
        return last, error

    def _succeed(self, job: dict, work: Path, last: dict) -> None:
        job_id, name = job["id"], self.adapter_name(job)
        store_dir = self.registry.store_of(job["tenant"])
        try:
            results = self.store.add_file(
                f"file-{uuid.uuid4().hex[:24]}", job["tenant"], "step_metrics.csv", RESULTS,
                results_csv(self.store.curve(job_id)), 0,  # the steps of every run of the job
            )  # fmt: skip
            self.store.update_job(
                job_id,
                if_status=("running",),
                result_files=[results["id"]],
                trained_tokens=last.get("trained_tokens"),
            )
            # in the store the adapter is routable: from here on it is either its job's model, recorded
            # (which its tenant can delete), or gone
            (work / "adapter").rename(store_dir / name)
            self.registry.load(job["tenant"], name, source="finetune")  # validated like any adapter
            self.store.update_job(job_id, fine_tuned_model=name)
            if not self._finish(job_id, "succeeded"):  # ended meanwhile (a cancel): it made nothing
                self.store.update_job(job_id, fine_tuned_model=None)
                self.registry.delete(job["tenant"], name)
        except BaseException as exc:
            self.registry.delete(job["tenant"], name)
            if not isinstance(exc, AdapterError):
                raise  # the job fails with the error (_loop)
            self._finish(
                job_id, "failed", error={"code": "invalid_adapter", "param": None, "message": str(exc)}
            )

    def _work_of(self, job: dict) -> list[Path]:
        """The hidden directories runs of the job leave in its tenant's store (a trainer's output, a
        checkpoint's copy on its way to being served)."""
        return list(self.registry.store_of(job["tenant"]).glob(f".{glob.escape(job['id'])}-*"))

    def _discard(self, job: dict) -> None:
        """What a job that ended without a model leaves: its checkpoints, their served models, its
        hidden directories."""
        shutil.rmtree(self.store.checkpoint_dir(job["id"]), ignore_errors=True)
        self._unserve(job, [c["step"] for c in self.store.list_checkpoints(job["id"])])
        prefix = f"{self.adapter_name(job)}:ckpt-step-"  # one served as its record went (a race with this)
        for path in self.registry.store_of(job["tenant"]).glob(f"{glob.escape(prefix)}*"):
            self.registry.delete(job["tenant"], path.name)
        _remove(self._work_of(job))  # (an ended job: no server runs it)

    def _beat(self, job_id: str, done: threading.Event) -> None:
        """While the job's trainer runs: renews the lease; stops the trainer once the job is no longer
        this server's to run (cancelled through another server, or failed by one that found the lease
        ended: this process stalled for LEASE_S)."""
        renewed = time.monotonic()
        while not done.wait(self.BEAT_S):
            self._seen()
            try:
                held = self.store.renew_job(job_id, self.owner, self.LEASE_S)
            except Exception:  # a store error: the lease lasts LEASE_S; try again, short of its end
                log.warning("renewing the lease of fine-tuning job %s failed", job_id, exc_info=True)
                if time.monotonic() - renewed > self.LEASE_S - 2 * self.BEAT_S:  # another server may take it
                    log.error(
                        "fine-tuning job %s: its lease could not be renewed; stopping its trainer", job_id
                    )
                    self._halt_trainer(job_id, "lost")
                    return
                continue
            if not held:
                log.info("fine-tuning job %s ended elsewhere; stopping its trainer", job_id)
                self._halt_trainer(job_id, "ended")
                return
            renewed = time.monotonic()
            if self.store.pause_requested(job_id):  # the trainer checkpoints at its step's end and exits
                with self._lock:
                    proc = self._proc if self._current == job_id else None
                if proc is not None and proc.poll() is None:
                    log.info("fine-tuning job %s: pausing its trainer", job_id)
                    proc.terminate()

    def _serve_checkpoint(self, job: dict, step: int) -> None:
        """An epoch's checkpoint served at once beside the job's model, as `<model>:ckpt-step-<step>`:
        copied into the tenant's store and validated like any adapter. The newest CHECKPOINTS_SERVED
        stay (OpenAI keeps those of the last 3 epochs, the model included). A name past the adapter
        names' length is not served."""
        model = f"{self.adapter_name(job)}:ckpt-step-{step}"
        source = self.store.checkpoint_dir(job["id"]) / f"step-{step:08d}"
        if not ADAPTER_NAME.fullmatch(model) or not source.is_dir():
            return
        store_dir = self.registry.store_of(job["tenant"])
        store_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{job['id']}-ckpt-{step}-", dir=store_dir))
        try:
            for file in (CONFIG, WEIGHTS):
                shutil.copy2(source / file, tmp / file)
            shutil.rmtree(store_dir / model, ignore_errors=True)  # a run resumed past it made it again
            tmp.rename(store_dir / model)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # (gone once renamed)
        self.store.set_checkpoint_model(job["id"], step, model)  # recorded first: its tenant may delete it
        try:
            self.registry.load(job["tenant"], model, source="finetune", replace=True)
        except AdapterError as exc:
            log.warning("checkpoint %s of job %s is not served: %s", step, job["id"], exc)
            self._unserve(job, [step])
            return
        older = [c["step"] for c in self.store.list_checkpoints(job["id"])][self.CHECKPOINTS_SERVED :]
        self._unserve(job, older)

    def _unserve(self, job: dict, steps: list[int]) -> None:
        """The checkpoints' models deleted (unroutable at once, their files gone) and their records."""
        for ckpt in self.store.list_checkpoints(job["id"]):
            if ckpt["step"] in steps:
                if ckpt["model"]:
                    self.registry.delete(job["tenant"], ckpt["model"])
                self.store.delete_checkpoint(job["id"], ckpt["step"])

    def _record(self, job: dict, event: dict) -> None:
        job_id = job["id"]
        kind = event["event"]
        if kind == "checkpoint":
            if event["epoch_end"]:  # listed by the API; the newest within an epoch only resumes a run
                # full_valid_loss: the whole validation file's (OpenAI's valid_loss is one batch's)
                metrics = {"step": event["step"], "train_loss": event["train_loss"],
                           "full_valid_loss": event["valid_loss"]}  # fmt: skip
                self.store.add_checkpoint(job_id, event["step"], event["epoch"], metrics)
                try:
                    self._serve_checkpoint(job, event["step"])
                except Exception:  # the run goes on: the checkpoint still resumes it
                    log.exception("checkpoint %s of job %s could not be served", event["step"], job_id)
                    self._unserve(job, [event["step"]])
                self.store.add_event(job_id, f"Checkpoint created at step {event['step']}.",
                                     data={"type": "message"})  # fmt: skip
            return
        if kind == "resumed":
            self._run_tokens = event["trained_tokens"]  # trained before the checkpoint: counted then
            message = f"Fine-tuning job resumed from its checkpoint at step {event['step']}."
            self.store.add_event(job_id, message, data={"type": "status", "status": "running"})
            return
        if kind == "started":
            message = (
                f"Training on {event['train_examples']} examples ({event['train_tokens']} assistant tokens), "
                f"{event['total_steps']} steps, on {event['device']}."
            )
        elif kind == "base_valid_loss":
            message = f"Base model validation loss: {event['valid_loss']:.4f}"
        elif kind == "step":
            message = f"Step {event['step']}/{event['total_steps']}: training loss={event['train_loss']:.4f}"
            self.store.update_job(job_id, if_status=("running",), trained_tokens=event["trained_tokens"])
            self.trained_tokens[job["tenant"]] += event["trained_tokens"] - self._run_tokens
            self._run_tokens = event["trained_tokens"]
        elif kind == "epoch":
            v = event.get("valid_loss")
            message = f"Epoch {event['epoch']} done" + (
                f": validation loss={v:.4f}" if v is not None else "."
            )
        elif kind == "done":
            message = (
                f"Training done: {event['trained_tokens']} tokens at {event['tokens_per_s']:.1f} tokens/s."
            )
        elif kind == "error":
            self.store.add_event(job_id, f"Training failed: {event['message']}", "error", {"type": "message"})
            return
        else:
            return
        data = {k: v for k, v in event.items() if k != "event"}
        self.store.add_event(job_id, message, data={"type": "metrics" if kind == "step" else kind, **data})

    def _newest_step(self, job_id: str) -> int:
        """The step of the job's newest checkpoint, where it resumes (0: none, from the start)."""
        newest = checkpoints(self.store.checkpoint_dir(job_id))
        return _step_of(newest[-1]) if newest else 0

    def _paused(self, job_id: str, step: int, **conditions) -> bool:
        """A running job whose pause was asked for is paused (its trainer has exited), to resume from
        its checkpoint at `step` (0: none)."""
        if not self.store.update_job(
            job_id, if_status=("running",), **conditions, status="paused", owner=None, lease_until=None,
            pause_requested=0, resume_step=step, stalls=0,
        ):  # fmt: skip
            return False
        message = f"Fine-tuning job paused at step {step}." if step else "Fine-tuning job paused."
        self.store.add_event(job_id, message, data={"type": "status", "status": "paused"})
        return True

    def _finish(
        self, job_id: str, status: str, error: dict | None = None, if_status: tuple[str, ...] = OPEN_JOBS,
        if_lease_before: float | None = None,
    ) -> bool:  # fmt: skip
        """Ends a job that has not ended (the first end wins: a cancel, a failure, a success); adds
        its status event. Returns whether it ended it."""
        if not self.store.update_job(
            job_id, if_status=if_status, if_lease_before=if_lease_before,
            status=status, finished_at=int(time.time()), error=error, lease_until=None,
        ):  # fmt: skip
            return False
        if status == "succeeded":
            shutil.rmtree(self.store.checkpoint_dir(job_id), ignore_errors=True)  # its served copies stay
        elif (job := self.store.get_job(None, job_id)) is not None:
            self._discard(job)  # it made nothing
        text = {"succeeded": "The job has successfully completed.", "cancelled": "The job was cancelled."}
        message = text.get(status) or f"The job failed: {error['message'] if error else 'unknown reason'}"
        self.store.add_event(
            job_id, message, "error" if status == "failed" else "info", {"type": "status", "status": status}
        )
        return True


def _remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _step_of(checkpoint: Path) -> int:  # step-<step>
    return int(checkpoint.name.removeprefix("step-"))
