"""Profile logic: validate against the loaded model, store durably, dry-run on the engine thread.

Names are validated by the protocol models (a safe pattern) and are only ever database keys, never paths.
A replaced profile takes effect at the next batch: the engine resolves a profile's specs per batch. Writes
run on the store's thread pool; reads hit the in-memory mirror.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI

from laser_ops.interventions import InterventionError, InterventionSpec
from laser_ops.swap import EditReport
from laser_ops.targets import TargetError
from server.errors import ApiError
from laser_protocol.profiles import (
    MatrixEditReport,
    ProfileBase,
    ProfileDeleted,
    ProfileDryRun,
    ProfileList,
    ProfilePublic,
)
from server.state import Services
from server.store import RESERVED_PROFILES, ProfileExistsError, StoredProfile

logger = logging.getLogger(__name__)


def _reserved(name: str, action: str) -> ApiError:
    return ApiError(409, f"profile {name!r} is reserved (the unedited model) and cannot be {action}",
                    ("path", "name") if action != "created" else ("body", "name"))


def plan(services: Services, specs: list[InterventionSpec]) -> int:
    """Validate ``specs`` against the loaded model; the number of matrices they edit. 422 naming the field."""
    try:
        return len(services.engine.info.plan(specs))
    except (InterventionError, TargetError) as e:
        loc = e.loc if isinstance(e, InterventionError) else (getattr(e, "field", "target"),)
        raise ApiError(422, str(e), ("body", "interventions", *loc)) from None


def _public(services: Services, p: StoredProfile) -> ProfilePublic:
    try:
        matrices = len(services.engine.info.plan(p.interventions))
    except (InterventionError, TargetError):  # stored before an architecture change: still listable
        matrices = 0
    return ProfilePublic(name=p.name, description=p.description, interventions=p.interventions,
                         matrices=matrices, active=services.engine.active_profile == p.name,
                         created_at=p.created_at, updated_at=p.updated_at)


def _base(services: Services) -> ProfilePublic:
    return ProfilePublic(name="base", description="The unedited model.", interventions=[], reserved=True,
                         matrices=0, active=services.engine.active_profile == "base")


def list_profiles(services: Services) -> ProfileList:
    return ProfileList(data=[_base(services), *(_public(services, p) for p in services.profiles.list())])


def get_profile(services: Services, name: str) -> ProfilePublic:
    if name in RESERVED_PROFILES:
        return _base(services)
    stored = services.profiles.get(name)
    if stored is None:
        raise ApiError(404, f"unknown profile {name!r}", ("path", "name"))
    return _public(services, stored)


def _report(r: EditReport) -> MatrixEditReport:
    return MatrixEditReport(index=r.index, type=r.type, layer=r.layer, param_name=r.param_name,
                            shape=r.shape, kind=r.kind, k=r.k, retained_energy=r.retained_energy,
                            frobenius_error=r.frobenius_error,
                            relative_frobenius_error=r.relative_frobenius_error)


async def dry_run(services: Services, name: str, body: ProfileBase) -> ProfileDryRun:
    """Per-matrix k, retained energy and Frobenius error; reads the weights, so it runs on the engine thread
    (after the SVDs it needs were computed off it)."""
    plan(services, body.interventions)
    specs = list(body.interventions)
    await services.decomposer.prepare(specs)
    try:
        reports = await services.engine.run_task(lambda swapper, _scorer: swapper.dry_run(specs))
    except InterventionError as e:
        raise ApiError(422, str(e), ("body", "interventions", *e.loc)) from None
    return ProfileDryRun(name=name, matrices=[_report(r) for r in reports])


async def create_profile(services: Services, name: str, body: ProfileBase) -> ProfilePublic:
    if name in RESERVED_PROFILES:
        raise _reserved(name, "created")
    plan(services, body.interventions)
    try:
        stored = await services.db.run(services.profiles.put, name, list(body.interventions), body.description,
                                       create_only=True)
    except ProfileExistsError:
        raise ApiError(409, f"profile {name!r} already exists; use PUT /v1/profiles/{name} to replace it",
                       ("body", "name")) from None
    services.decomposer.prepare_profile(name, stored.interventions)
    return _public(services, stored)


async def replace_profile(services: Services, name: str, body: ProfileBase) -> tuple[ProfilePublic, bool]:
    """Create or replace; returns (profile, created)."""
    if name in RESERVED_PROFILES:
        raise _reserved(name, "replaced")
    plan(services, body.interventions)
    created = services.profiles.get(name) is None
    stored = await services.db.run(services.profiles.put, name, list(body.interventions), body.description)
    services.decomposer.prepare_profile(name, stored.interventions)
    return _public(services, stored), created


async def delete_profile(services: Services, name: str) -> ProfileDeleted:
    if name in RESERVED_PROFILES:
        raise _reserved(name, "deleted")
    if not await services.db.run(services.profiles.delete, name):
        raise ApiError(404, f"unknown profile {name!r}", ("path", "name"))
    return ProfileDeleted(name=name)


# -- sharing profiles between replicas -------------------------------------------------------------


async def _refresh_profiles(services: Services, every_s: float) -> None:
    """Pick up profiles other replicas (or processes sharing the data dir) wrote."""
    while True:
        await asyncio.sleep(every_s)
        try:
            if await services.db.run(services.profiles.refresh):
                logger.info("profiles changed elsewhere; reloaded %d", len(services.profiles.list()))
        except Exception:  # a transient backend error must not end the loop
            logger.exception("profile refresh failed")


async def startup(app: FastAPI, services: Services) -> None:
    for stored in services.profiles.list():  # their SVDs, computed off the owner thread before first use
        services.decomposer.prepare_profile(stored.name, stored.interventions)
    every = services.settings.profile_refresh_s
    if every > 0:
        app.state.profile_refresher = asyncio.create_task(_refresh_profiles(services, every))


async def shutdown(app: FastAPI) -> None:
    task: asyncio.Task[None] | None = getattr(app.state, "profile_refresher", None)
    if task is not None:
        task.cancel()
