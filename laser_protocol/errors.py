"""Error bodies of the native routes: one shape, ``{"detail": [{"loc", "msg", "type"}, ...]}``, for every status.

``loc`` is FastAPI's location of the offending value (``["body", "prompt"]``, ``["path", "name"]``; empty for
errors that concern no field, such as 429); ``type`` is machine-readable (``value_error``, ``json_invalid``,
``not_found``, ``overloaded``, ...). Validation errors may add ``input`` (the refused value, when it is small
and JSON can carry it) and ``ctx`` (the violated bound). The OpenAI routes answer OpenAI's own error shape
(:mod:`laser_protocol.openai`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(..., description="Where the problem is: 'body', 'path', 'query' or 'header', then "
                                                  "the field path; empty when no field is at fault.")
    msg: str = Field(..., description="What is wrong and what is allowed.")
    type: str = Field(..., description="Machine-readable kind: value_error, json_invalid, missing, not_found, "
                                       "conflict, unauthorized, forbidden, too_large, overloaded, unavailable, ...")
    input: Any = Field(None, description="The refused value (validation errors; left out when large or not "
                                         "representable in JSON).")
    ctx: dict[str, Any] | None = Field(None, description="The violated constraint, e.g. {'le': 1.0}.")


class ErrorBody(BaseModel):
    """Every error answer of the native routes."""

    detail: list[ErrorItem] = Field(..., description="One entry per problem.")


#: Default ``type`` of an error by HTTP status.
ERROR_TYPES: dict[int, str] = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "too_large", 422: "value_error", 429: "overloaded", 499: "cancelled",
    500: "internal_error", 503: "unavailable",
}
