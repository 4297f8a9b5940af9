"""The job manager: one worker per server claims sweep jobs from the shared store and runs their steps on the
engine (or a Ray pool), renews its lease, and fans progress out to SSE subscribers and metrics.

Over 400 lines because claiming, running, leasing and publishing one job share its in-memory state (``_Live``)
and must change together; views live in :mod:`.views`, route logic in :mod:`.service`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from laser_ops.datasets import Dataset
from laser_ops.ray_sweeps import ModelSource, PoolClosed, RaySweepPool
from laser_ops.sweeps import (
    SweepConfig,
    SweepProgress,
    SweepRow,
    SweepRunner,
    run_steps,
)
from server.engine import RequestCancelled
from server.errors import ApiError
from laser_protocol.jobs import JobProgress, JobPublic
from server.state import Services
from server.store import StoreUnavailableError
from server.store.datasets import DatasetStore
from server.store.jobs import STATES, Claim, JobRecord, JobStore
from server.serving.jobs import views

logger = logging.getLogger(__name__)

POLL_MAX_S = 2.0  # an idle server looks for jobs submitted elsewhere at least this often


def job_config(job: JobRecord) -> SweepConfig:
    """The job's sweep config (the stored JSON also carries where it runs: ray_address)."""
    return SweepConfig.model_validate({k: v for k, v in job.config.items() if k != "ray_address"})


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
        loaded = self.services.engine.info.identity
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
        steps = runner.steps(self.services.engine.info.targets)
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
        settings, loaded = self.services.settings, self.services.engine.info.identity
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
            await asyncio.to_thread(run_steps, runner, self.services.engine.info.targets, pool.submit,
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
        # 'succeeded' and 'failed' are the worker's own last write; a job cancelled from outside may still be
        # ending its step here (and will settle its rows), so only that one waits for the worker.
        ending = job.state == "cancelled" and self.running_job == job_id
        if not job.terminal or ending:
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
        live = self._live_for(job.id)
        return views.job_public(job, rows, progress=live.progress if live is not None else None,
                                elapsed_s=live.elapsed if live is not None else None)

    def progress_event(self, job: JobRecord, kind: str = "progress") -> JobProgress:
        live = self._live_for(job.id)
        p = live.progress if live is not None else None
        best_row = p.best if p is not None else None
        if best_row is None and job.best_key:
            best_row = next((r for r in self.store.rows(job.id) if r.key == job.best_key), None)
        return views.job_progress(job, kind, progress=p, elapsed_s=live.elapsed if live is not None else None,
                                  best=best_row)

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
        if job_id in self._subscribers:
            self._publish(job_id, views.running_progress(live.job, p, live.elapsed))

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
