"""Fine-tuning jobs: a queue run one at a time by a worker thread, each training in its own process.

Status: queued -> running -> succeeded | failed | cancelled. A finished adapter is written into the
tenant's store, validated like any other (the registry's load) and served at once as
`ft:<base>:<tenant>:<suffix>:<job-id>`. On start, queued jobs are picked up again and a job that was
running when the server stopped ends `failed` with that reason.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
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
        self._thread = threading.Thread(target=self._loop, name="mygpt-finetune", daemon=True)

    def start(self) -> None:
        for job in self.store.jobs_with_status("running"):
            for work in self.registry.store_of(job["tenant"]).glob(f".{job['id']}-*"):
                shutil.rmtree(work, ignore_errors=True)  # the stopped trainer's half-written output
            self._finish(job["id"], "failed", error={
                "code": "server_restarted", "param": None,
                "message": "The server stopped while this job was running; create the job again.",
            })  # fmt: skip
        self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
        if self._thread.is_alive():
            self._thread.join(
                timeout=15
            )  # the worker sees the trainer end and leaves the job to the next start

    def submitted(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancel.add(job_id)
            current, proc = self._current == job_id, self._proc
        if not current:  # still queued: the worker will skip it
            self._finish(job_id, "cancelled")
        elif proc is not None and proc.poll() is None:
            proc.terminate()  # the worker sees the flag and ends the job as cancelled

    def made(self, tenant: str, name: str) -> bool:
        """Whether one of `tenant`'s jobs made the adapter `name` (which the tenant may then delete)."""
        return self.store.job_made(tenant, name)

    def adapter_name(self, job: dict) -> str:
        base = self.base_name.replace("/", "-")
        return f"ft:{base}:{job['tenant']}:{job['suffix'] or 'ft'}:{job['id']}"

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        while not self._stopping:
            queued = self.store.jobs_with_status("queued")
            if not queued:
                self._wake.wait(5)
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
            if not self.store.claim_job(job_id):  # a replica sharing the store runs it (or it was cancelled)
                return
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
            [sys.executable, "-m", "mygpt.finetune.trainer", str(work / "spec.json")],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        )  # fmt: skip
        with self._lock:
            self._proc = proc
            if job_id in self._cancel:  # cancelled while the process was starting
                proc.terminate()
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
        with self._lock:
            self._proc, self._current = None, None
        stderr.seek(0)
        tail = stderr.read()[-2000:]
        stderr.close()
        if self._stopping and job_id not in self._cancel:
            # the server is stopping and terminated the trainer: the job stays `running` in the store,
            # as it does when the server is killed outright, and the next start ends it `server_restarted`
            shutil.rmtree(work, ignore_errors=True)
            return
        if job_id in self._cancel:
            shutil.rmtree(work, ignore_errors=True)
            self._finish(job_id, "cancelled")
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
        self._finish(job_id, "succeeded")

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

    def _finish(self, job_id: str, status: str, error: dict | None = None) -> None:
        self.store.update_job(job_id, status=status, finished_at=int(time.time()), error=error)
        text = {"succeeded": "The job has successfully completed.", "cancelled": "The job was cancelled."}
        message = text.get(status) or f"The job failed: {error['message'] if error else 'unknown reason'}"
        self.store.add_event(
            job_id, message, "error" if status == "failed" else "info", {"type": "status", "status": status}
        )
