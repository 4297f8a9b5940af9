"""The OpenAPI document as this server really behaves, built once from its routes and settings.

Routes document what is specific to them (their answers, their 404s and 409s, links between operations). This
module adds what follows from the settings and from how every route reads a request:

- a bearer security requirement exactly on the operations whose scope has a key configured (none when no key
  is set), with the 401 (and 403 for admin routes, when an inference key exists) that comes with it;
- 400 (body not JSON) and 413 (body over ``max_body_bytes``) on every operation that takes a body, 422 where
  anything is validated, 503 (model still loading) on every operation that needs the model;
- one error schema per family: :class:`ErrorBody` on native routes, OpenAI's :class:`ErrorResponse` on theirs;
- the server's limits (``max_new_tokens``) as maxima of the fields they bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from server.config import Settings
from server.deps import get_services
from laser_protocol.errors import ErrorBody
from laser_protocol.openai import ErrorResponse
from server.security import Scope, key_required, route_scope
from server.serving.openai.common import vocab_size

_SCHEMES = {
    "AdminKey": {"type": "http", "scheme": "bearer",
                 "description": "The admin key (LASER_ADMIN_API_KEY): every mutation; it also passes inference."},
    "InferenceKey": {"type": "http", "scheme": "bearer",
                     "description": "The inference key (LASER_API_KEY): generate, score, completions, reads."},
}
_GENERIC = {
    400: "The body is not JSON (syntax, not UTF-8, or nested too deeply).",
    401: "Missing or invalid API key.",
    403: "This key may run inference but not change state; use the admin key.",
    413: "Body over max_body_bytes (or a prompt over max_prompt_tokens).",
    422: "Invalid request; the error names the field and the allowed range.",
    503: "The model is still loading (or failed to load); retry after Retry-After.",
}
#: Request fields bounded by a setting: (schema name, field) -> setting.
_SETTING_MAXIMA = {("GenerateParams", "max_new_tokens"): "max_new_tokens",
                   ("GenerateRequest", "max_new_tokens"): "max_new_tokens",
                   ("CompletionRequest", "max_tokens"): "max_new_tokens",
                   ("ChatCompletionRequest", "max_tokens"): "max_new_tokens",
                   ("ChatCompletionRequest", "max_completion_tokens"): "max_new_tokens"}


#: Request fields holding token ids: bounded by the loaded model's vocabulary.
_TOKEN_ID_FIELDS = (("CompletionRequest", "prompt"), ("DetokenizeRequest", "tokens"))


def _uses(dependant: Dependant, fn: Callable[..., Any]) -> bool:
    return any(d.call is fn or _uses(d, fn) for d in dependant.dependencies)


def _security(scope: Scope | None, settings: Settings) -> list[dict[str, list[str]]] | None:
    if scope is None or not key_required(settings, scope):
        return None
    if scope == "admin":
        return [{"AdminKey": []}]
    return [{"InferenceKey": []}, {"AdminKey": []}]


def _error_content(openai: bool) -> dict[str, Any]:
    name = ErrorResponse.__name__ if openai else ErrorBody.__name__
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def _document_route(op: dict[str, Any], route: APIRoute, settings: Settings) -> set[str]:
    """Complete one operation; returns the security schemes it uses."""
    openai = "openai" in (route.tags or [])
    responses: dict[str, Any] = op.setdefault("responses", {})
    codes: set[int] = set()
    if "requestBody" in op:
        codes |= {400, 413, 422}
    if op.get("parameters"):
        codes.add(422)
    if _uses(route.dependant, get_services):
        codes.add(503)
    scope = route_scope(route)
    security = _security(scope, settings)
    if security is not None:
        op["security"] = security
        codes.add(401)
        if scope == "admin" and settings.api_key is not None:
            codes.add(403)
    for code in codes:
        responses.setdefault(str(code), {"description": _GENERIC[code]})
    for code, response in responses.items():
        if code.isdigit() and int(code) >= 400:
            content = response.get("content")
            if not content or "HTTPValidationError" in str(content):
                response["content"] = _error_content(openai)
    return {name for requirement in security or [] for name in requirement}


def _properties(components: dict[str, Any], model: str, field: str) -> list[dict[str, Any]]:
    return [p for name in (model, f"{model}-Input")
            if (p := components.get(name, {}).get("properties", {}).get(field)) is not None]


def _integers(node: Any) -> list[dict[str, Any]]:
    """Every integer schema inside ``node`` (through anyOf branches and array items)."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "integer":
        return [node]
    return [i for child in [*node.get("anyOf", []), node.get("items")] for i in _integers(child)]


def _apply_limits(schema: dict[str, Any], settings: Settings, vocab: int | None) -> None:
    components = schema.get("components", {}).get("schemas", {})
    for (model, field), setting in _SETTING_MAXIMA.items():
        for prop in _properties(components, model, field):
            for integer in _integers(prop):
                integer["maximum"] = getattr(settings, setting)
    if vocab:
        for model, field in _TOKEN_ID_FIELDS:
            for prop in _properties(components, model, field):
                for integer in _integers(prop):
                    integer.update(minimum=0, maximum=vocab - 1)


def build_openapi(app: FastAPI, settings: Settings, vocab: int | None = None) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, description=app.description,
                         routes=app.routes)
    used: set[str] = set()
    for route in app.state.api_routes:  # the routers' own routes (app.routes holds the included routers)
        if not route.include_in_schema:
            continue
        ops = schema["paths"].get(route.path_format, {})
        for method in route.methods:
            op = ops.get(method.lower())
            if op is not None:
                used |= _document_route(op, route, settings)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas[ErrorBody.__name__] = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schemas[ErrorBody.__name__].pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    if used:
        components["securitySchemes"] = {name: scheme for name, scheme in _SCHEMES.items() if name in used}
    _apply_limits(schema, settings, vocab)
    return schema


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve :func:`build_openapi` (computed on first use, then cached) as the app's schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        services = getattr(app.state, "services", None)
        schema = build_openapi(app, settings, vocab_size(services) if services is not None else None)
        if services is not None:  # complete only once the model is loaded: cache it then
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def link(operation: str, description: str, *, parameters: dict[str, str] | None = None,
         body: dict[str, Any] | None = None) -> dict[str, Any]:
    """An OpenAPI link to ``operation`` (an operationId: the route function's name), filling its path
    ``parameters`` and/or its request ``body`` from this response (``$response.body#/...`` expressions)."""
    out: dict[str, Any] = {"operationId": operation, "description": description}
    if parameters:
        out["parameters"] = parameters
    if body:
        out["requestBody"] = body
    return out


def sse_event(*payloads: dict[str, Any], done: bool) -> dict[str, Any]:
    """Schema of one Server-Sent Event whose ``data`` is JSON matching one of ``payloads`` (and, with ``done``,
    the closing ``data: [DONE]``): the event object ``{event, data, id}``, as OpenAPI 3.2's ``itemSchema`` (and a
    3.1 ``schema`` of an event stream) describes each event."""
    json_data = {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": payloads[0] if len(payloads) == 1 else {"anyOf": list(payloads)}}
    data = {"anyOf": [{"const": "[DONE]"}, json_data]} if done else json_data
    return {"type": "object", "required": ["data"],
            "properties": {"event": {"type": "string"}, "id": {"type": "string"}, "data": data}}
