"""What the job routes do: queue a sweep (validated against the loaded model), list, read, cancel, delete, and
follow a job's events; plus the start-up and shutdown hooks that own the manager."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from laser_ops.sweeps import (
    SweepConfig,
    SweepConfigError,
    SweepRunner,
    grid_candidates,
    planned_total,
)
from laser_ops.targets import TargetError
from server import sse
from server.errors import ApiError
from laser_protocol.jobs import (
    TERMINAL_STATES,
    JobDeleted,
    JobList,
    JobPublic,
    SweepJobCreate,
)
from server.serving import datasets as datasets_serving
from server.state import Services
from server.store.jobs import JobRecord, JobStore
from server.serving.jobs import views
from server.serving.jobs.manager import JobManager

def manager(services: Services) -> JobManager:
    if services.jobs is None:
        raise RuntimeError("the job manager is not started")
    return services.jobs


async def startup(app: Any, services: Services) -> None:
    """Start-up hook: build the manager; it claims unfinished jobs as it goes."""
    m = JobManager(services, services.datasets, JobStore(services.db),
                   lease_s=services.settings.job_lease_s)
    services.jobs = m
    m.start()


async def shutdown(app: Any) -> None:
    """Shutdown hook: cancel the worker and SSE helpers; the running job is given back to the queue."""
    services = getattr(app.state, "services", None)
    m = services.jobs if services is not None else None
    if m is not None:
        await m.stop()


def _check_grid(services: Services, config: SweepConfig) -> int:
    """Validate the grid against the loaded model; the number of configs. 422 naming the field."""
    targets = services.engine.info.targets
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
        identity = services.engine.info.identity
        stored = config.model_dump(mode="json") | ({"ray_address": body.ray_address} if body.ray_address else {})
        job = m.store.create(body.dataset, stored, total=planned_total(config, n_grid),
                             n_validation=len(runner.split.validation), n_test=len(runner.split.test),
                             model_fingerprint=identity.fingerprint, model_id=identity.model_id)
        return m.view(job, [])

    public = await services.db.run(create)
    m.wake()
    await m._refresh_metrics()
    return public


async def list_jobs(services: Services, state: str | None) -> JobList:
    m = manager(services)
    jobs = await services.db.run(m.store.list, state)
    return JobList(data=[views.job_summary(j) for j in jobs])


async def get_job(services: Services, job_id: str) -> JobPublic:
    m = manager(services)
    return await services.db.run(m.view_of, job_id)


async def cancel_job(services: Services, job_id: str) -> JobPublic:
    return await manager(services).cancel(job_id)


async def get_record(services: Services, job_id: str) -> JobRecord:
    job = await services.db.run(manager(services).store.get, job_id)
    if job is None:
        raise ApiError(404, f"unknown job {job_id!r}", ("path", "job_id"))
    return job


async def delete_job(services: Services, job_id: str) -> JobDeleted:
    await manager(services).delete(job_id)
    return JobDeleted(id=job_id)


async def events(services: Services, job_id: str) -> AsyncIterator[sse.Event]:
    """SSE events: a snapshot, one ``progress`` event per step, a ``state`` event per change; ends when terminal.

    Events of a job this server runs come as they happen; a job running on another server is followed
    through the store (every ``poll_s``): a ``progress`` event when its step count moves, ``state`` when its
    state changes. Keep-alive comments and disconnects are the response's business (:mod:`server.sse`).
    """
    m = manager(services)
    await get_record(services, job_id)  # 404 before the stream starts
    q = m.subscribe(job_id)  # subscribe first, then snapshot: no event can fall in between

    async def stream() -> AsyncIterator[sse.Event]:
        try:
            job = await get_record(services, job_id)
            first = await services.db.run(m.progress_event, job, "state" if job.terminal else "progress")
            yield sse.typed(first.type, first)
            if job.terminal:
                return
            seen = (job.state, job.done)
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), m.poll_s)
                except asyncio.TimeoutError:
                    if m._live_for(job_id) is not None:
                        continue  # run here: its events come through the queue
                    job = await get_record(services, job_id)  # run elsewhere (or not at all): follow the store
                    if (job.state, job.done) == seen:
                        continue
                    ev = await services.db.run(m.progress_event, job, "state" if job.state != seen[0] else "progress")
                seen = (ev.state, ev.done)
                yield sse.typed(ev.type, ev)
                if ev.state in TERMINAL_STATES:
                    return
        finally:
            m.unsubscribe(job_id, q)

    return stream()
