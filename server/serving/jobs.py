"""Sweep jobs: a queue shared by every server on one store, one job at a time per server, each step on the
engine thread.

- :class:`~server.store.jobs.JobStore` keeps jobs and their finished rows (one row per step key, written as
  each step finishes), with leases: a server claims a job with one conditional ``UPDATE``, renews its
  heartbeat every ``job_lease_s / 3`` while it runs it, and another server takes the job over only once that
  heartbeat is older than ``job_lease_s`` (its owner died). A resumed job reruns no finished step.
- :class:`JobManager` owns one background worker (tracked in a set with the heartbeat and SSE helpers and
  cancelled on shutdown, which gives the running job back so any server resumes it at once). For each job it
  builds a :class:`~laser_ops.sweeps.SweepRunner` off the event loop, then submits every step as its own
  engine task, so inference batches run between sweep steps. Progress is fanned out to SSE subscribers (a
  subscriber on another server follows the store) and to the ``laser_jobs`` / ``laser_job_progress_ratio``
  gauges.
- Cancel is a state change in the store, from any server: the owner sees it at its next heartbeat or step
  (a step already on the engine finishes; only rows stored before the cancel are kept).
- A job is bound to the fingerprint of the model it was submitted for; a server with other weights fails
  it instead of resuming it with a different base row.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from laser_ops.datasets import Dataset
from laser_ops.evaluation import EvalReport, LabelMetrics, wilson_interval
from laser_ops.interventions import InterventionError, parse_profile
from laser_ops.plots import change_heatmap_png
from laser_ops.ray_sweeps import ModelSource, PoolClosed, RaySweepPool
from laser_ops.sweep_steps import evaluations_of, plan_split
from laser_ops.sweeps import (
    SweepConfig,
    SweepConfigError,
    SweepProgress,
    SweepResult,
    SweepRow,
    SweepRunner,
    grid_candidates,
    planned_total,
    run_steps,
)
from laser_ops.targets import TargetError
from server.engine import RequestCancelled
from server.errors import ApiError
from laser_protocol.jobs import (
    TERMINAL_STATES,
    Accuracy,
    ExampleEvidence,
    ExampleFilter,
    ExamplePage,
    ExampleSplit,
    JobDeleted,
    JobList,
    JobProgress,
    JobPublic,
    JobSummary,
    LabelMetricsPublic,
    MajorityBaseline,
    McNemar,
    PromoteRequest,
    SweepJobCreate,
    SweepRowPublic,
    TestReportPublic,
)
from laser_protocol.profiles import ProfilePublic
from server.serving import datasets as datasets_serving
from server.serving import profiles as profiles_serving
from server.state import Services
from server.store import RESERVED_PROFILES, StoreUnavailableError
from server.store.datasets import DatasetStore
from server.store.jobs import STATES, Claim, JobRecord, JobStore

logger = logging.getLogger(__name__)

EXTRAS_KEY = "jobs"
KEEPALIVE_S = 15.0
POLL_MAX_S = 2.0  # an idle server looks for jobs submitted elsewhere at least this often


# ---------------------------------------------------------------------------------------------- views


def _accuracy(report: EvalReport) -> Accuracy:
    return Accuracy(accuracy=report.accuracy, ci_low=report.ci_low, ci_high=report.ci_high,
                    n_correct=report.n_correct, n=report.n, log_loss=report.log_loss)


def _labels(labels: LabelMetrics | None) -> LabelMetricsPublic | None:
    return LabelMetricsPublic(**labels.model_dump()) if labels is not None else None


def row_public(r: SweepRow, n_validation: int | None = None) -> SweepRowPublic:
    val = None
    if r.val_accuracy is not None:
        if r.val_n is not None:
            n, k = r.val_n, r.val_n_correct or 0
        elif r.val_correct:
            n, k = len(r.val_correct), sum(r.val_correct)
        else:
            n = n_validation or 0
            k = round(r.val_accuracy * n)
        lo, hi = wilson_interval(k, n)
        val = Accuracy(accuracy=r.val_accuracy, ci_low=lo, ci_high=hi, n_correct=k, n=n, log_loss=r.val_log_loss)
    return SweepRowPublic(key=r.key, step=r.step, role=r.role, type=r.type, layer=r.layer, rho=r.rho,
                          interventions=r.interventions, validation=val, labels=_labels(r.val_labels),
                          collapsed=r.collapsed, delta_accuracy=r.delta_accuracy, delta_log_loss=r.delta_log_loss,
                          val_perplexity=r.val_perplexity, rejected=r.rejected, eliminated=r.eliminated,
                          kept=r.kept, seconds=r.seconds)


def _mcnemar(m: dict[str, Any]) -> McNemar:
    return McNemar(only_base=m["only_a"], only_winner=m["only_b"], p_value=float(m["p_value"]), alpha=m["alpha"],
                   significant=bool(m["significant"]))


def test_public(row: SweepRow) -> TestReportPublic | None:
    t = row.test
    if t is None:
        return None
    m = _mcnemar(t.mcnemar)
    majority = None
    if t.majority_label is not None and t.majority_accuracy is not None and t.mcnemar_majority is not None:
        mm = _mcnemar(t.mcnemar_majority)
        majority = MajorityBaseline(label=t.majority_label, accuracy=t.majority_accuracy, mcnemar=mm,
                                    beaten=mm.significant and t.winner.accuracy > t.majority_accuracy)
    verdict = t.verdict or (f"winner {t.delta_accuracy * 100:+.1f} points vs base on test; "
                            f"{t.mcnemar.get('verdict', '')}")  # rows stored before verdicts existed
    return TestReportPublic(
        winner_key=t.winner_key, interventions=t.interventions, base=_accuracy(t.base), winner=_accuracy(t.winner),
        base_labels=_labels(t.base.labels), winner_labels=_labels(t.winner.labels), delta_accuracy=t.delta_accuracy,
        mcnemar=m, majority=majority, significant=m.significant and t.delta_accuracy > 0, verdict=verdict)


# ---------------------------------------------------------------------------------------------- manager


class ModelChangedError(RuntimeError):
    """The job was submitted for other weights than this server's."""


def server_identity() -> str:
    """Who owns a lease: host, process and a nonce (a restarted process is a new owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class _Live:
    """In-memory state of the job this server runs."""

    job: JobRecord
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: SweepProgress | None = None
    pool: RaySweepPool | None = None  # the job's Ray actors, when it runs on Ray (cancel closes them)
    persisted: set[str] = field(default_factory=set)  # step keys stored under this server's lease
    started: float = field(default_factory=time.monotonic)
    elapsed_before: float = 0.0

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started


class JobManager:
    """Runs sweep jobs one at a time on this server, in submission order across all servers of the store."""

    def __init__(self, services: Services, datasets: DatasetStore, store: JobStore, *, owner: str | None = None,
                 lease_s: float = 30.0) -> None:
        self.services = services
        self.db = services.db
        self.datasets = datasets
        self.store = store
        self.owner = owner or server_identity()
        self.lease_s = lease_s
        self.heartbeat_s = lease_s / 3
        self.poll_s = min(self.heartbeat_s, POLL_MAX_S)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._subscribers: dict[str, set[asyncio.Queue[JobProgress]]] = {}
        self._live: _Live | None = None
        self.rows_run = 0  # rows computed by this manager (a resumed job does not recompute finished ones)

    # -- lifecycle

    def start(self) -> None:
        self._spawn(self._work(), name="laser-sweep-worker")

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        """Cancel the worker; the running job is given back (still running, no owner) for any server to resume."""
        live = self._live
        if live is not None:
            live.cancel.set()  # drops the step if it has not reached the engine yet
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    def _live_for(self, job_id: str) -> _Live | None:
        live = self._live
        return live if live is not None and live.job.id == job_id else None

    @property
    def running_job(self) -> str | None:
        """Id of the job this manager is executing right now (None between jobs)."""
        return self._live.job.id if self._live is not None else None

    # -- worker

    async def _work(self) -> None:
        while True:
            self._wake.clear()
            try:
                claim = await self.db.run(self.store.claim_next, self.owner, self.lease_s)
            except Exception:
                logger.exception("job queue unavailable; retrying in %.1f s", self.poll_s)
                claim = None
            if claim is None:
                await self._refresh_metrics()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                await self._run(claim)
            except Exception:  # the worker outlives any one job (its lease lapses; another server resumes it)
                logger.exception("job %s: stopped on an unexpected error", claim.job.id)

    async def _after_step(self, job_id: str, row: SweepRow) -> None:
        """Called after each step's row is stored (a seam for tests and extensions)."""

    async def _heartbeat(self, live: _Live) -> None:
        """Renew the lease; on losing it (cancelled or taken over), stop the job at its next step."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                held = await self.db.run(self.store.renew, live.job.id, self.owner)
            except Exception:
                logger.warning("job %s: heartbeat failed (the lease lapses after %.1f s without one)", live.job.id,
                               self.lease_s, exc_info=True)
                continue
            if not held:
                logger.info("job %s: cancelled or taken over elsewhere; stopping at the next step", live.job.id)
                live.cancel.set()
                return

    async def _check_model(self, job: JobRecord) -> None:
        loaded = self.services.loaded
        if job.model_fingerprint is None:  # submitted before jobs recorded their model (a v0.1 database)
            if await self.db.run(self.store.bind_model, job.id, self.owner, loaded.fingerprint, loaded.model_id):
                logger.warning("job %s did not record its model; bound it to %s (%s)", job.id, loaded.model_id,
                               loaded.fingerprint[:16])
            else:  # lost meanwhile (cancelled or taken over): the next step's write will say so and stop it
                logger.info("job %s: could not bind its model (no longer ours)", job.id)
        elif job.model_fingerprint != loaded.fingerprint:
            raise ModelChangedError(
                f"job {job.id} was submitted for model {job.model_id or '?'} (fingerprint "
                f"{job.model_fingerprint[:16]}), but this server runs {loaded.model_id} (fingerprint "
                f"{loaded.fingerprint[:16]}); resuming would mix results of different weights. Submit the sweep "
                "again to run it on this model.")

    async def _run(self, claim: Claim) -> None:
        job = claim.job
        live = _Live(job, elapsed_before=job.elapsed_s)
        self._live = live
        if claim.previous_owner is not None:
            logger.warning("job %s: taking over from %s, whose last heartbeat was %.1f s ago (lease %.1f s)",
                           job.id, claim.previous_owner, claim.idle_s or 0.0, self.lease_s)
        heartbeat = self._spawn(self._heartbeat(live), name=f"laser-job-heartbeat-{job.id}")
        try:
            await self._execute(live)
            await self._state_changed(job.id)  # published while running_job still names the job
        finally:
            heartbeat.cancel()
            self._live = None

    async def _execute(self, live: _Live) -> None:
        """Run the claimed job's remaining steps and record how it ended (failures included)."""
        job = live.job
        loop = asyncio.get_running_loop()

        def on_progress(p: SweepProgress) -> None:  # any thread
            live.progress = p
            loop.call_soon_threadsafe(self._on_progress, live, p)

        try:
            await self._state_changed(job.id)
            await self._check_model(job)
            dataset = await self.db.run(self.datasets.get, job.dataset)
            rows = await self.db.run(self.store.rows, job.id)
            live.persisted.update(r.key for r in rows)
            config = job_config(job)
            runner = await asyncio.to_thread(SweepRunner, config, dataset, completed=rows,
                                             on_progress=on_progress, should_cancel=live.cancel.is_set)
            if rows:
                logger.info("job %s: resuming with %d finished step(s)", job.id, len(rows))
            address = job.config.get("ray_address") or self.services.settings.ray_address
            if address:
                await self._run_on_ray(live, address, config, dataset, runner)
            else:
                await self._run_in_process(live, runner)
            await self._conclude(live, runner)
        except asyncio.CancelledError:
            # Shutdown: give the job back (running, no owner), so any server resumes it without waiting.
            if await asyncio.shield(self.db.run(self.store.release, job.id, self.owner, elapsed_s=live.elapsed)):
                logger.info("job %s: given back to the queue on shutdown", job.id)
            else:
                logger.info("job %s: already cancelled or taken over; nothing to give back", job.id)
            raise
        except StoreUnavailableError as exc:
            # Not the job's fault: leave it running; its lease lapses and a server (maybe this one) resumes it.
            logger.error("job %s: %s; leaving it to be resumed once the store is back", job.id, exc)
        except Exception as exc:
            if isinstance(exc, ModelChangedError):
                logger.error("job %s failed: %s", job.id, exc)
                msg = str(exc)
            else:
                logger.exception("job %s failed", job.id)
                msg = f"dataset {job.dataset!r} no longer exists" if isinstance(exc, KeyError) else \
                    f"{type(exc).__name__}: {exc}"
            if not await self.db.run(self.store.finish, job.id, self.owner, "failed", error=msg,
                                     finished_at=time.time(), elapsed_s=live.elapsed):
                logger.warning("job %s: cancelled or taken over before its failure could be recorded", job.id)

    async def _run_in_process(self, live: _Live, runner: SweepRunner) -> None:
        """Each step is a chunked engine task on the model-owner thread (one batch of rows per chunk), so
        inference runs between chunks."""
        job = live.job
        steps = runner.steps(self.services.swapper.targets)
        while True:
            step = await asyncio.to_thread(next, steps, None)
            if step is None:
                break
            try:
                rows = await self.services.engine.run_task(step.work, cancelled=live.cancel, background=True)
            except RequestCancelled:
                break
            runner.record(rows)
            recorded = [runner.rows[r.key] for r in rows]
            if not await self.db.run(self._record_step, live, runner, recorded):
                live.cancel.set()  # cancelled or taken over: these rows are not ours to store
                break
            self.rows_run += len(recorded)
            for row in recorded:  # one line per stored row (key): operators and tests read them
                logger.info("job %s: step %s stored (%d done, %.2f s)", job.id, row.key, len(live.persisted),
                            row.seconds)
            await self._after_step(job.id, recorded[-1])

    async def _run_on_ray(self, live: _Live, address: str, config: SweepConfig, dataset: Dataset,
                          runner: SweepRunner) -> None:
        """The job's steps on a pool of Ray actors (each loads this server's model; fingerprint checked)."""
        settings, loaded = self.services.settings, self.services.loaded
        source = ModelSource(loaded.source, loaded.fingerprint, device=settings.device, dtype=settings.dtype,
                             cache_dir=str(settings.cache_dir) if settings.cache_dir else None)
        pool = await asyncio.to_thread(RaySweepPool, address, source, config, dataset, actors=settings.ray_actors,
                                       threads=settings.ray_threads_per_actor, svd_cache_bytes=settings.svd_cache_bytes)
        live.pool = pool

        def persist(rows: list[SweepRow]) -> None:  # run_steps' thread
            if not self._record_step(live, runner, rows):
                live.cancel.set()  # cancelled or taken over: stop the pool, store nothing more
                pool.close()
                return
            self.rows_run += len(rows)
            for row in rows:
                logger.info("job %s: step %s stored on Ray (%d done, %.2f s)", live.job.id, row.key,
                            len(live.persisted), row.seconds)

        try:
            await asyncio.to_thread(run_steps, runner, self.services.swapper.targets, pool.submit,
                                    max_in_flight=pool.size, on_record=persist)
        except PoolClosed:
            if not live.cancel.is_set():
                raise
        finally:
            live.pool = None
            await asyncio.to_thread(pool.close)

    def _record_step(self, live: _Live, runner: SweepRunner, rows: list[SweepRow]) -> bool:
        """Store a step's rows with the job's progress, if this server still owns the job (store thread)."""
        best = runner.best()
        total = live.progress.total if live.progress is not None else None
        keys = {r.key for r in rows}
        stored = self.store.record_step(live.job.id, self.owner, rows, done=len(live.persisted | keys),
                                        elapsed_s=live.elapsed, best_key=best.key if best else None,
                                        **({"total": total} if total else {}))
        if stored:
            live.persisted.update(keys)
        return stored

    async def _conclude(self, live: _Live, runner: SweepRunner) -> None:
        """Record the end: succeeded, or the final figures of a cancel; nothing if the job was taken over."""
        job_id = live.job.id
        result = runner.result()
        rows = [r for r in result.rows if r.key in live.persisted]  # greedy 'kept' flags settle late
        best = runner.best()
        fields: dict[str, Any] = dict(stopped=result.stopped, done=len(rows), elapsed_s=live.elapsed)
        if best is None or best.key in live.persisted:
            fields["best_key"] = best.key if best else None
        if not live.cancel.is_set() and await self.db.run(self.store.finish, job_id, self.owner, "succeeded", rows,
                                                          finished_at=time.time(), **fields):
            return
        current = await self.db.run(self.store.get, job_id)
        if current is not None and current.state == "cancelled":
            fields["stopped"] = "cancelled"
            if await self.db.run(self.store.settle_cancelled, job_id, self.owner, rows, **fields):
                logger.info("job %s: cancelled after %d stored step(s)", job_id, len(rows))
                return
        logger.warning("job %s is no longer this server's (state %s, owner %s); stopped without writing more",
                       job_id, current.state if current else "deleted", current.owner if current else None)

    # -- control

    async def cancel(self, job_id: str) -> JobPublic:
        """Cancel from any server: a state change in the store that the owner sees at its next step."""
        if not await self.db.run(self.store.cancel, job_id):
            job = await self.db.run(self.store.get, job_id)
            if job is None:
                raise ApiError(404, f"unknown job {job_id!r}", ("path", "job_id"))
            raise ApiError(409, f"job {job_id} already {job.state}", ("path", "job_id"))
        live = self._live_for(job_id)
        if live is not None:
            live.cancel.set()
            if live.pool is not None:
                live.pool.close()  # stops the actors: in-flight steps end now, not after they finish
        await self._state_changed(job_id)
        return await self.db.run(self.view_of, job_id)

    async def delete(self, job_id: str) -> None:
        """Delete a finished job (409 while it is queued, running, or still ending its last step)."""
        job = await self.db.run(self.store.get, job_id)
        if job is None:
            raise ApiError(404, f"unknown job {job_id!r}", ("path", "job_id"))
        if not job.terminal or self.running_job == job_id:
            raise ApiError(409, f"job {job_id} is {job.state}"
                           + ("" if job.terminal else f"; cancel it first (POST /v1/jobs/{job_id}/cancel)")
                           + (" and still ending its current step; retry shortly" if job.terminal else ""),
                           ("path", "job_id"))
        if not await self.db.run(self.store.delete, job_id):
            raise ApiError(409, f"job {job_id} changed state; retry", ("path", "job_id"))
        await self._refresh_metrics()

    def in_use(self, dataset: str) -> list[str]:
        return self.store.active_using(dataset)

    # -- views (blocking: they read the store; call through db.run)

    def view_of(self, job_id: str) -> JobPublic:
        found = self.store.get_with_rows(job_id)
        if found is None:
            raise ApiError(404, f"unknown job {job_id!r}", ("path", "job_id"))
        return self.view(*found)

    def view(self, job: JobRecord, rows: list[SweepRow]) -> JobPublic:
        by_key = {r.key: r for r in rows}
        live = self._live_for(job.id)
        n_val = job.n_validation
        base = by_key.get("base")
        best = by_key.get(job.best_key) if job.best_key else None
        test_row = by_key.get("test")
        test = test_public(test_row) if test_row is not None else None
        beats = None
        if base is not None and best is not None:
            beats = (best.val_accuracy or 0.0) > (base.val_accuracy or 0.0)
        total = job.total
        done = len(rows)  # what is stored (live progress may be ahead of the store)
        if live is not None and live.progress is not None:
            total = live.progress.total
        verdict = test.verdict if test is not None else None
        if job.state == "cancelled" and verdict is None:
            verdict = f"cancelled after {done} of {total} steps; the best config so far is promotable"
        return JobPublic(
            **self._summary(job, done, total).model_dump(), config=job.config, model_id=job.model_id,
            model_fingerprint=job.model_fingerprint, progress=(done / total) if total else None,
            elapsed_s=live.elapsed if live is not None else job.elapsed_s,
            eta_s=live.progress.eta_s if live is not None and live.progress is not None else None,
            stopped=job.stopped, n_validation=n_val, n_test=job.n_test,
            base=row_public(base, n_val) if base is not None else None,
            best=row_public(best, n_val) if best is not None else None, beats_base_on_validation=beats,
            rows=[row_public(r, n_val) for r in rows], test=test, verdict=verdict,
            example_evaluations=evaluations_of(rows) if n_val else None,
            full_grid_evaluations=sum(r.role == "config" for r in rows) * n_val if n_val else None)

    @staticmethod
    def _summary(job: JobRecord, done: int | None = None, total: int | None = None) -> JobSummary:
        return JobSummary(id=job.id, state=job.state, dataset=job.dataset,  # type: ignore[arg-type]
                          done=job.done if done is None else done, total=job.total if total is None else total,
                          created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                          error=job.error, owner=job.owner, heartbeat_at=job.heartbeat)

    def progress_event(self, job: JobRecord, kind: str = "progress", last: SweepRow | None = None) -> JobProgress:
        live = self._live_for(job.id)
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

    def _on_progress(self, live: _Live, p: SweepProgress) -> None:
        job_id = live.job.id
        if p.total:
            self.services.metrics.job_progress.labels(job_id).set(p.done / p.total)
        if job_id not in self._subscribers:
            return
        n_val = live.job.n_validation
        self._publish(job_id, JobProgress(
            id=job_id, state="running", done=p.done, total=p.total,
            progress=p.done / p.total if p.total else None, elapsed_s=live.elapsed,
            eta_s=p.eta_s, best=row_public(p.best, n_val) if p.best else None,
            last=row_public(p.last, n_val) if p.last else None))

    async def _state_changed(self, job_id: str) -> None:
        try:
            job = await self.db.run(self.store.get, job_id)
            await self._refresh_metrics()
            if job is None:
                return
            if job.terminal:
                try:
                    self.services.metrics.job_progress.remove(job_id)
                except KeyError:
                    pass
            if job_id in self._subscribers:
                self._publish(job_id, await self.db.run(self.progress_event, job, "state"))
        except Exception:  # metrics and events are best effort; the store holds the truth
            logger.warning("job %s: could not publish its state change", job_id, exc_info=True)

    async def _refresh_metrics(self) -> None:
        try:
            counts = await self.db.run(self.store.counts)
        except Exception:
            logger.warning("job counts unavailable", exc_info=True)
            return
        for s in STATES:
            self.services.metrics.jobs.labels(s).set(counts.get(s, 0))


# ---------------------------------------------------------------------------------------------- hooks


def manager(services: Services) -> JobManager:
    return services.extras[EXTRAS_KEY]


async def startup(app: Any, services: Services) -> None:
    """Start-up hook (after the dataset store's): build the manager; it claims unfinished jobs as it goes."""
    m = JobManager(services, datasets_serving.store(services), JobStore(services.db),
                   lease_s=services.settings.job_lease_s)
    services.extras[EXTRAS_KEY] = m
    m.start()


async def shutdown(app: Any) -> None:
    """Shutdown hook: cancel the worker and SSE helpers; the running job is given back to the queue."""
    services = getattr(app.state, "services", None)
    m = services.extras.get(EXTRAS_KEY) if services is not None else None
    if m is not None:
        await m.stop()


# ---------------------------------------------------------------------------------------------- logic


def job_config(job: JobRecord) -> SweepConfig:
    """The job's sweep config (the stored JSON also carries where it runs: ray_address)."""
    return SweepConfig.model_validate({k: v for k, v in job.config.items() if k != "ray_address"})


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
    """Validate and queue a sweep bound to this server's model; any server of the store may run it."""
    m = manager(services)
    config = SweepConfig.model_validate(body.model_dump(exclude={"ray_address"}))

    def create() -> JobPublic:  # store thread: dataset lookups and the insert
        if body.dataset not in m.datasets:
            known = datasets_serving.known_names(m.datasets)
            raise ApiError(404, f"unknown dataset {body.dataset!r}; known: {known}", ("body", "dataset"))
        n_grid = _check_grid(services, config)
        dataset = m.datasets.get(body.dataset)
        try:
            runner = SweepRunner(config, dataset)
        except (ValueError, SweepConfigError) as e:
            fld = getattr(e, "field", "validation_fraction")
            what = "cannot be split with this config" if fld == "validation_fraction" else "does not fit this config"
            raise ApiError(422, f"dataset {body.dataset!r} {what}: {e}", ("body", fld)) from None
        loaded = services.loaded
        stored = config.model_dump(mode="json") | ({"ray_address": body.ray_address} if body.ray_address else {})
        job = m.store.create(body.dataset, stored, total=planned_total(config, n_grid),
                             n_validation=len(runner.split.validation), n_test=len(runner.split.test),
                             model_fingerprint=loaded.fingerprint, model_id=loaded.model_id)
        return m.view(job, [])

    public = await services.db.run(create)
    m.wake()
    await m._refresh_metrics()
    return public


async def list_jobs(services: Services, state: str | None) -> JobList:
    m = manager(services)
    jobs = await services.db.run(m.store.list, state)
    return JobList(data=[m._summary(j) for j in jobs])


async def get_job(services: Services, job_id: str) -> JobPublic:
    m = manager(services)
    return await services.db.run(m.view_of, job_id)


async def cancel_job(services: Services, job_id: str) -> JobPublic:
    return await manager(services).cancel(job_id)


async def _get(services: Services, job_id: str) -> JobRecord:
    job = await services.db.run(manager(services).store.get, job_id)
    if job is None:
        raise ApiError(404, f"unknown job {job_id!r}", ("path", "job_id"))
    return job


async def delete_job(services: Services, job_id: str) -> JobDeleted:
    await manager(services).delete(job_id)
    return JobDeleted(id=job_id)


async def events(services: Services, job_id: str,
                 is_disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
    """SSE stream: a snapshot, one ``progress`` event per step, a ``state`` event per change; ends when terminal.

    Events of a job this server runs come as they happen; a job running on another server is followed
    through the store (every ``poll_s``): a ``progress`` event when its step count moves, ``state`` when its
    state changes.
    """
    m = manager(services)
    await _get(services, job_id)  # 404 before the stream starts
    q = m.subscribe(job_id)  # subscribe first, then snapshot: no event can fall in between

    def sse(ev: JobProgress) -> str:
        return f"event: {ev.type}\ndata: {ev.model_dump_json()}\n\n"

    async def stream() -> AsyncIterator[str]:
        try:
            job = await _get(services, job_id)
            first = await services.db.run(m.progress_event, job, "state" if job.terminal else "progress")
            yield sse(first)
            if job.terminal:
                return
            seen = (job.state, job.done)
            quiet_since = time.monotonic()
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), min(KEEPALIVE_S, m.poll_s))
                except asyncio.TimeoutError:
                    ev = None
                    if m._live_for(job_id) is None:  # run elsewhere (or not at all): follow the store
                        job = await _get(services, job_id)
                        if (job.state, job.done) != seen:
                            kind = "state" if job.state != seen[0] else "progress"
                            ev = await services.db.run(m.progress_event, job, kind)
                    if ev is None:
                        if time.monotonic() - quiet_since >= KEEPALIVE_S:
                            if await is_disconnected():
                                return
                            quiet_since = time.monotonic()
                            yield ": keep-alive\n\n"
                        continue
                seen = (ev.state, ev.done)
                quiet_since = time.monotonic()
                yield sse(ev)
                if ev.state in TERMINAL_STATES:
                    return
        finally:
            m.unsubscribe(job_id, q)

    return stream()


def _shown(example: Any, prediction: int | str | None) -> str:
    if isinstance(prediction, int) and example.choices:
        return example.choices[prediction]
    return "" if prediction is None else str(prediction)


async def examples(services: Services, job_id: str, config: str, split: ExampleSplit, which: ExampleFilter,
                   offset: int, limit: int) -> ExamplePage:
    """Per-example evidence of ``config`` against base: what it fixed and what it broke, with prompts."""
    m = manager(services)
    job = await _get(services, job_id)
    rows = {r.key: r for r in await services.db.run(m.store.rows, job_id)}
    try:
        dataset: Dataset = await services.db.run(m.datasets.get, job.dataset)
    except KeyError:
        raise ApiError(409, f"dataset {job.dataset!r} of job {job_id} no longer exists; its examples cannot be "
                            "shown", ("path", "job_id")) from None
    parts = plan_split(job_config(job), dataset)
    if split == "validation":
        base, row = rows.get("base"), rows.get(config)
        if row is None or row.role not in ("base", "config") or row.val_correct is None:
            known = [k for k, r in rows.items() if r.role in ("base", "config")]
            raise ApiError(404, f"job {job_id} has no validation evidence for config {config!r}; known: "
                                f"{known[:20]}{' ...' if len(known) > 20 else ''}", ("query", "config"))
        if base is None or base.val_correct is None:
            raise ApiError(409, f"job {job_id} has no base row yet", ("path", "job_id"))
        data = parts.validation
        positions = row.val_indices if row.val_indices is not None else list(range(len(row.val_correct)))
        base_out = [(base.val_predictions[i], base.val_correct[i],  # type: ignore[index]
                     base.val_gold_logprobs[i] if base.val_gold_logprobs else None) for i in positions]
        mine = [(p, c, g) for p, c, g in zip(row.val_predictions or [], row.val_correct,
                                              row.val_gold_logprobs or [None] * len(row.val_correct))]
    else:
        t = rows["test"].test if "test" in rows else None
        if t is None:
            raise ApiError(409, f"job {job_id} has no test report yet (state {job.state})", ("path", "job_id"))
        if config not in (t.winner_key, "base"):
            raise ApiError(404, f"test evidence exists for 'base' and the winner {t.winner_key!r}, not {config!r}",
                           ("query", "config"))
        data = parts.test
        positions = list(range(len(t.base.outcomes)))
        base_out = [(o.prediction, o.correct, o.gold_logprob) for o in t.base.outcomes]
        chosen = t.base if config == "base" else t.winner
        mine = [(o.prediction, o.correct, o.gold_logprob) for o in chosen.outcomes]
    entries = []
    counts = {"fixed": 0, "broken": 0, "both_right": 0, "both_wrong": 0}
    for pos, (bp, bc, bg), (cp, cc, cg) in zip(positions, base_out, mine):
        change = "fixed" if cc and not bc else "broken" if bc and not cc else "both_right" if cc else "both_wrong"
        counts[change] += 1
        keep = {"flips": change in ("fixed", "broken"), "fixed": change == "fixed", "broken": change == "broken",
                "disagree": bp != cp, "all": True}[which]
        if keep:
            entries.append((pos, bp, bc, bg, cp, cc, cg, change))
    page = []
    for pos, bp, bc, bg, cp, cc, cg, change in entries[offset:offset + limit]:
        ex = data.examples[pos]
        page.append(ExampleEvidence(index=pos, id=ex.id, prompt=data.prompt(ex), choices=list(ex.choices),
                                    gold=ex.gold_text, base_answer=_shown(ex, bp), config_answer=_shown(ex, cp),
                                    base_correct=bc, config_correct=cc, base_gold_logprob=bg, config_gold_logprob=cg,
                                    change=change))  # type: ignore[arg-type]
    return ExamplePage(job_id=job_id, config=config, split=split, filter=which, counts=counts, total=len(entries),
                       offset=offset, limit=limit, data=page)


async def plot_png(services: Services, job_id: str) -> bytes:
    m = manager(services)
    job = await _get(services, job_id)
    rows = await services.db.run(m.store.rows, job_id)
    base = next((r for r in rows if r.key == "base"), None)
    if base is None or base.val_accuracy is None or not any(r.role == "config" for r in rows):
        raise ApiError(409, f"job {job_id} has no finished configs to plot yet (state {job.state})")
    n = job.n_validation
    title = f"{job.dataset}: validation accuracy change vs base ({job.id}, {n} validation examples)"
    try:
        return await asyncio.to_thread(change_heatmap_png, rows, base.val_accuracy, title=title,
                                       best_key=job.best_key)
    except ValueError as e:
        raise ApiError(409, f"nothing to plot: {e}") from None


async def promote(services: Services, job_id: str, body: PromoteRequest) -> ProfilePublic:
    """The job's best config becomes a profile (servable at once). 409: no winner, or the name is taken."""
    public, specs = await services.db.run(_promote, services, job_id, body)
    services.decomposer.prepare_profile(body.name, specs)  # on the event loop: it schedules background work
    return public


def _promote(services: Services, job_id: str, body: PromoteRequest) -> tuple[ProfilePublic, list[Any]]:
    m = manager(services)
    found = m.store.get_with_rows(job_id)
    if found is None:
        raise ApiError(404, f"unknown job {job_id!r}", ("path", "job_id"))
    job, job_rows = found
    if job.state not in ("succeeded", "cancelled"):
        raise ApiError(409, f"job {job_id} is {job.state}; promote it once it has succeeded (or was cancelled)",
                       ("path", "job_id"))
    rows = {r.key: r for r in job_rows}
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
    return profiles_serving.get_profile(services, body.name), specs
