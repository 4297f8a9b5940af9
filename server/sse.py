"""Server-Sent Events on the wire, through sse-starlette: every stream the server sends is framed here.

One framing for every route: ``data: <json>\\n\\n`` per event (with an ``event: <type>`` line first when the
event is typed, as job progress is), lines ended by ``\\n`` as OpenAI's API and its SDKs expect, and
``data: [DONE]`` where the protocol closes with it (OpenAI's streams and the native generate stream).
Long-lived streams (job progress) get ``: keep-alive`` comments so proxies keep them open; token streams get
none, so their wire format stays exactly OpenAI's. A client that disconnects cancels the producing generator
(sse-starlette watches the connection), which cancels its request on the engine.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

#: The data of the last event of an OpenAI-style stream.
DONE = "[DONE]"
#: Seconds between ``: keep-alive`` comments on long-lived streams.
KEEPALIVE_S = 15.0
_SEP = "\n"

Event = str | dict[str, Any]
"""What a producer yields: the data of an untyped event, or ``{"event": type, "data": data}``."""


def data(payload: BaseModel | Mapping[str, Any], *, exclude_none: bool = False) -> str:
    """One event's data: the payload as compact JSON (one line, so one ``data:`` field)."""
    if isinstance(payload, BaseModel):
        return payload.model_dump_json(exclude_none=exclude_none)
    return json.dumps(payload, separators=(",", ":"))


def typed(event: str, payload: BaseModel) -> dict[str, Any]:
    """An event with an ``event:`` line (what ``EventSource.addEventListener(type)`` listens to)."""
    return {"event": event, "data": payload.model_dump_json()}


def _keepalive() -> ServerSentEvent:
    return ServerSentEvent(comment="keep-alive", sep=_SEP)


def event_stream(events: AsyncIterator[Event], *, headers: Mapping[str, str] | None = None,
                 keepalive_s: float | None = None) -> EventSourceResponse:
    """The response for ``events``; with ``keepalive_s`` (long-lived streams: :data:`KEEPALIVE_S`) a
    ``: keep-alive`` comment goes out every that many seconds, without it nothing but the events."""
    return EventSourceResponse(events, headers={"Cache-Control": "no-cache", **(headers or {})}, sep=_SEP,
                               ping=keepalive_s or 0, ping_message_factory=_keepalive)
