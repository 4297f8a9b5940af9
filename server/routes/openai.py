"""Routes: the OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions) and the tokenizer
routes lm-evaluation-harness's remote tokenizer uses (/tokenizer_info, /tokenize, /detokenize).

All need the inference key. Every failure on these routes answers in OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}`` (a route class translates exceptions, so the native
routes keep FastAPI's ``{"detail": ...}``); request validation errors are 400 as in OpenAI.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from laser_ops.interventions import InterventionError
from server.deps import ServicesDep
from server.engine import EngineOverloaded, EngineStopped, RequestCancelled, UnknownProfile
from server.errors import ApiError, printable
from laser_protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from laser_protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from server import sse
from server.openapi import sse_event
from server.routing import ApiRoute
from laser_protocol.inference import PROFILE_HEADER
from server.security import InferenceAuth
from server.serving.openai import chat as chat_serving
from server.serving.openai import completions as completions_serving
from server.serving.openai import models as models_serving
from server.serving.openai import tokenize as tokenize_serving

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          499: "request_cancelled", 503: "service_unavailable_error"}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": printable(message),
                      "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                      "param": None if param is None else printable(param), "code": code}}
    return JSONResponse(body, status, headers=headers)


def _param(loc: Any) -> str | None:
    parts = [str(p) for p in (loc or ())]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or None


def _validation(errors: list[dict[str, Any]]) -> JSONResponse:
    if errors and errors[0].get("type") == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", "")
        return openai_error(400, f"request body is not valid JSON: {detail}".rstrip(": "))
    shown = [f"{_param(e.get('loc')) or 'body'}: {str(e.get('msg')).removeprefix('Value error, ')}"
             for e in errors[:3]]
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return openai_error(400, "; ".join(shown) + more, _param(errors[0].get("loc")) if errors else None)


def error_response(exc: Exception) -> JSONResponse:
    """Any exception -> OpenAI's error body with the matching status."""
    if isinstance(exc, RequestValidationError):
        return _validation(list(exc.errors()))
    if isinstance(exc, ValidationError):
        return _validation(exc.errors(include_url=False))
    if isinstance(exc, ApiError):
        status = 400 if exc.status == 422 else exc.status
        code = getattr(exc, "code", None)
        if code is None and exc.status == 401:
            code = "invalid_api_key"
        if exc.status == 413:  # a prompt over max_prompt_tokens: OpenAI's (and vLLM's) answer
            status, code = 400, "context_length_exceeded"
        return openai_error(status, exc.message, _param(exc.loc), code, exc.headers)
    if isinstance(exc, UnknownProfile):
        return openai_error(404, f"The model {exc.args[0]!r} does not exist (deleted?)", "model", "model_not_found")
    if isinstance(exc, InterventionError):
        return openai_error(400, f"the profile cannot be applied to this model: {exc}", "model")
    if isinstance(exc, EngineOverloaded):
        return openai_error(429, str(exc), code="rate_limit_exceeded",
                            headers={"Retry-After": str(int(exc.retry_after))})
    if isinstance(exc, EngineStopped):
        return openai_error(503, str(exc))
    if isinstance(exc, RequestCancelled):
        return openai_error(499, str(exc))
    if isinstance(exc, HTTPException):
        return openai_error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
    logger.exception("OpenAI route failed")
    return openai_error(500, f"internal error ({type(exc).__name__})")


class OpenAIRoute(ApiRoute):
    """Turns every exception raised by the route (authentication and dependencies included) into OpenAI's error
    body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - mapped to an HTTP answer
                return error_response(exc)

        return guarded


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (validation errors are 400 as in OpenAI's API; "
                                                 "an over-long prompt has code context_length_exceeded)."},
    404: {"model": ErrorResponse, "description": "Unknown model (code model_not_found)."},
    429: {"model": ErrorResponse, "description": "Queue full; retry after the Retry-After header's seconds.",
          "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}},
}


def _sse_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema for a text/event-stream response: models that are already OpenAPI components
    stay references; the others (stream-only models) are inlined."""
    schema = model.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.pop("$defs", {})
    components = {"Usage", "ChatChoiceLogprobs", "ChatTokenLogprob", "TopLogprob", "CompletionResponse",
                  "CompletionChoice", "CompletionLogprobs"}

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.removeprefix("#/$defs/")
                if name in components:
                    return {**node, "$ref": f"#/components/schemas/{name}"}
                return resolve(defs[name])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)  # type: ignore[no-any-return]


_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_COMPLETION_STREAM = {200: {
    "description": "The completion (CompletionResponse). With stream: true, Server-Sent Events instead: "
                   "'data: {CompletionResponse}' per chunk (one choice each: echoed prompt, text deltas, each with "
                   "the logprobs of its tokens, then a last chunk with finish_reason), an optional usage chunk, then 'data: [DONE]'; "
                   "a failure mid-stream sends 'data: {ErrorResponse}' before [DONE].",
    "content": {"text/event-stream": {"schema": sse_event({"$ref": "#/components/schemas/CompletionResponse"},
                                                          _ERROR_REF, done=True)}}}}
_CHAT_STREAM = {200: {
    "description": "The chat completion (ChatCompletionResponse). With stream: true, Server-Sent Events "
                   "instead: 'data: {ChatCompletionChunk}' per chunk (per choice a role chunk, content deltas, each "
                   "with the logprobs of its tokens, then a last chunk with finish_reason), an optional usage chunk, then "
                   "'data: [DONE]'; a failure mid-stream sends 'data: {ErrorResponse}' before [DONE].",
    "content": {"text/event-stream": {"schema": sse_event(_sse_schema(ChatCompletionChunk), _ERROR_REF,
                                                          done=True)}}}}

router = APIRouter(tags=["openai"], route_class=OpenAIRoute, dependencies=[InferenceAuth], responses=_ERRORS)


def _answer(answer: tuple[BaseModel | AsyncIterator[sse.Event], str], response: Response) -> Response | BaseModel:
    result, stamp = answer
    if isinstance(result, BaseModel):
        response.headers[PROFILE_HEADER] = stamp
        return result
    return sse.event_stream(result, headers={PROFILE_HEADER: stamp})


@router.get("/v1/models", response_model=ModelList)
def list_models(services: ServicesDep) -> ModelList:
    """List `base` and every profile (profiles have `parent: "base"`)."""
    return models_serving.list_models(services)


@router.get("/v1/models/{model}", response_model=ModelCard)
def get_model(model: str, services: ServicesDep) -> ModelCard:
    """One model card: `base` or a profile."""
    return models_serving.get_model(services, model)


@router.post("/v1/completions", response_model=CompletionResponse, responses=_COMPLETION_STREAM)
async def completions(body: CompletionRequest, request: Request, response: Response, services: ServicesDep) -> Any:
    """Text completion with the profile named by `model`; echo + logprobs score prompts (lm-eval)."""
    return _answer(await completions_serving.create_completion(services, request, body), response)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_CHAT_STREAM)
async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response,
                           services: ServicesDep) -> Any:
    """Chat completion through the model's chat template, with the profile named by `model`."""
    return _answer(await chat_serving.create_chat_completion(services, request, body), response)


@router.get("/tokenizer_info", response_model=TokenizerInfo)
def tokenizer_info(services: ServicesDep) -> TokenizerInfo:
    """Special tokens, chat template and context length (lm-eval's remote tokenizer reads this)."""
    return tokenize_serving.tokenizer_info(services)


@router.post("/tokenize", response_model=TokenizeResponse)
def tokenize(body: TokenizeRequest, request: Request, services: ServicesDep) -> TokenizeResponse:
    """Token ids of a text (as /v1/completions sees it) or of a chat (as /v1/chat/completions sees it)."""
    return tokenize_serving.tokenize(services, request, body)


@router.post("/detokenize", response_model=DetokenizeResponse)
def detokenize(body: DetokenizeRequest, request: Request, services: ServicesDep) -> DetokenizeResponse:
    """Text of token ids."""
    return tokenize_serving.detokenize(services, request, body)
