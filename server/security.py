"""Optional bearer keys: an admin key for mutations, an inference key for generate/score/completions.

With no keys configured everything is open (local research use). The admin key also passes
inference routes. Comparison is constant-time. 401: no key or an unknown key; 403: a valid key
without the needed scope (the inference key on an admin route).
"""

from __future__ import annotations

import secrets
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.config import Settings
from server.errors import ApiError

Scope = Literal["admin", "inference"]
_bearer = HTTPBearer(auto_error=False, description="API key as 'Authorization: Bearer <key>'.")


def _matches(given: str, expected: str | None) -> bool:
    return expected is not None and secrets.compare_digest(given.encode(), expected.encode())


def check_key(settings: Settings, scope: Scope, token: str | None) -> None:
    admin = settings.admin_api_key.get_secret_value() if settings.admin_api_key else None
    infer = settings.api_key.get_secret_value() if settings.api_key else None
    needed = admin if scope == "admin" else infer
    if scope == "inference" and infer is None and admin is None:
        return
    if scope == "admin" and admin is None:
        return
    if token is None:
        raise ApiError(401, f"missing API key: send 'Authorization: Bearer <{scope} key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    if _matches(token, admin) or (scope == "inference" and _matches(token, needed)):
        return
    if scope == "admin" and _matches(token, infer):
        raise ApiError(403, "this key may run inference but not change state; use the admin key")
    raise ApiError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})


def _token(creds: HTTPAuthorizationCredentials | None) -> str | None:
    return creds.credentials if creds is not None else None


def require_admin(request: Request,
                  creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    check_key(request.app.state.settings, "admin", _token(creds))


def require_inference(request: Request,
                      creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    check_key(request.app.state.settings, "inference", _token(creds))


AdminAuth = Depends(require_admin)
InferenceAuth = Depends(require_inference)
