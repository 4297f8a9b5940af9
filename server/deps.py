"""Dependencies as ``Annotated`` aliases, so routes read like plain signatures."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.config import Settings
from server.errors import ApiError
from server.state import Services


def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        error = getattr(request.app.state, "startup_error", None)
        raise ApiError(503, f"model failed to load: {error}" if error else "model is still loading",
                       headers={"Retry-After": "5"})
    return services


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
