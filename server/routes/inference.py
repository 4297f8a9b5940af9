"""Routes: native inference per profile (generate, score) and the A/B compare endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sse_starlette import EventSourceResponse

from server.deps import ServicesDep
from laser_protocol.inference import (
    PROFILE_HEADER,
    CompareRequest,
    CompareResponse,
    GenerateRequest,
    GenerateResponse,
    GenerateStreamEvent,
    ScoreRequest,
    ScoreResponse,
    StreamError,
)
from server import sse
from server.openapi import sse_event
from server.routing import ApiRoute
from server.security import InferenceAuth
from server.serving import inference as serving

router = APIRouter(prefix="/v1", tags=["inference"], dependencies=[InferenceAuth], route_class=ApiRoute)

_ERRORS = {
    404: {"description": "Unknown profile."},
    413: {"description": "Prompt longer than max_prompt_tokens (or body over max_body_bytes)."},
    422: {"description": "Invalid request (or prompt + max_new_tokens over the model's context); the error names "
                         "the field."},
    429: {"description": "Queue full (max_queue requests); retry after the Retry-After header's seconds.",
          "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}},
}
_EVENT_SCHEMA = GenerateStreamEvent.model_json_schema(ref_template="#/components/schemas/{model}")
_EVENT_SCHEMA.pop("$defs", None)  # GenerateUsage is already a component (GenerateResponse uses it)
_STREAM = {"text/event-stream": {"schema": sse_event(_EVENT_SCHEMA, StreamError.model_json_schema(), done=True),
                                 "description": "With stream=true: 'data: {GenerateStreamEvent}' per delta, "
                                                "then 'data: [DONE]'."}}


@router.post("/generate", response_model=GenerateResponse, responses={200: {
    "description": "The generations (GenerateResponse). With stream=true, Server-Sent Events instead: "
                   "'data: {GenerateStreamEvent}' per text delta (the last with finish_reason and usage), then "
                   "'data: [DONE]'; a failure mid-stream sends 'data: {StreamError}' before [DONE].",
    "content": _STREAM}, **_ERRORS})
async def generate(body: GenerateRequest, request: Request, response: Response,
                   services: ServicesDep) -> GenerateResponse | EventSourceResponse:
    """Generate from one or several prompts with a profile; stream=true answers Server-Sent Events."""
    if body.stream:
        events, stamp = await serving.generate_stream(services, request, body)
        return sse.event_stream(events, headers={PROFILE_HEADER: stamp})
    answer, response.headers[PROFILE_HEADER] = await serving.generate(services, request, body)
    return answer


@router.post("/score", response_model=ScoreResponse, responses=_ERRORS)
async def score(body: ScoreRequest, request: Request, response: Response, services: ServicesDep) -> ScoreResponse:
    """Log-prob of each continuation given a context (with argmax), or the perplexity of a text."""
    answer, response.headers[PROFILE_HEADER] = await serving.score(services, request, body)
    return answer


@router.post("/compare", response_model=CompareResponse, responses=_ERRORS)
async def compare(body: CompareRequest, request: Request, response: Response,
                  services: ServicesDep) -> CompareResponse:
    """Run one generate or score request on several profiles and answer side by side with a diff."""
    answer, response.headers[PROFILE_HEADER] = await serving.compare(services, request, body)
    return answer
