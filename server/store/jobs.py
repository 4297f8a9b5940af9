"""Sweep jobs and their finished rows, with leases so that several servers can share one queue.

A job is ``queued``, then ``running`` under an ``owner`` (one server process) that renews its ``heartbeat``
while it works, then ``succeeded``, ``failed`` or ``cancelled``. The rules, each one conditional ``UPDATE``
whose row count decides the outcome (the database serialises the writers, so exactly one racer wins):

- **claim**: a server takes a queued job, or a running one whose owner let the lease lapse (no heartbeat for
  ``lease_s`` by the database clock) or released it on shutdown;
- **renew / record_step / finish / release**: only while the caller still owns the running job. A ``False``
  means the job was cancelled or taken over: the caller stops and writes nothing more;
- **cancel**: any server moves a queued or running job to ``cancelled``; the owner sees it at its next
  heartbeat or step.

Rows are keyed by step key, written with the step that produced them, so a resumed job reruns nothing it
finished. Each job records the model fingerprint it was submitted for.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from laser_ops.sweeps import SweepRow
from laser_protocol.jobs import TERMINAL_STATES
from server.store.database import Connection, Database

STATES = ("queued", "running", "succeeded", "failed", "cancelled")


@dataclass
class JobRecord:
    id: str
    state: str
    dataset: str
    config: dict[str, Any]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    done: int = 0
    total: int | None = None
    elapsed_s: float = 0.0
    stopped: str | None = None
    n_validation: int | None = None
    n_test: int | None = None
    best_key: str | None = None
    owner: str | None = None
    heartbeat: float | None = None
    model_fingerprint: str | None = None
    model_id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class Claim:
    """A job this server now owns, and whom it took it from."""

    job: JobRecord
    previous_owner: str | None  # the owner whose lease lapsed (None: queued, or released on shutdown)
    idle_s: float | None  # seconds since the previous owner's last heartbeat, by the database clock


_PROGRESS_FIELDS = frozenset({"done", "total", "elapsed_s", "best_key", "stopped", "finished_at", "error"})


class JobStore:
    """Jobs in the shared database. Blocking calls: from async code, go through ``db.run``."""

    def __init__(self, db: Database) -> None:
        self.db = db
        now = db.now
        # A running job is up for grabs when nobody holds it or its owner's heartbeat is older than the lease.
        self._claimable = (f"(state = 'queued' OR (state = 'running' AND (owner IS NULL OR heartbeat IS NULL "
                           f"OR heartbeat < {now} - ?)))")

    @staticmethod
    def _record(r: Any) -> JobRecord:
        values = {f.name: r[f.name] for f in fields(JobRecord)}
        values["config"] = json.loads(values["config"])
        return JobRecord(**values)

    @staticmethod
    def _sets(values: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
        bad = set(values) - _PROGRESS_FIELDS
        if bad:
            raise ValueError(f"unknown job fields {sorted(bad)}")
        return "".join(f", {k} = ?" for k in values), tuple(values.values())

    def _one(self, con: Connection, job_id: str) -> JobRecord | None:
        r = con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if r is None else self._record(r)

    @staticmethod
    def _put_rows(con: Connection, job_id: str, rows: list[SweepRow]) -> None:
        con.executemany(
            "INSERT INTO job_rows (job_id, key, step, row) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (job_id, key) DO UPDATE SET step = excluded.step, row = excluded.row",
            [(job_id, r.key, r.step, r.model_dump_json()) for r in rows])

    # -- reads

    def get(self, job_id: str) -> JobRecord | None:
        with self.db.snapshot() as con:
            return self._one(con, job_id)

    def list(self, state: str | None = None) -> list[JobRecord]:
        sql, args = "SELECT * FROM jobs", ()
        if state is not None:
            sql, args = sql + " WHERE state = ?", (state,)
        with self.db.snapshot() as con:
            rows = con.execute(sql + " ORDER BY created_at DESC, id DESC", args).fetchall()
        return [self._record(r) for r in rows]

    def rows(self, job_id: str) -> list[SweepRow]:
        with self.db.snapshot() as con:
            rs = con.execute("SELECT row FROM job_rows WHERE job_id = ? ORDER BY step", (job_id,)).fetchall()
        return [SweepRow.model_validate_json(r["row"]) for r in rs]

    def get_with_rows(self, job_id: str) -> tuple[JobRecord, list[SweepRow]] | None:
        """A job and its rows from one consistent snapshot."""
        with self.db.snapshot() as con:
            job = self._one(con, job_id)
            if job is None:
                return None
            rs = con.execute("SELECT row FROM job_rows WHERE job_id = ? ORDER BY step", (job_id,)).fetchall()
        return job, [SweepRow.model_validate_json(r["row"]) for r in rs]

    def counts(self) -> dict[str, int]:
        with self.db.snapshot() as con:
            rs = con.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {r["state"]: int(r["n"]) for r in rs}

    def active_using(self, dataset: str) -> list[str]:
        with self.db.snapshot() as con:
            rs = con.execute("SELECT id FROM jobs WHERE dataset = ? AND state IN ('queued', 'running')",
                             (dataset,)).fetchall()
        return [r["id"] for r in rs]

    # -- writes

    def create(self, dataset: str, config: dict[str, Any], *, total: int | None, n_validation: int | None,
               n_test: int | None, model_fingerprint: str | None = None, model_id: str | None = None) -> JobRecord:
        job = JobRecord(id=f"sweep-{uuid.uuid4().hex[:12]}", state="queued", dataset=dataset, config=config,
                        created_at=time.time(), total=total, n_validation=n_validation, n_test=n_test,
                        model_fingerprint=model_fingerprint, model_id=model_id)
        with self.db.transaction() as con:
            con.execute("INSERT INTO jobs (id, state, dataset, config, created_at, total, n_validation, n_test, "
                        "model_fingerprint, model_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (job.id, job.state, dataset, json.dumps(config), job.created_at, total, n_validation,
                         n_test, model_fingerprint, model_id))
        return job

    def claim(self, job_id: str, owner: str, lease_s: float) -> Claim | None:
        """Take ``job_id`` if it is claimable; None if another server holds it (or it ended)."""
        with self.db.transaction() as con:
            before = con.execute(f"SELECT state, owner, {self.db.now} - heartbeat AS idle_s FROM jobs WHERE id = ?",
                                 (job_id,)).fetchone()
            won = con.execute(
                f"UPDATE jobs SET state = 'running', owner = ?, heartbeat = {self.db.now}, "
                f"started_at = COALESCE(started_at, ?) WHERE id = ? AND {self._claimable}",
                (owner, time.time(), job_id, lease_s)).rowcount
            if won != 1:
                return None
            job = self._one(con, job_id)
        assert job is not None and before is not None
        lapsed = before["state"] == "running" and before["owner"] is not None
        return Claim(job, before["owner"] if lapsed else None,
                     float(before["idle_s"]) if lapsed and before["idle_s"] is not None else None)

    def claim_next(self, owner: str, lease_s: float) -> Claim | None:
        """The next job for ``owner``: an abandoned running one first, then the oldest queued one."""
        for _ in range(32):
            with self.db.snapshot() as con:
                r = con.execute(
                    f"SELECT id FROM jobs WHERE {self._claimable} "
                    "ORDER BY CASE state WHEN 'running' THEN 0 ELSE 1 END, created_at, id LIMIT 1",
                    (lease_s,)).fetchone()
            if r is None:
                return None
            claim = self.claim(r["id"], owner, lease_s)
            if claim is not None:
                return claim
            # Another server claimed it (or it was cancelled) between the read and the update: next one.
        return None

    def renew(self, job_id: str, owner: str) -> bool:
        """Extend the lease; False if the job was cancelled or taken over."""
        with self.db.transaction() as con:
            return con.execute(f"UPDATE jobs SET heartbeat = {self.db.now} WHERE id = ? AND owner = ? AND "
                               "state = 'running'", (job_id, owner)).rowcount == 1

    def record_step(self, job_id: str, owner: str, rows: list[SweepRow], **progress: Any) -> bool:
        """Store finished rows and progress (and renew the lease) only while ``owner`` runs the job."""
        sets, values = self._sets(progress)
        with self.db.transaction() as con:
            if con.execute(f"UPDATE jobs SET heartbeat = {self.db.now}{sets} WHERE id = ? AND owner = ? AND "
                           "state = 'running'", (*values, job_id, owner)).rowcount != 1:
                return False
            self._put_rows(con, job_id, rows)
        return True

    def finish(self, job_id: str, owner: str, state: str, rows: Sequence[SweepRow] = (), **fields: Any) -> bool:
        """Move the owner's running job to a terminal ``state``; False if it was cancelled or taken over."""
        if state not in TERMINAL_STATES:
            raise ValueError(f"{state!r} is not a terminal state")
        sets, values = self._sets(fields)
        with self.db.transaction() as con:
            if con.execute(f"UPDATE jobs SET state = ?{sets} WHERE id = ? AND owner = ? AND state = 'running'",
                           (state, *values, job_id, owner)).rowcount != 1:
                return False
            self._put_rows(con, job_id, list(rows))
        return True

    def settle_cancelled(self, job_id: str, owner: str, rows: Sequence[SweepRow] = (), **fields: Any) -> bool:
        """The final figures of a job cancelled while ``owner`` ran it (its state stays cancelled)."""
        sets, values = self._sets(fields)
        with self.db.transaction() as con:
            if con.execute(f"UPDATE jobs SET owner = owner{sets} WHERE id = ? AND owner = ? AND state = 'cancelled'",
                           (*values, job_id, owner)).rowcount != 1:
                return False
            self._put_rows(con, job_id, list(rows))
        return True

    def release(self, job_id: str, owner: str, **fields: Any) -> bool:
        """Give the job back on shutdown: still running, owned by nobody, so any server resumes it at once."""
        sets, values = self._sets(fields)
        with self.db.transaction() as con:
            return con.execute(f"UPDATE jobs SET owner = NULL, heartbeat = NULL{sets} WHERE id = ? AND owner = ? "
                               "AND state = 'running'", (*values, job_id, owner)).rowcount == 1

    def bind_model(self, job_id: str, owner: str, fingerprint: str, model_id: str) -> bool:
        """Record the model of a job submitted before jobs carried one (a v0.1 database)."""
        with self.db.transaction() as con:
            return con.execute("UPDATE jobs SET model_fingerprint = ?, model_id = ? WHERE id = ? AND owner = ? "
                               "AND model_fingerprint IS NULL", (fingerprint, model_id, job_id, owner)).rowcount == 1

    def delete(self, job_id: str) -> bool:
        """Remove a finished job and its rows; False if it is unknown or not finished (one transaction)."""
        with self.db.transaction() as con:
            if con.execute("DELETE FROM jobs WHERE id = ? AND state IN ('succeeded', 'failed', 'cancelled')",
                           (job_id,)).rowcount != 1:
                return False
            con.execute("DELETE FROM job_rows WHERE job_id = ?", (job_id,))
            return True

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job (from any server); False if it had already ended (or is unknown)."""
        with self.db.transaction() as con:
            return con.execute("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ? AND "
                               "state IN ('queued', 'running')", (time.time(), job_id)).rowcount == 1
