"""Routes: background validation-sweep jobs (admin key to start, cancel or promote; inference key to read)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from sse_starlette import EventSourceResponse

from server import sse
from server.deps import ServicesDep
from server.openapi import link, sse_event
from laser_protocol.jobs import (
    ExampleFilter,
    ExamplePage,
    ExampleSplit,
    JobDeleted,
    JobList,
    JobProgress,
    JobPublic,
    JobState,
    PromoteRequest,
    SweepJobCreate,
)
from laser_protocol.profiles import ProfilePublic
from server.routing import ApiRoute
from server.security import AdminAuth, InferenceAuth
from server.serving.jobs import results
from server.serving.jobs import service as serving

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=ApiRoute)

JobPath = Annotated[str, Path(max_length=64, description="Job id.")]
_NOT_FOUND = {404: {"description": "Unknown job."}}


def _job_links(at: str) -> dict[str, object]:
    """From a job (``at``: the JSON pointer of its id in the response) to every route about it."""
    job = {"job_id": f"$response.body#{at}"}
    return {"GetJob": link("get_job", "Read the job.", parameters=job),
            "JobEvents": link("job_events", "Follow the job's progress.", parameters=job),
            "Plot": link("plot", "Heatmap of the job's validation accuracy.", parameters=job),
            "Promote": link("promote", "Store the job's winner as a profile.", parameters=job),
            "CancelJob": link("cancel_job", "Cancel the job.", parameters=job),
            "DeleteJob": link("delete_job", "Delete the (finished) job.", parameters=job)}
_EVENT_SCHEMA = JobProgress.model_json_schema(ref_template="#/components/schemas/{model}")
_EVENT_SCHEMA.pop("$defs", None)


@router.post("/sweeps", status_code=202, response_model=JobPublic, dependencies=[AdminAuth],
             responses={202: {"links": _job_links("/id")},
                        404: {"description": "Unknown dataset."},
                        422: {"description": "Invalid grid or config; the error names the field and the allowed "
                                             "range."}})
async def create_sweep(body: SweepJobCreate, services: ServicesDep) -> JobPublic:
    """Queue a validation sweep over (type, layer, rho); answers 202 with the job."""
    return await serving.create_sweep(services, body)


@router.get("", response_model=JobList, dependencies=[InferenceAuth],
            responses={200: {"links": _job_links("/data/0/id")}})
async def list_jobs(services: ServicesDep, state: Annotated[JobState | None, Query()] = None) -> JobList:
    """List jobs, newest first (optionally one state)."""
    return await serving.list_jobs(services, state)


@router.get("/{job_id}", response_model=JobPublic, dependencies=[InferenceAuth],
            responses={200: {"links": _job_links("/id")}, **_NOT_FOUND})
async def get_job(job_id: JobPath, services: ServicesDep) -> JobPublic:
    """A job: state, done/total, ETA, best so far, the per-config table and the test report."""
    return await serving.get_job(services, job_id)


@router.get("/{job_id}/events", dependencies=[InferenceAuth], response_class=Response,
            responses={200: {"description": "Server-Sent Events 'event: progress|state' + 'data: {JobProgress}': "
                                            "a snapshot first, 'progress' per finished step, 'state' per state "
                                            "change; the stream closes after the terminal state (': keep-alive' "
                                            "comments in between).",
                             "content": {"text/event-stream": {"schema": sse_event(_EVENT_SCHEMA, done=False)}}}, **_NOT_FOUND})
async def job_events(job_id: JobPath, services: ServicesDep) -> EventSourceResponse:
    """Server-Sent Events: 'progress' per finished step, then a 'state' event when the job ends."""
    return sse.event_stream(await serving.events(services, job_id), keepalive_s=sse.KEEPALIVE_S)


@router.post("/{job_id}/cancel", response_model=JobPublic, dependencies=[AdminAuth],
             responses={409: {"description": "Already finished."}, **_NOT_FOUND})
async def cancel_job(job_id: JobPath, services: ServicesDep) -> JobPublic:
    """Cancel a queued or running job, whichever server runs it (between steps; finished rows are kept and the best so far is promotable)."""
    return await serving.cancel_job(services, job_id)


@router.delete("/{job_id}", response_model=JobDeleted, dependencies=[AdminAuth],
               responses={409: {"description": "Still queued or running: cancel it first."}, **_NOT_FOUND})
async def delete_job(job_id: JobPath, services: ServicesDep) -> JobDeleted:
    """Delete a finished (succeeded, failed or cancelled) job and its rows."""
    return await serving.delete_job(services, job_id)


@router.post("/{job_id}/promote", status_code=201, response_model=ProfilePublic, dependencies=[AdminAuth],
             responses={201: {"links": {"GetProfile": link("get_profile", "Read the new profile.",
                                                           parameters={"name": "$response.body#/name"})}},
                        409: {"description": "No winner, job not finished, or the profile name exists."},
                        **_NOT_FOUND})
async def promote(job_id: JobPath, body: PromoteRequest, request: Request, services: ServicesDep) -> ProfilePublic:
    """Store the job's best config as a profile, servable at once."""
    profile = await results.promote(services, job_id, body)
    request.state.profile = profile.name
    return profile


@router.get("/{job_id}/examples", response_model=ExamplePage, dependencies=[InferenceAuth],
            responses={409: {"description": "No base or test report yet, or the dataset is gone."}, **_NOT_FOUND})
async def job_examples(
    job_id: JobPath,
    services: ServicesDep,
    config: Annotated[str, Query(min_length=1, max_length=512, description="Config key (or 'base').")],
    split: Annotated[ExampleSplit, Query(description="validation (every config) or test (base and the winner).")]
    = "validation",
    filter: Annotated[ExampleFilter, Query(description="flips: examples the config fixed or broke relative to "
                                                       "base; fixed; broken; disagree: different answers; all.")]
    = "flips",
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="Skip this many matching examples.")] = 0,
    limit: Annotated[int, Query(ge=1, le=500, description="Page size.")] = 50,
) -> ExamplePage:
    """Per-example evidence of a config against base: prompt, gold, both answers, what it fixed and broke."""
    return await results.examples(services, job_id, config, split, filter, offset, limit)


@router.get("/{job_id}/plot.png", dependencies=[InferenceAuth], response_class=Response,
            responses={200: {"description": "PNG heatmap of the change in validation accuracy versus base, in "
                                            "points (layer x rho, one panel per type; collapsed configs hatched, "
                                            "best framed).",
                             "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                       409: {"description": "Nothing to plot yet."},
                       **_NOT_FOUND})
async def plot(job_id: JobPath, services: ServicesDep) -> Response:
    """Heatmap of the change in validation accuracy versus base over layer x rho per type (the paper's Figure 2)."""
    return Response(await results.plot_png(services, job_id), media_type="image/png")
