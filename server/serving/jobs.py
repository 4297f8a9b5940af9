"""Sweep jobs: durable state in SQLite, one job at a time in FIFO order, each step on the engine thread.

- :class:`JobStore` keeps jobs and their finished rows (one SQLite row per step key, written as each step
  finishes), so a job interrupted by a restart resumes without rerunning finished configs.
- :class:`JobManager` owns one background worker task (tracked in a set with the SSE helpers and cancelled
  on shutdown). For each job it builds a :class:`~laser_ops.sweeps.SweepRunner` off the event loop, then
  submits every step as its own engine task, so inference batches run between sweep steps. Progress is
  fanned out to SSE subscribers and to the ``laser_jobs`` / ``laser_job_progress_ratio`` gauges.
- Cancel takes effect between steps (a step already on the engine finishes; its row is kept).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from laser_ops.evaluation import EvalReport, wilson_interval
from laser_ops.interventions import InterventionError, parse_profile
from laser_ops.plots import accuracy_heatmap_png
from laser_ops.sweeps import SweepConfig, SweepConfigError, SweepProgress, SweepRow, SweepRunner, grid_candidates
from laser_ops.targets import TargetError
from server.engine import RequestCancelled
from server.errors import ApiError
from server.protocol.jobs import (
    TERMINAL_STATES,
    Accuracy,
    JobDeleted,
    JobList,
    JobProgress,
    JobPublic,
    JobSummary,
    McNemar,
    PromoteRequest,
    SweepJobCreate,
    SweepRowPublic,
    TestReportPublic,
)
from server.protocol.profiles import ProfilePublic
from server.serving import datasets as datasets_serving
from server.serving import profiles as profiles_serving
from server.state import Services
from server.store import RESERVED_PROFILES, Database

logger = logging.getLogger(__name__)

EXTRAS_KEY = "jobs"
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
KEEPALIVE_S = 15.0


# ---------------------------------------------------------------------------------------------- store


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

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class JobStore:
    """Jobs and their finished rows in the shared SQLite file. Safe to call from any thread."""

    _DDL = """
    CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL DEFAULT 'sweep',
        state TEXT NOT NULL,
        dataset TEXT NOT NULL,
        config TEXT NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        error TEXT,
        done INTEGER NOT NULL DEFAULT 0,
        total INTEGER,
        elapsed_s REAL NOT NULL DEFAULT 0,
        stopped TEXT,
        n_validation INTEGER,
        n_test INTEGER,
        best_key TEXT
    );
    CREATE TABLE IF NOT EXISTS job_rows (
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        step INTEGER NOT NULL,
        row TEXT NOT NULL,
        PRIMARY KEY (job_id, key)
    );
    CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state)
    """
    _FIELDS = frozenset(JobRecord.__dataclass_fields__) - {"id", "config", "created_at", "dataset"}

    def __init__(self, db: Database) -> None:
        self.db = db
        db.ensure_schema(self._DDL)

    @staticmethod
    def _record(r: sqlite3.Row) -> JobRecord:
        return JobRecord(id=r["id"], state=r["state"], dataset=r["dataset"], config=json.loads(r["config"]),
                         created_at=r["created_at"], started_at=r["started_at"], finished_at=r["finished_at"],
                         error=r["error"], done=r["done"], total=r["total"], elapsed_s=r["elapsed_s"],
                         stopped=r["stopped"], n_validation=r["n_validation"], n_test=r["n_test"],
                         best_key=r["best_key"])

    def create(self, dataset: str, config: dict[str, Any], *, total: int | None, n_validation: int | None,
               n_test: int | None) -> JobRecord:
        job = JobRecord(id=f"sweep-{uuid.uuid4().hex[:12]}", state="queued", dataset=dataset, config=config,
                        created_at=time.time(), total=total, n_validation=n_validation, n_test=n_test)
        with self.db.transaction() as con:
            con.execute("INSERT INTO jobs (id, state, dataset, config, created_at, total, n_validation, n_test) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (job.id, job.state, dataset, json.dumps(config), job.created_at, total, n_validation,
                         n_test))
        return job

    def get(self, job_id: str) -> JobRecord | None:
        with self.db.connect() as con:
            r = con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if r is None else self._record(r)

    def list(self, state: str | None = None) -> list[JobRecord]:
        sql, args = "SELECT * FROM jobs", ()
        if state is not None:
            sql, args = sql + " WHERE state = ?", (state,)
        with self.db.connect() as con:
            rows = con.execute(sql + " ORDER BY rowid DESC", args).fetchall()
        return [self._record(r) for r in rows]

    def next_runnable(self) -> JobRecord | None:
        """An interrupted (running) job first, then the oldest queued one."""
        with self.db.connect() as con:
            r = con.execute("SELECT * FROM jobs WHERE state IN ('running', 'queued') "
                            "ORDER BY state = 'running' DESC, rowid LIMIT 1").fetchone()
        return None if r is None else self._record(r)

    def update(self, job_id: str, *, only_if_active: bool = False, **fields: Any) -> bool:
        """Set fields; with ``only_if_active`` only while the job is queued or running (a cancel wins)."""
        bad = set(fields) - self._FIELDS
        if bad:
            raise ValueError(f"unknown job fields {sorted(bad)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        sql = f"UPDATE jobs SET {sets} WHERE id = ?" + (" AND state IN ('queued', 'running')" if only_if_active
                                                         else "")
        with self.db.transaction() as con:
            return con.execute(sql, (*fields.values(), job_id)).rowcount > 0

    def put_rows(self, job_id: str, rows: list[SweepRow]) -> None:
        with self.db.transaction() as con:
            con.executemany("INSERT OR REPLACE INTO job_rows (job_id, key, step, row) VALUES (?, ?, ?, ?)",
                            [(job_id, r.key, r.step, r.model_dump_json()) for r in rows])

    def rows(self, job_id: str) -> list[SweepRow]:
        with self.db.connect() as con:
            rs = con.execute("SELECT row FROM job_rows WHERE job_id = ? ORDER BY step", (job_id,)).fetchall()
        return [SweepRow.model_validate_json(r["row"]) for r in rs]

    def counts(self) -> dict[str, int]:
        with self.db.connect() as con:
            rs = con.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {r["state"]: r["n"] for r in rs}

    def delete(self, job_id: str) -> bool:
        """Remove a finished job and its rows; False if it is unknown or not finished."""
        with self.db.transaction() as con:
            return con.execute("DELETE FROM jobs WHERE id = ? AND state IN ('succeeded', 'failed', 'cancelled')",
                               (job_id,)).rowcount > 0

    def active_using(self, dataset: str) -> list[str]:
        with self.db.connect() as con:
            rs = con.execute("SELECT id FROM jobs WHERE dataset = ? AND state IN ('queued', 'running')",
                             (dataset,)).fetchall()
        return [r["id"] for r in rs]


# ---------------------------------------------------------------------------------------------- views


def _accuracy(report: EvalReport) -> Accuracy:
    return Accuracy(accuracy=report.accuracy, ci_low=report.ci_low, ci_high=report.ci_high,
                    n_correct=report.n_correct, n=report.n, log_loss=report.log_loss)


def row_public(r: SweepRow, n_validation: int | None = None) -> SweepRowPublic:
    val = None
    if r.val_accuracy is not None:
        if r.val_correct:
            n, k = len(r.val_correct), sum(r.val_correct)
        else:
            n = n_validation or 0
            k = round(r.val_accuracy * n)
        lo, hi = wilson_interval(k, n)
        val = Accuracy(accuracy=r.val_accuracy, ci_low=lo, ci_high=hi, n_correct=k, n=n, log_loss=r.val_log_loss)
    return SweepRowPublic(key=r.key, step=r.step, role=r.role, type=r.type, layer=r.layer, rho=r.rho,
                          interventions=r.interventions, validation=val, delta_accuracy=r.delta_accuracy,
                          delta_log_loss=r.delta_log_loss, val_perplexity=r.val_perplexity, rejected=r.rejected,
                          kept=r.kept, seconds=r.seconds)


def test_public(row: SweepRow) -> TestReportPublic | None:
    t = row.test
    if t is None:
        return None
    m = t.mcnemar
    p, significant = float(m["p_value"]), bool(m["significant"])
    d = 100 * t.delta_accuracy
    if t.winner_key == "base":
        verdict = "no config beat the base model on validation; the winner is the base model itself"
    elif significant and t.delta_accuracy > 0:
        verdict = f"the gain of {d:+.1f} points on test is significant (exact McNemar p={p:.2g})"
    elif significant:
        verdict = f"the winner is significantly worse than base on test ({d:+.1f} points, p={p:.2g})"
    elif t.delta_accuracy > 0:
        verdict = f"the gain of {d:+.1f} points on test is not significant (p={p:.2g})"
    else:
        verdict = f"the winner does not beat base on test ({d:+.1f} points); the difference is not significant " \
                  f"(p={p:.2g})"
    return TestReportPublic(
        winner_key=t.winner_key, interventions=t.interventions, base=_accuracy(t.base), winner=_accuracy(t.winner),
        delta_accuracy=t.delta_accuracy,
        mcnemar=McNemar(only_base=m["only_a"], only_winner=m["only_b"], p_value=p, alpha=m["alpha"],
                        significant=significant),
        significant=significant and t.delta_accuracy > 0, verdict=verdict)


def planned_total(config: SweepConfig, n_grid: int) -> int:
    n = n_grid if config.max_configs is None else min(n_grid, config.max_configs)
    return n + 2 + (config.strategy == "spectral_prior")  # base and test (and the spectrum step)


# ---------------------------------------------------------------------------------------------- manager


@dataclass
class _Live:
    """In-memory state of the job being run."""

    job_id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: SweepProgress | None = None
    started: float = field(default_factory=time.monotonic)
    elapsed_before: float = 0.0

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started


class JobManager:
    """Runs sweep jobs one at a time, FIFO; resumes interrupted ones on start."""

    def __init__(self, services: Services, datasets: datasets_serving.DatasetStore, store: JobStore) -> None:
        self.services = services
        self.datasets = datasets
        self.store = store
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._subscribers: dict[str, set[asyncio.Queue[JobProgress]]] = {}
        self._live: _Live | None = None
        self.steps_run = 0  # steps executed by this manager (a resumed job does not rerun finished ones)

    # -- lifecycle

    def start(self) -> None:
        self._spawn(self._work(), name="laser-sweep-worker")
        self._refresh_metrics()

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        """Cancel the worker (the running job stays 'running' in the store and resumes on the next start)."""
        live = self._live
        if live is not None:
            live.cancel.set()  # drops the step if it has not reached the engine yet
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    @property
    def running_job(self) -> str | None:
        """Id of the job this manager is executing right now (None between jobs)."""
        return self._live.job_id if self._live is not None else None

    # -- worker

    async def _work(self) -> None:
        while True:
            self._wake.clear()
            job = await asyncio.to_thread(self.store.next_runnable)
            if job is None:
                await self._wake.wait()
                continue
            await self._run(job)

    async def _after_step(self, job_id: str, row: SweepRow) -> None:
        """Called after each step's row is stored (a seam for tests and extensions)."""

    async def _run(self, job: JobRecord) -> None:
        live = _Live(job.id, elapsed_before=job.elapsed_s)
        self._live = live
        loop = asyncio.get_running_loop()

        def on_progress(p: SweepProgress) -> None:  # any thread
            live.progress = p
            loop.call_soon_threadsafe(self._on_progress, job.id, p)

        try:
            resumed = job.state == "running"
            await asyncio.to_thread(self.store.update, job.id, only_if_active=True, state="running",
                                    started_at=job.started_at or time.time())
            self._state_changed(job.id)
            dataset = await asyncio.to_thread(self.datasets.get, job.dataset)
            rows = await asyncio.to_thread(self.store.rows, job.id)
            config = SweepConfig.model_validate(job.config)
            runner = await asyncio.to_thread(SweepRunner, config, dataset, completed=rows,
                                             on_progress=on_progress, should_cancel=live.cancel.is_set)
            if resumed:
                logger.info("job %s: resuming with %d finished step(s)", job.id, len(rows))
            steps = runner.steps(self.services.swapper.targets)
            while True:
                step = await asyncio.to_thread(next, steps, None)
                if step is None:
                    break
                try:
                    row = await self.services.engine.run_task(step.run, cancelled=live.cancel, background=True)
                except RequestCancelled:
                    break
                runner.record(row)
                self.steps_run += 1
                await asyncio.to_thread(self._persist_step, job.id, row, runner, live)
                await self._after_step(job.id, row)
            result = runner.result()
            await asyncio.to_thread(self.store.put_rows, job.id, result.rows)  # greedy 'kept' flags settle late
            best = runner.best()
            fields = dict(finished_at=time.time(), stopped=result.stopped, done=len(runner.rows),
                          elapsed_s=live.elapsed, best_key=best.key if best else None)
            if live.cancel.is_set():
                await asyncio.to_thread(self.store.update, job.id, **fields)  # the row already says cancelled
            else:
                await asyncio.to_thread(self.store.update, job.id, only_if_active=True, state="succeeded",
                                        **fields)
        except asyncio.CancelledError:
            # Shutdown: the job stays queued/running in the store and resumes on the next start.
            await asyncio.shield(asyncio.to_thread(self.store.update, job.id, elapsed_s=live.elapsed))
            raise
        except Exception as exc:
            logger.exception("job %s failed", job.id)
            msg = f"dataset {job.dataset!r} no longer exists" if isinstance(exc, KeyError) else \
                f"{type(exc).__name__}: {exc}"
            await asyncio.to_thread(self.store.update, job.id, only_if_active=True, state="failed", error=msg,
                                    finished_at=time.time(), elapsed_s=live.elapsed)
        finally:
            self._live = None
        self._state_changed(job.id)

    def _persist_step(self, job_id: str, row: SweepRow, runner: SweepRunner, live: _Live) -> None:
        self.store.put_rows(job_id, [row])
        best = runner.best()
        total = live.progress.total if live.progress is not None else None
        self.store.update(job_id, done=len(runner.rows), elapsed_s=live.elapsed,
                          best_key=best.key if best else None, **({"total": total} if total else {}))

    # -- control

    def cancel(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        if job is None:
            raise ApiError(404, f"unknown job {job_id!r}", ("path", "job_id"))
        if job.terminal:
            raise ApiError(409, f"job {job_id} already {job.state}", ("path", "job_id"))
        self.store.update(job_id, only_if_active=True, state="cancelled", finished_at=time.time())
        live = self._live
        if live is not None and live.job_id == job_id:
            live.cancel.set()
        self._state_changed(job_id)
        job = self.store.get(job_id)
        assert job is not None
        return job

    def delete(self, job_id: str) -> None:
        """Delete a finished job (409 while it is queued, running, or still ending its last step)."""
        job = self.store.get(job_id)
        if job is None:
            raise ApiError(404, f"unknown job {job_id!r}", ("path", "job_id"))
        if not job.terminal or self.running_job == job_id:
            raise ApiError(409, f"job {job_id} is {job.state}"
                           + ("" if job.terminal else f"; cancel it first (POST /v1/jobs/{job_id}/cancel)")
                           + (" and still ending its current step; retry shortly" if job.terminal else ""),
                           ("path", "job_id"))
        if not self.store.delete(job_id):
            raise ApiError(409, f"job {job_id} changed state; retry", ("path", "job_id"))
        self._refresh_metrics()

    def in_use(self, dataset: str) -> list[str]:
        return self.store.active_using(dataset)

    # -- views

    def view(self, job: JobRecord) -> JobPublic:
        rows = self.store.rows(job.id)
        by_key = {r.key: r for r in rows}
        live = self._live if self._live is not None and self._live.job_id == job.id else None
        n_val = job.n_validation
        base = by_key.get("base")
        best = by_key.get(job.best_key) if job.best_key else None
        test_row = by_key.get("test")
        test = test_public(test_row) if test_row is not None else None
        beats = None
        if base is not None and best is not None:
            beats = (best.val_accuracy or 0.0) > (base.val_accuracy or 0.0)
        total = job.total
        done = len(rows)
        if live is not None and live.progress is not None:
            total = live.progress.total
        verdict = test.verdict if test is not None else None
        if job.state == "cancelled" and verdict is None:
            verdict = f"cancelled after {done} of {total} steps; the best config so far is promotable"
        return JobPublic(
            **self._summary(job, done, total).model_dump(), config=job.config,
            progress=(done / total) if total else None,
            elapsed_s=live.elapsed if live is not None else job.elapsed_s,
            eta_s=live.progress.eta_s if live is not None and live.progress is not None else None,
            stopped=job.stopped, n_validation=n_val, n_test=job.n_test,
            base=row_public(base, n_val) if base is not None else None,
            best=row_public(best, n_val) if best is not None else None, beats_base_on_validation=beats,
            rows=[row_public(r, n_val) for r in rows], test=test, verdict=verdict)

    @staticmethod
    def _summary(job: JobRecord, done: int | None = None, total: int | None = None) -> JobSummary:
        return JobSummary(id=job.id, state=job.state, dataset=job.dataset,  # type: ignore[arg-type]
                          done=job.done if done is None else done, total=job.total if total is None else total,
                          created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                          error=job.error)

    def progress_event(self, job: JobRecord, kind: str = "progress", last: SweepRow | None = None) -> JobProgress:
        live = self._live if self._live is not None and self._live.job_id == job.id else None
        p = live.progress if live is not None else None
        n_val = job.n_validation
        best_row = p.best if p is not None else None
        if best_row is None and job.best_key:
            best_row = next((r for r in self.store.rows(job.id) if r.key == job.best_key), None)
        done = p.done if p is not None else job.done
        total = p.total if p is not None else job.total
        return JobProgress(type=kind, id=job.id, state=job.state, done=done, total=total,  # type: ignore[arg-type]
                           progress=(done / total) if total else None,
                           elapsed_s=live.elapsed if live is not None else job.elapsed_s,
                           eta_s=p.eta_s if p is not None else None,
                           best=row_public(best_row, n_val) if best_row is not None else None,
                           last=row_public(last, n_val) if last is not None else None, error=job.error)

    # -- fan-out (event loop)

    def subscribe(self, job_id: str) -> asyncio.Queue[JobProgress]:
        q: asyncio.Queue[JobProgress] = asyncio.Queue()
        self._subscribers.setdefault(job_id, set()).add(q)
        return q

    def unsubscribe(self, job_id: str, q: asyncio.Queue[JobProgress]) -> None:
        subs = self._subscribers.get(job_id)
        if subs is not None:
            subs.discard(q)
            if not subs:
                del self._subscribers[job_id]

    def _publish(self, job_id: str, event: JobProgress) -> None:
        for q in list(self._subscribers.get(job_id, ())):
            q.put_nowait(event)

    def _on_progress(self, job_id: str, p: SweepProgress) -> None:
        if p.total:
            self.services.metrics.job_progress.labels(job_id).set(p.done / p.total)
        job = self.store.get(job_id)
        if job is None or job_id not in self._subscribers:
            return
        n_val = job.n_validation
        self._publish(job_id, JobProgress(
            id=job_id, state=job.state, done=p.done, total=p.total,  # type: ignore[arg-type]
            progress=p.done / p.total if p.total else None, elapsed_s=self._live.elapsed if self._live else 0.0,
            eta_s=p.eta_s, best=row_public(p.best, n_val) if p.best else None,
            last=row_public(p.last, n_val) if p.last else None))

    def _state_changed(self, job_id: str) -> None:
        self._refresh_metrics()
        job = self.store.get(job_id)
        if job is None:
            return
        if job.terminal:
            try:
                self.services.metrics.job_progress.remove(job_id)
            except KeyError:
                pass
        if job_id in self._subscribers:
            self._publish(job_id, self.progress_event(job, "state"))

    def _refresh_metrics(self) -> None:
        counts = self.store.counts()
        for s in STATES:
            self.services.metrics.jobs.labels(s).set(counts.get(s, 0))


# ---------------------------------------------------------------------------------------------- hooks


def manager(services: Services) -> JobManager:
    return services.extras[EXTRAS_KEY]


async def startup(app: Any, services: Services) -> None:
    """Start-up hook (after the dataset store's): build the store and manager, resume unfinished jobs."""
    store = await asyncio.to_thread(JobStore, services.db)
    m = JobManager(services, datasets_serving.store(services), store)
    services.extras[EXTRAS_KEY] = m
    m.start()


async def shutdown(app: Any) -> None:
    """Shutdown hook: cancel the worker and SSE helpers (unfinished jobs resume on the next start)."""
    services = getattr(app.state, "services", None)
    m = services.extras.get(EXTRAS_KEY) if services is not None else None
    if m is not None:
        await m.stop()


# ---------------------------------------------------------------------------------------------- logic


def _get(services: Services, job_id: str) -> JobRecord:
    job = manager(services).store.get(job_id)
    if job is None:
        raise ApiError(404, f"unknown job {job_id!r}", ("path", "job_id"))
    return job


def _check_grid(services: Services, config: SweepConfig) -> int:
    """Validate the grid against the loaded model; the number of configs. 422 naming the field."""
    targets = services.swapper.targets
    try:
        return len(grid_candidates(config, targets))
    except (SweepConfigError, TargetError) as e:
        fld = getattr(e, "field", "layers")
        allowed = ""
        if fld == "layers":
            n = targets.num_layers
            allowed = f"; allowed: 0..{n - 1} (or -{n}..-1 from the end) or 'all'"
        raise ApiError(422, f"{e}{allowed}", ("body", fld)) from None


async def create_sweep(services: Services, body: SweepJobCreate) -> JobPublic:
    m = manager(services)
    if body.dataset not in m.datasets:
        known = [d.name for d in datasets_serving.list_datasets(services).data]
        raise ApiError(404, f"unknown dataset {body.dataset!r}; known: {known}", ("body", "dataset"))
    config = SweepConfig.model_validate(body.model_dump())
    n_grid = _check_grid(services, config)
    dataset = await asyncio.to_thread(m.datasets.get, body.dataset)
    try:
        runner = await asyncio.to_thread(SweepRunner, config, dataset)
    except (ValueError, SweepConfigError) as e:
        raise ApiError(422, f"dataset {body.dataset!r} cannot be split with this config: {e}",
                       ("body", getattr(e, "field", "validation_fraction"))) from None
    job = await asyncio.to_thread(
        m.store.create, body.dataset, config.model_dump(mode="json"), total=planned_total(config, n_grid),
        n_validation=len(runner.split.validation), n_test=len(runner.split.test))
    m.wake()
    m._refresh_metrics()
    return m.view(job)


def list_jobs(services: Services, state: str | None) -> JobList:
    m = manager(services)
    return JobList(data=[m._summary(j) for j in m.store.list(state)])


def get_job(services: Services, job_id: str) -> JobPublic:
    m = manager(services)
    return m.view(_get(services, job_id))


def cancel_job(services: Services, job_id: str) -> JobPublic:
    m = manager(services)
    return m.view(m.cancel(job_id))


async def delete_job(services: Services, job_id: str) -> JobDeleted:
    await asyncio.to_thread(manager(services).delete, job_id)
    return JobDeleted(id=job_id)


async def events(services: Services, job_id: str,
                 is_disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
    """SSE stream: a snapshot, one ``progress`` event per step, a ``state`` event per change; ends when terminal."""
    m = manager(services)
    _get(services, job_id)  # 404 before the stream starts
    q = m.subscribe(job_id)  # subscribe first, then snapshot: no event can fall in between

    def sse(ev: JobProgress) -> str:
        return f"event: {ev.type}\ndata: {ev.model_dump_json()}\n\n"

    async def stream() -> AsyncIterator[str]:
        try:
            job = _get(services, job_id)
            yield sse(m.progress_event(job, "state" if job.terminal else "progress"))
            if job.terminal:
                return
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    if await is_disconnected():
                        return
                    yield ": keep-alive\n\n"
                    continue
                yield sse(ev)
                if ev.type == "state" and ev.state in TERMINAL_STATES:
                    return
        finally:
            m.unsubscribe(job_id, q)

    return stream()


async def plot_png(services: Services, job_id: str) -> bytes:
    m = manager(services)
    job = _get(services, job_id)
    rows = await asyncio.to_thread(m.store.rows, job_id)
    base = next((r for r in rows if r.key == "base"), None)
    if base is None or base.val_accuracy is None or not any(r.role == "config" for r in rows):
        raise ApiError(409, f"job {job_id} has no finished configs to plot yet (state {job.state})")
    title = f"{job.dataset}: validation accuracy ({job.id}, base {base.val_accuracy:.3f})"
    try:
        return await asyncio.to_thread(accuracy_heatmap_png, rows, base.val_accuracy, title=title)
    except ValueError as e:
        raise ApiError(409, f"nothing to plot: {e}") from None


def promote(services: Services, job_id: str, body: PromoteRequest) -> ProfilePublic:
    """The job's best config becomes a profile (servable at once). 409: no winner, or the name is taken."""
    m = manager(services)
    job = _get(services, job_id)
    if job.state not in ("succeeded", "cancelled"):
        raise ApiError(409, f"job {job_id} is {job.state}; promote it once it has succeeded (or was cancelled)",
                       ("path", "job_id"))
    rows = {r.key: r for r in m.store.rows(job_id)}
    best = rows.get(job.best_key) if job.best_key else None
    if best is None or not best.interventions:
        raise ApiError(409, f"job {job_id} has no winning config to promote", ("path", "job_id"))
    if body.name in RESERVED_PROFILES:
        raise ApiError(409, f"profile {body.name!r} is reserved (the unedited model)", ("body", "name"))
    if services.profiles.get(body.name) is not None and not body.replace:
        raise ApiError(409, f"profile {body.name!r} already exists; send replace: true to overwrite it",
                       ("body", "name"))
    try:
        specs = parse_profile(best.interventions)
    except (InterventionError, ValueError) as e:
        raise ApiError(422, f"the winner's interventions are invalid: {e}", ("path", "job_id")) from None
    profiles_serving.plan(services, specs)
    base = rows.get("base")
    def pct(row: Any) -> str:
        return "n/a" if row is None or row.val_accuracy is None else f"{row.val_accuracy:.4f}"

    description = body.description or (
        f"promoted from sweep {job_id} on {job.dataset}: {best.key}, validation accuracy "
        f"{pct(best)} (base {pct(base)})")
    services.profiles.put(body.name, specs, description)
    services.decomposer.prepare_profile(body.name, specs)
    return profiles_serving.get_profile(services, body.name)
