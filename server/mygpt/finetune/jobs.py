"""Fine-tuning jobs: a queue run one at a time by a worker thread, each training in its own process.

Status: queued -> running -> succeeded | failed | cancelled. A finished adapter is written into the
tenant's store, validated like any other (the registry's load) and served at once as
`ft:<base>:<tenant>:<suffix>:<job-id>`. On start, queued jobs are picked up again.

Servers may share the store (replicas): the one that claims a queued job holds a lease on it, renewed
every BEAT_S while its trainer runs. A job whose lease ended (its server stopped or was killed) ends
`failed` with that reason, found by any server's worker. A cancel reaches the store at once, through
any server; the server running the job sees it at its next renewal and stops the trainer.
"""

from __future__ import annotations

import csv
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

from mygpt.finetune.store import Store
from mygpt.lora.registry import AdapterRegistry
from mygpt.lora.weights import AdapterError

log = logging.getLogger(__name__)
SUFFIX = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")  # fullmatch


RESULTS = "fine-tune-results"  # the purpose of a job's result file, as OpenAI names it


def results_csv(curve: list[dict]) -> bytes:
    """OpenAI's result file of a job: a CSV row per training step (its loss and the tokens trained so
    far); the step that ends an epoch also has that epoch's validation loss (empty without a
    validation file)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "epoch", "train_loss", "valid_loss", "trained_tokens"])
    rows: list[list] = []
    for event in curve:
        if event["event"] == "step":
            rows.append([event["step"], event["epoch"], event["train_loss"], "", event["trained_tokens"]])
        elif rows and event.get("valid_loss") is not None:  # the epoch just ended
            rows[-1][3] = event["valid_loss"]
    writer.writerows(rows)
    return out.getvalue().encode()


class JobManager:
    LEASE_S = 60.0  # how long a claim on a running job lasts unless renewed
    BEAT_S = 2.0  # how often the running job's lease is renewed and its status read (a cancel elsewhere)
    IDLE_S = 5.0  # how often an idle worker looks for queued jobs and orphans (a submit wakes it at once)
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
        self._cancel: set[str] = set()
        self._proc: subprocess.Popen | None = None
        self._current: str | None = None
        self._stopping = False
        self._lock = threading.Lock()  # _current, _proc and _cancel change together
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this server
        self._thread = threading.Thread(target=self._loop, name="mygpt-finetune", daemon=True)

    def start(self) -> None:
        self._end_orphans()
        self._thread.start()
        self._wake.set()

    def _end_orphans(self) -> None:
        """Running jobs whose lease ended end `failed`: the server that ran them stopped."""
        now = time.time()
        for job in self.store.jobs_with_status("running"):
            if job["lease_until"] is not None and job["lease_until"] >= now:
                continue  # a server runs it
            error = {"code": "server_restarted", "param": None,
                     "message": "The server stopped while this job was running; create the job again."}  # fmt: skip
            if self._finish(job["id"], "failed", error=error, if_lease_before=now):
                log.warning("fine-tuning job %s ended failed: its server stopped while it ran", job["id"])
                for work in self.registry.store_of(job["tenant"]).glob(f".{job['id']}-*"):
                    shutil.rmtree(work, ignore_errors=True)  # the stopped trainer's half-written output

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
        if self._thread.is_alive():
            # the worker sees the trainer end and leaves the job to the next start
            self._thread.join(timeout=15)
        with self._lock:
            current = self._current
        if current is not None:  # the worker did not get there: the job's lease ends now all the same
            self.store.update_job(current, if_status=("running",), if_owner=self.owner, lease_until=0)

    def submitted(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """The job ends `cancelled` in the store now. If this server runs it, its trainer stops now;
        if another server does, that one stops it at its next renewal (BEAT_S)."""
        self._finish(job_id, "cancelled")
        self._stop_trainer(job_id)

    def _stop_trainer(self, job_id: str) -> None:
        with self._lock:
            self._cancel.add(job_id)
            current, proc = self._current == job_id, self._proc
        if current and proc is not None and proc.poll() is None:
            proc.terminate()  # the worker sees the flag and leaves the job as the store has it

    def made(self, tenant: str, name: str) -> bool:
        """Whether one of `tenant`'s jobs made the adapter `name` (which the tenant may then delete)."""
        return self.store.job_made(tenant, name)

    def adapter_name(self, job: dict) -> str:
        base = self.base_name.replace("/", "-")
        return f"ft:{base}:{job['tenant']}:{job['suffix'] or 'ft'}:{job['id']}"

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        while not self._stopping:
            try:
                self._end_orphans()
            except Exception:
                log.exception("ending orphaned fine-tuning jobs failed")
            queued = self.store.jobs_with_status("queued")
            if not queued:
                self._wake.wait(self.IDLE_S)
                self._wake.clear()
                continue
            job = queued[0]
            try:
                self._run(job)
            except Exception as exc:  # never lose a job silently
                log.exception("fine-tuning job %s failed", job["id"])
                self._finish(
                    job["id"], "failed", error={"code": "internal_error", "param": None, "message": str(exc)}
                )

    def _run(self, job: dict) -> None:
        job_id = job["id"]
        with self._lock:
            if job_id in self._cancel or self._stopping:
                return
            if not self.store.claim_job(job_id, self.owner, self.LEASE_S):
                return  # a replica sharing the store runs it (or it was cancelled)
            self._current = job_id
        name = self.adapter_name(job)
        store_dir = self.registry.store_of(job["tenant"])
        store_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{job_id}-", dir=store_dir))  # hidden: not an adapter yet
        spec = {
            "settings": self.settings, "base_name": self.base_name, "seed": job["seed"],
            "hyperparameters": job["hyperparameters"], "cpu_threads": self.cpu_threads,
            "train_path": str(self.store.file_path(job["training_file"])),
            "valid_path": str(self.store.file_path(job["validation_file"])) if job["validation_file"] else None,
            "out_dir": str(work / "adapter"),
        }  # fmt: skip
        (work / "spec.json").write_text(json.dumps(spec))
        self.store.add_event(job_id, "Fine-tuning job started.", data={"type": "status", "status": "running"})
        stderr = open(work / "stderr.log", "w+")  # noqa: SIM115 - closed below
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [*self.TRAINER, str(work / "spec.json")], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        )  # fmt: skip
        with self._lock:
            self._proc = proc
            if job_id in self._cancel:  # cancelled while the process was starting
                proc.terminate()
        beating = threading.Event()
        beat = threading.Thread(
            target=self._beat, args=(job_id, beating), name="mygpt-finetune-lease", daemon=True
        )
        beat.start()
        last: dict = {}
        error = None
        curve: list[dict] = []  # the steps' and epochs' metrics: the job's result file
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            last = event
            self._record(job_id, event)
            if event["event"] in ("step", "epoch"):
                curve.append(event)
            if event["event"] == "error":
                error = event["message"]
        proc.wait()
        beating.set()
        beat.join()
        with self._lock:
            self._proc, self._current = None, None
        stderr.seek(0)
        tail = stderr.read()[-2000:]
        stderr.close()
        if self._stopping and job_id not in self._cancel:
            # the server is stopping and terminated the trainer: the job stays `running` in the store,
            # as it does when the server is killed outright; its lease ends now, and the next start (or
            # another server's worker) ends it `server_restarted`
            self.store.update_job(job_id, if_owner=self.owner, lease_until=0)
            shutil.rmtree(work, ignore_errors=True)
            return
        if job_id in self._cancel:  # ended in the store already (cancel(), or by another server)
            shutil.rmtree(work, ignore_errors=True)
            return
        if proc.returncode != 0 or last.get("event") != "done":
            reason = error or (tail.strip().splitlines() or ["the trainer stopped"])[-1]
            log.warning("fine-tuning job %s failed: %s\n%s", job_id, reason, tail)
            self._finish(
                job_id, "failed", error={"code": "training_failed", "param": None, "message": reason}
            )
            return
        try:
            results = self.store.add_file(
                f"file-{uuid.uuid4().hex[:24]}",
                job["tenant"],
                "step_metrics.csv",
                RESULTS,
                results_csv(curve),
                0,
            )
            self.store.update_job(
                job_id, result_files=[results["id"]], trained_tokens=last.get("trained_tokens")
            )
            # in the store the adapter is routable: from here on it is either its job's model, recorded
            # (which its tenant can delete), or gone
            (work / "adapter").rename(store_dir / name)
            self.registry.load(job["tenant"], name, source="finetune")  # validated like any adapter
            self.store.update_job(job_id, fine_tuned_model=name)
            if not self._finish(job_id, "succeeded"):  # cancelled at the last moment: it made nothing
                self.store.update_job(job_id, fine_tuned_model=None)
                self.registry.delete(job["tenant"], name)
        except BaseException as exc:
            self.registry.delete(job["tenant"], name)
            if not isinstance(exc, AdapterError):
                raise  # the job fails with the error (_loop)
            self._finish(
                job_id, "failed", error={"code": "invalid_adapter", "param": None, "message": str(exc)}
            )
            return
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _beat(self, job_id: str, done: threading.Event) -> None:
        """While the job's trainer runs: renews the lease; stops the trainer once the job is no longer
        this server's to run (cancelled through another server, or failed by one that found the lease
        ended: this process stalled for LEASE_S)."""
        while not done.wait(self.BEAT_S):
            try:
                held = self.store.renew_job(job_id, self.owner, self.LEASE_S)
            except Exception:  # a store error: the lease lasts LEASE_S; try again
                log.warning("renewing the lease of fine-tuning job %s failed", job_id, exc_info=True)
                continue
            if not held:
                log.info("fine-tuning job %s ended elsewhere; stopping its trainer", job_id)
                self._stop_trainer(job_id)
                return

    def _record(self, job_id: str, event: dict) -> None:
        kind = event["event"]
        if kind == "started":
            message = (
                f"Training on {event['train_examples']} examples ({event['train_tokens']} assistant tokens), "
                f"{event['total_steps']} steps, on {event['device']}."
            )
        elif kind == "base_valid_loss":
            message = f"Base model validation loss: {event['valid_loss']:.4f}"
        elif kind == "step":
            message = f"Step {event['step']}/{event['total_steps']}: training loss={event['train_loss']:.4f}"
            self.store.update_job(job_id, trained_tokens=event["trained_tokens"])
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

    def _finish(
        self, job_id: str, status: str, error: dict | None = None, if_lease_before: float | None = None
    ) -> bool:
        """Ends a job that has not ended (the first end wins: a cancel, a failure, a success); adds
        its status event. Returns whether it ended it."""
        if not self.store.update_job(
            job_id, if_status=("queued", "running"), if_lease_before=if_lease_before,
            status=status, finished_at=int(time.time()), error=error, lease_until=None,
        ):  # fmt: skip
            return False
        text = {"succeeded": "The job has successfully completed.", "cancelled": "The job was cancelled."}
        message = text.get(status) or f"The job failed: {error['message'] if error else 'unknown reason'}"
        self.store.add_event(
            job_id, message, "error" if status == "failed" else "info", {"type": "status", "status": status}
        )
        return True
