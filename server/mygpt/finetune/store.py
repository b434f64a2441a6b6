"""Files and jobs persisted in SQLite beside the adapter store: a restart loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
NETWORK_FS = {
    "nfs",
    "nfs4",
    "ceph",
    "cifs",
    "smb3",
    "smbfs",
    "glusterfs",
    "lustre",
    "9p",
    "afs",
    "gpfs",
    "ocfs2",
    "gfs2",
    "beegfs",
    "virtiofs",
}  # and FUSE mounts (EFS, s3fs, ...)
# The store's calls from the event loop run in threads of their own: one waiting on SQLite's lock
# (seconds with the rollback journal on a network file system) holds one of these, never a thread of
# the loop's default executor, where every chat request's prompt is rendered (that pool has
# min(32, cores + 4) threads: 6 on a 2-core pod).
STORE_THREADS = 8
_executor = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="mygpt-store")
T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """asyncio.to_thread for store calls (and work around them), in the store's threads."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)  # (log lines' request ids)
    return await asyncio.get_running_loop().run_in_executor(_executor, call)


OPEN_JOBS = ("queued", "running", "paused")  # not ended
OPEN_BATCHES = (
    "validating",
    "in_progress",
    "finalizing",
    "cancelling",
)  # a runner's work, after a restart too

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, examples INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS file_expiry (id TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model TEXT NOT NULL, training_file TEXT NOT NULL,
    validation_file TEXT, suffix TEXT, hyperparameters TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL, created_at INTEGER NOT NULL, finished_at INTEGER, fine_tuned_model TEXT,
    trained_tokens INTEGER, error TEXT, result_files TEXT, owner TEXT, lease_until REAL,
    resume_step INTEGER NOT NULL DEFAULT 0, stalls INTEGER NOT NULL DEFAULT 0, metadata TEXT,
    pause_requested INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, size INTEGER NOT NULL, response TEXT NOT NULL,
    messages TEXT NOT NULL, inputs TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS responses_by_tenant ON responses (tenant);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, step INTEGER NOT NULL, epoch INTEGER NOT NULL,
    created_at INTEGER NOT NULL, metrics TEXT NOT NULL, model TEXT, UNIQUE (job_id, step));
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, message TEXT NOT NULL, data TEXT);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER, output_file_id TEXT,
    error_file_id TEXT, total INTEGER NOT NULL, completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, metadata TEXT, errors TEXT, owner TEXT, lease_until REAL,
    ending TEXT, model TEXT, input_tokens INTEGER NOT NULL DEFAULT 0, cached_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS trainers (owner TEXT PRIMARY KEY, model TEXT NOT NULL, seen REAL NOT NULL);
"""


class Store:
    """One SQLite file (WAL) and a directory of uploaded files; safe to call from any thread."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "mygpt.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        # WAL where every process is on one host; SQLite's WAL needs shared memory, which a network file
        # system (replicas on several nodes sharing the volume) does not give: the rollback journal there
        fs = fs_type(self.root)
        want = "DELETE" if fs in NETWORK_FS or fs.startswith("fuse") else "WAL"
        for wait in (0.1, 0.3, 1.0, 3.0, None):  # another process may hold it open in its mode a while
            try:
                self.journal = self._db.execute(f"PRAGMA journal_mode={want}").fetchone()[0].upper()
                break
            except sqlite3.OperationalError as exc:  # ("database is locked": no busy wait for this one)
                if wait is None:
                    self.journal = self._db.execute("PRAGMA journal_mode").fetchone()[0].upper()
                    log.error(
                        "store %s: its journal mode stays %s, not %s (%s): other servers hold it open. On a "
                        "network file system WAL is unsafe across nodes: restart with one replica once to "
                        "switch it", self.root, self.journal, want, exc,
                    )  # fmt: skip
                    break
                time.sleep(wait)
        log.info("store %s on %s: journal mode %s", self.root, fs or "an unknown file system", self.journal)
        self._db.executescript(SCHEMA)
        for table, column, kind in (
            ("jobs", "result_files", "TEXT"), ("jobs", "owner", "TEXT"), ("jobs", "lease_until", "REAL"),
            ("jobs", "resume_step", "INTEGER NOT NULL DEFAULT 0"), ("jobs", "stalls", "INTEGER NOT NULL DEFAULT 0"),
            ("jobs", "metadata", "TEXT"), ("jobs", "pause_requested", "INTEGER NOT NULL DEFAULT 0"),
            ("batches", "owner", "TEXT"), ("batches", "lease_until", "REAL"),
            ("batches", "ending", "TEXT"), ("batches", "model", "TEXT"),
            ("batches", "input_tokens", "INTEGER NOT NULL DEFAULT 0"),
            ("batches", "cached_tokens", "INTEGER NOT NULL DEFAULT 0"),
            ("batches", "output_tokens", "INTEGER NOT NULL DEFAULT 0"),
        ):  # columns a store written by an older version lacks  # fmt: skip
            if column not in {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                try:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as exc:  # a replica starting beside this one added it
                    if "duplicate column" not in str(exc):
                        raise
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction (one journal sync) for several statements; the caller holds _lock."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _q(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _update(self, table: str, row_id: str, fields: dict, where: list[tuple[str, tuple]]) -> bool:
        """UPDATE one row of `table` where every (clause, its arguments) of `where` holds: whether it did."""
        sets = ", ".join(f"{k}=?" for k in fields)
        clauses = " AND ".join(["id=?", *(clause for clause, _ in where)])
        args = (*fields.values(), row_id, *(a for _, values in where for a in values))
        with self._lock:
            return self._db.execute(f"UPDATE {table} SET {sets} WHERE {clauses}", args).rowcount == 1

    # ------------------------------------------------------------------ files
    def file_path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"

    def add_file(
        self, file_id: str, tenant: str, filename: str, purpose: str, raw: bytes, examples: int,
        expires_at: int | None = None,
    ) -> dict:  # fmt: skip
        path = self.file_path(file_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(raw)
        tmp.rename(path)
        self._q(
            "INSERT INTO files VALUES (?,?,?,?,?,?,?)",
            file_id, tenant, filename, purpose, len(raw), examples, int(time.time()),
        )  # fmt: skip
        if (
            expires_at is not None
        ):  # (a table of its own: an older replica of a rolling update inserts 7 columns)
            self._q("INSERT INTO file_expiry VALUES (?,?)", file_id, expires_at)
        return self.get_file(tenant, file_id)

    # a file past its expires_at (OpenAI's expires_after) is gone for every caller; purge_expired deletes it
    _LIVE = (
        "SELECT files.*, expires_at FROM files LEFT JOIN file_expiry USING (id)"
        " WHERE (expires_at IS NULL OR expires_at > ?)"
    )

    def get_file(self, tenant: str | None, file_id: str) -> dict | None:
        rows = self._q(f"{self._LIVE} AND id=?", int(time.time()), file_id)
        if not rows or (tenant is not None and rows[0]["tenant"] != tenant):
            return None  # another tenant's file does not exist for this caller
        return dict(rows[0])

    def list_files(self, tenant: str | None) -> list[dict]:
        now, order = int(time.time()), " ORDER BY created_at, files.rowid"
        if tenant is None:
            return [dict(r) for r in self._q(self._LIVE + order, now)]
        return [dict(r) for r in self._q(f"{self._LIVE} AND tenant=?" + order, now, tenant)]

    def delete_file(self, tenant: str | None, file_id: str) -> bool:
        if self.get_file(tenant, file_id) is None:
            return False
        self._forget_file(file_id)
        return True

    def _forget_file(self, file_id: str) -> None:
        self._q("DELETE FROM files WHERE id=?", file_id)
        self._q("DELETE FROM file_expiry WHERE id=?", file_id)
        self.file_path(file_id).unlink(missing_ok=True)

    def files_read(self) -> dict[str, str]:
        """The files that a batch or fine-tuning job that has not ended reads: file id -> which one
        ("batch <id>", "fine-tuning job <id>")."""
        read = {b["input_file_id"]: f"batch {b['id']}" for b in self.batches_with_status(*OPEN_BATCHES)}
        for j in self.jobs_with_status(*OPEN_JOBS):
            for f in (j["training_file"], j["validation_file"]):
                if f:
                    read.setdefault(f, f"fine-tuning job {j['id']}")
        return read

    def purge_expired(self) -> int:
        """Deletes the files past their expires_at but those a job or batch that has not ended reads
        (deleted once it has); returns how many."""
        rows = self._q("SELECT id FROM file_expiry WHERE expires_at <= ?", int(time.time()))
        read = self.files_read()
        gone = [r["id"] for r in rows if r["id"] not in read]
        for file_id in gone:
            self._forget_file(file_id)
        return len(gone)

    # ------------------------------------------------------------------ jobs
    def add_job(self, job: dict) -> dict:
        self._q(
            "INSERT INTO jobs (id, tenant, model, training_file, validation_file, suffix, hyperparameters, seed,"
            " status, created_at, metadata) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            job["id"], job["tenant"], job["model"], job["training_file"], job["validation_file"], job["suffix"],
            json.dumps(job["hyperparameters"]), job["seed"], "queued", int(time.time()),
            json.dumps(job["metadata"]) if job.get("metadata") is not None else None,
        )  # fmt: skip
        return self.get_job(job["tenant"], job["id"])

    def get_job(self, tenant: str | None, job_id: str) -> dict | None:
        rows = self._q("SELECT * FROM jobs WHERE id=?", job_id)
        if not rows or (tenant is not None and rows[0]["tenant"] != tenant):
            return None
        return _job(rows[0])

    def estimated_finish(self, job: dict) -> int | None:
        """A running job's: its last step's time plus its remaining steps at the tokens per step and
        per second trained so far (None otherwise, and before the run under way has made a step)."""
        if job["status"] != "running":
            return None
        rows = self._q("SELECT seq, created_at, data FROM events WHERE job_id=? AND data LIKE '%\"metrics\"%'"
                       " ORDER BY seq DESC LIMIT 1", job["id"])  # fmt: skip
        started = self._q("SELECT seq FROM events WHERE job_id=? AND data LIKE '%\"type\": \"status\"%'"
                          " ORDER BY seq DESC LIMIT 1", job["id"])  # fmt: skip
        if rows and (not started or rows[0]["seq"] > started[0]["seq"]):  # a step of the run under way
            step = json.loads(rows[0]["data"])
            per_step = step["trained_tokens"] / max(step["step"], 1)
            left_s = (step["total_steps"] - step["step"]) * per_step / max(step["tokens_per_s"], 1e-9)
            return int(rows[0]["created_at"] + left_s)
        return None

    def list_jobs(self, tenant: str | None) -> list[dict]:
        sql = (
            "SELECT * FROM jobs"
            + ("" if tenant is None else " WHERE tenant=?")
            + " ORDER BY created_at DESC, rowid DESC"
        )
        return [_job(r) for r in self._q(sql, *([] if tenant is None else [tenant]))]

    def jobs_with_status(self, *statuses: str) -> list[dict]:
        marks = ",".join("?" * len(statuses))
        return [
            _job(r)
            for r in self._q(
                f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY created_at, rowid", *statuses
            )
        ]

    def update_job(
        self, job_id: str, if_status: tuple[str, ...] = (), if_owner: str | None = None,
        if_lease_before: float | None = None, **fields: Any,
    ) -> bool:  # fmt: skip
        """if_status: only a job in one of these statuses changes (a cancel between a read and this
        write wins); if_owner: only one that server holds (claim_job); if_lease_before: only one whose
        lease ended before then (or that has none). Returns whether it changed."""
        if "error" in fields and fields["error"] is not None:
            fields["error"] = json.dumps(fields["error"])
        if "result_files" in fields:
            fields["result_files"] = json.dumps(fields["result_files"])
        where = [(f"status IN ({','.join('?' * len(if_status))})", if_status)] if if_status else []
        if if_owner is not None:
            where.append(("owner=?", (if_owner,)))
        if if_lease_before is not None:
            where.append(("(lease_until IS NULL OR lease_until<?)", (if_lease_before,)))
        return self._update("jobs", job_id, fields, where)

    def job_made(self, tenant: str, name: str) -> bool:
        """Whether one of `tenant`'s jobs made the model `name` (its result or one of its checkpoints)."""
        return bool(
            self._q("SELECT 1 FROM jobs WHERE tenant=? AND fine_tuned_model=? LIMIT 1", tenant, name)
            or self._q(
                "SELECT 1 FROM checkpoints c JOIN jobs j ON j.id=c.job_id WHERE j.tenant=? AND c.model=? LIMIT 1",
                tenant, name,
            )
        )  # fmt: skip

    def open_counts(self) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
        """(jobs, batches) not ended, by (tenant, status)."""
        out = []
        for table, statuses in (("jobs", OPEN_JOBS), ("batches", OPEN_BATCHES)):
            sql = (f"SELECT tenant, status, COUNT(*) n FROM {table} WHERE status IN "
                   f"({','.join('?' * len(statuses))}) GROUP BY tenant, status")  # fmt: skip
            out.append({(r["tenant"], r["status"]): r["n"] for r in self._q(sql, *statuses)})
        return out[0], out[1]

    # ------------------------------------------------------------------ responses (the Responses API)
    def put_response(
        self, tenant: str, response: dict, messages: list[dict], inputs: list[dict], limit: int, budget: int
    ) -> None:
        """Stores a response; the tenant's oldest go past its newest `limit` or `budget` bytes."""
        parts = [json.dumps(response), json.dumps(messages), json.dumps(list(inputs))]
        with self._lock, self._transaction():  # newer rows have higher rowids (a replaced id too)
            self._db.execute(
                "INSERT OR REPLACE INTO responses (id, tenant, size, response, messages, inputs) VALUES (?,?,?,?,?,?)",
                (response["id"], tenant, sum(map(len, parts)), *parts),
            )
            self._db.execute(
                "DELETE FROM responses WHERE rowid IN (SELECT rowid FROM (SELECT rowid, ROW_NUMBER() OVER w n,"
                " SUM(size) OVER w total FROM responses WHERE tenant=? WINDOW w AS (ORDER BY rowid DESC))"
                " WHERE n > ? OR total > ?)",
                (tenant, limit, budget),
            )  # fmt: skip

    def get_response(self, tenant: str, response_id: str) -> tuple[dict, list[dict], list[dict]] | None:
        """(the response, its conversation, its request's input items), or None (another tenant's too)."""
        rows = self._q(
            "SELECT response, messages, inputs FROM responses WHERE id=? AND tenant=?", response_id, tenant
        )
        return tuple(json.loads(rows[0][k]) for k in ("response", "messages", "inputs")) if rows else None

    def delete_response(self, tenant: str, response_id: str) -> bool:
        with self._lock:
            cursor = self._db.execute("DELETE FROM responses WHERE id=? AND tenant=?", (response_id, tenant))
            return cursor.rowcount == 1

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self, job_id: str) -> Path:
        """Where a job's trainer writes its checkpoints (finetune.trainer.save_checkpoint)."""
        return self.root / "checkpoints" / job_id

    def add_checkpoint(self, job_id: str, step: int, epoch: int, metrics: dict) -> None:
        """An epoch's checkpoint, listed by the API (its model is set once it is served)."""
        self._q(
            "INSERT OR REPLACE INTO checkpoints (id, job_id, step, epoch, created_at, metrics) VALUES (?,?,?,?,?,?)",
            f"ftckpt_{job_id.removeprefix('ftjob-')}{step:08d}", job_id, step, epoch, int(time.time()),
            json.dumps(metrics),
        )  # fmt: skip

    def set_checkpoint_model(self, job_id: str, step: int, model: str | None) -> None:
        self._q("UPDATE checkpoints SET model=? WHERE job_id=? AND step=?", model, job_id, step)

    def forget_checkpoint_model(self, tenant: str, model: str) -> None:
        """A checkpoint's model was deleted: it is no longer listed."""
        self._q("DELETE FROM checkpoints WHERE model=? AND job_id IN (SELECT id FROM jobs WHERE tenant=?)",
                model, tenant)  # fmt: skip

    def delete_checkpoint(self, job_id: str, step: int) -> None:
        self._q("DELETE FROM checkpoints WHERE job_id=? AND step=?", job_id, step)

    def list_checkpoints(self, job_id: str) -> list[dict]:
        """Newest first, as OpenAI lists them."""
        rows = self._q("SELECT * FROM checkpoints WHERE job_id=? ORDER BY step DESC", job_id)
        return [{**dict(r), "metrics": json.loads(r["metrics"])} for r in rows]

    def curve(self, job_id: str) -> list[dict]:
        """The job's step and epoch events (their data, oldest first): its result file's rows."""
        rows = self._q("SELECT data FROM events WHERE job_id=? AND data IS NOT NULL ORDER BY seq", job_id)
        out = []
        for row in rows:
            data = json.loads(row["data"])
            if data.get("type") in ("metrics", "epoch"):
                out.append({**data, "event": "step" if data["type"] == "metrics" else "epoch"})
        return out

    def claim_job(self, job_id: str, owner: str, lease_s: float) -> bool:
        """queued -> running, held by `owner` for lease_s seconds (renew_job), atomically: False when
        another server process sharing the store took it first, or it was cancelled meanwhile."""
        return self.update_job(job_id, if_status=("queued",), status="running", owner=owner,
                               lease_until=time.time() + lease_s)  # fmt: skip

    def request_pause(self, job_id: str) -> str | None:
        """In one statement: a queued job is paused; a running one gets its pause_requested flag.
        Returns the job's status after it ("paused" or "running"), None if it was neither."""
        with self._lock:
            row = self._db.execute(
                "UPDATE jobs SET status=CASE status WHEN 'queued' THEN 'paused' ELSE status END,"
                " pause_requested=CASE status WHEN 'running' THEN 1 ELSE pause_requested END"
                " WHERE id=? AND status IN ('queued','running') RETURNING status",
                (job_id,),
            ).fetchone()
        return row["status"] if row is not None else None

    def pause_requested(self, job_id: str) -> bool:
        return bool(self._q("SELECT 1 FROM jobs WHERE id=? AND pause_requested=1", job_id))

    def renew_job(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extends `owner`'s lease on its running job: False once the job is no longer running there
        (cancelled through another server, or failed by one that found the lease ended)."""
        return self.update_job(job_id, if_status=("running",), if_owner=owner,
                               lease_until=time.time() + lease_s)  # fmt: skip

    def last_event_at(self, job_id: str) -> float:
        """When the job's newest event was added (0 without one)."""
        rows = self._q("SELECT created_at FROM events WHERE job_id=? ORDER BY seq DESC LIMIT 1", job_id)
        return float(rows[0]["created_at"]) if rows else 0.0

    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
        self._q(
            "INSERT INTO events (job_id, created_at, level, message, data) VALUES (?,?,?,?,?)",
            job_id, int(time.time()), level, message, json.dumps(data) if data is not None else None,
        )  # fmt: skip

    def trainer_seen(self, owner: str, model: str) -> None:
        """`owner` (a server's JobManager) trains jobs for base `model`, as of now."""
        self._q(
            "INSERT INTO trainers (owner, model, seen) VALUES (?,?,?) "
            "ON CONFLICT(owner) DO UPDATE SET model=excluded.model, seen=excluded.seen",
            owner, model, time.time(),
        )  # fmt: skip

    def trainer_gone(self, owner: str) -> None:
        self._q("DELETE FROM trainers WHERE owner=?", owner)

    def trainers(self, model: str, since: float) -> int:
        """How many servers that train jobs for base `model` were seen since then (time.time())."""
        return self._q("SELECT COUNT(*) AS n FROM trainers WHERE model=? AND seen>=?", model, since)[0]["n"]

    # ------------------------------------------------------------------ batches
    def batch_dir(self) -> Path:
        """Where running batches append their results (partial output and error files)."""
        path = self.root / "batches"
        path.mkdir(exist_ok=True)
        return path

    def add_batch(self, batch: dict) -> dict:
        self._q(
            "INSERT INTO batches (id, tenant, endpoint, input_file_id, completion_window, status, created_at,"
            " expires_at, total, metadata, model) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            batch["id"], batch["tenant"], batch["endpoint"], batch["input_file_id"], batch["completion_window"],
            "validating", batch["created_at"], batch["expires_at"], batch["total"],
            json.dumps(batch["metadata"]) if batch.get("metadata") is not None else None, batch.get("model"),
        )  # fmt: skip
        return self.get_batch(batch["tenant"], batch["id"])

    def claim_batch(self, batch_id: str, owner: str, lease_s: float) -> bool:
        """Takes (or renews) the batch for `owner` for lease_s seconds, unless another runner holds it
        (replicas sharing the store): True if it is `owner`'s now."""
        now = time.time()
        with self._lock:
            cursor = self._db.execute(
                "UPDATE batches SET owner=?, lease_until=? WHERE id=? AND (owner IS NULL OR owner=? OR lease_until<?)",
                (owner, now + lease_s, batch_id, owner, now),
            )
            return cursor.rowcount == 1

    def release_batch(self, batch_id: str, owner: str) -> None:
        self._q("UPDATE batches SET owner=NULL, lease_until=NULL WHERE id=? AND owner=?", batch_id, owner)

    def get_batch(self, tenant: str | None, batch_id: str) -> dict | None:
        rows = self._q("SELECT * FROM batches WHERE id=?", batch_id)
        if not rows or (tenant is not None and rows[0]["tenant"] != tenant):
            return None
        return _batch(rows[0])

    def list_batches(self, tenant: str) -> list[dict]:
        rows = self._q("SELECT * FROM batches WHERE tenant=? ORDER BY created_at DESC, rowid DESC", tenant)
        return [_batch(r) for r in rows]

    def batches_with_status(self, *statuses: str) -> list[dict]:
        marks = ",".join("?" * len(statuses))
        sql = f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY created_at, rowid"
        return [_batch(r) for r in self._q(sql, *statuses)]

    def update_batch(
        self, batch_id: str, if_status: str | None = None, if_owner: str | None = None, **fields: Any
    ) -> bool:
        """if_status: only a batch in that status changes (a cancel between a read and this write
        wins); if_owner: only one that runner holds (claim_batch). Returns whether it changed."""
        for key in ("metadata", "errors"):
            if fields.get(key) is not None:
                fields[key] = json.dumps(fields[key])
        where = [(f"{column}=?", (value,)) for column, value in (("status", if_status), ("owner", if_owner))]
        return self._update("batches", batch_id, fields, [w for w in where if w[1][0] is not None])

    def events(self, job_id: str, limit: int, after: int | None = None) -> list[dict]:
        """Newest first (as OpenAI lists them); `after` = an event seq to page past."""
        sql = (
            "SELECT * FROM events WHERE job_id=?"
            + (" AND seq<?" if after else "")
            + " ORDER BY seq DESC LIMIT ?"
        )
        rows = self._q(sql, job_id, *([after] if after else []), limit)
        return [{**dict(r), "data": json.loads(r["data"]) if r["data"] else None} for r in rows]


def _batch(row: sqlite3.Row) -> dict:
    batch = dict(row)
    for key in ("metadata", "errors"):
        batch[key] = json.loads(batch[key]) if batch[key] else None
    return batch


def _job(row: sqlite3.Row) -> dict:
    job = dict(row)
    job["hyperparameters"] = json.loads(job["hyperparameters"])
    job["error"] = json.loads(job["error"]) if job["error"] else None
    job["result_files"] = json.loads(job["result_files"]) if job["result_files"] else []
    job["metadata"] = json.loads(job["metadata"]) if job["metadata"] else None
    return job


def fs_type(path: Path, mountinfo: str | None = None) -> str:
    """The type of the file system `path` is on (Linux's /proc/self/mountinfo: the longest mount point
    above it); "" where that cannot be read."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return ""
    real = os.path.realpath(path)
    best, kind = "", ""
    for line in mountinfo.splitlines():
        fields = line.split(" - ", 1)
        if len(fields) != 2:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[0].split()[4])  # \040: " "
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fields[1].split()[0]
    return kind
