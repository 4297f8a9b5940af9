"""Optional bearer keys: an admin key for mutations, an inference key for generate/score/completions.

A scope whose key is unset is open: with no keys everything is open (local research use), and with only the
admin key set, inference stays open. The admin key also passes inference routes. Comparison is constant-time.
401: no key or an unknown key; 403: a valid key without the needed scope (the inference key on an admin route).

Routes declare their scope with the ``AdminAuth`` / ``InferenceAuth`` dependency; :class:`server.routing.ApiRoute`
reads that declaration to authenticate *before* the body is read, and :mod:`server.openapi` to declare the
security scheme only where a key is actually required.
"""

from __future__ import annotations

import secrets
from typing import Literal

from fastapi import Depends, Request
from fastapi.routing import APIRoute

from server.config import Settings
from server.errors import ApiError

Scope = Literal["admin", "inference"]


def _matches(given: str, expected: str | None) -> bool:
    return expected is not None and secrets.compare_digest(given.encode(), expected.encode())


def _secret(value: object) -> str | None:
    return value.get_secret_value() if value is not None else None  # type: ignore[attr-defined]


def key_required(settings: Settings, scope: Scope) -> bool:
    """Whether ``scope`` needs a key under these settings (an unset key leaves its scope open)."""
    return (settings.admin_api_key if scope == "admin" else settings.api_key) is not None


def check_key(settings: Settings, scope: Scope, token: str | None) -> None:
    if not key_required(settings, scope):
        return
    admin, infer = _secret(settings.admin_api_key), _secret(settings.api_key)
    if token is None:
        raise ApiError(401, f"missing API key: send 'Authorization: Bearer <{scope} key>'", ("header", "Authorization"),
                       headers={"WWW-Authenticate": "Bearer"})
    if _matches(token, admin) or (scope == "inference" and _matches(token, infer)):
        return
    if scope == "admin" and _matches(token, infer):
        raise ApiError(403, "this key may run inference but not change state; use the admin key",
                       ("header", "Authorization"))
    raise ApiError(401, "invalid API key", ("header", "Authorization"), headers={"WWW-Authenticate": "Bearer"})


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def authenticate(request: Request, scope: Scope) -> None:
    check_key(request.app.state.settings, scope, bearer_token(request))


def require_admin(request: Request) -> None:
    authenticate(request, "admin")


def require_inference(request: Request) -> None:
    authenticate(request, "inference")


AdminAuth = Depends(require_admin)
InferenceAuth = Depends(require_inference)
_SCOPES: dict[object, Scope] = {require_admin: "admin", require_inference: "inference"}


def route_scope(route: APIRoute) -> Scope | None:
    """The key scope a route declares (router-level dependencies included); admin wins over inference."""
    scopes = {_SCOPES.get(d.dependency) for d in route.dependencies} - {None}
    return "admin" if "admin" in scopes else ("inference" if scopes else None)
