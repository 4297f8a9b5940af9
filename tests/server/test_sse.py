"""server.sse: the one SSE framing (sse-starlette) every stream uses, byte for byte, and keep-alive comments.

Streams are read from a real uvicorn server (the test client would buffer the whole answer); the producer and the
reader are ordered by events, never by timing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from server import sse
from tests.server.conftest import LiveServer


class Delta(BaseModel):
    text: str
    note: str | None = None


Producer = Callable[[], AsyncIterator[sse.Event]]


class StreamApp:
    """One route that streams whatever producer the test installs."""

    def __init__(self) -> None:
        self.producer: Producer | None = None
        self.keepalive_s: float | None = None
        self.app = FastAPI()

        @self.app.get("/stream")
        async def stream():  # noqa: ANN202 - the response object is the point
            assert self.producer is not None
            return sse.event_stream(self.producer(), headers={"X-Extra": "1"}, keepalive_s=self.keepalive_s)


@pytest.fixture(scope="module")
def streams() -> Iterator[tuple[StreamApp, LiveServer]]:
    s = StreamApp()
    live = LiveServer.start(s.app)
    yield s, live
    live.stop()


def test_openai_framing_byte_for_byte(streams: tuple[StreamApp, LiveServer]) -> None:
    """``data: <compact json>\\n\\n`` per event, then ``data: [DONE]\\n\\n``: OpenAI's wire format, LF only."""
    s, live = streams

    async def events() -> AsyncIterator[sse.Event]:
        yield sse.data(Delta(text="a b"), exclude_none=True)
        yield sse.data({"error": {"message": "x", "code": None}})
        yield sse.DONE

    s.producer, s.keepalive_s = events, None
    r = live.client.get("/stream")
    assert r.content == (b'data: {"text":"a b"}\n\n'
                         b'data: {"error":{"message":"x","code":null}}\n\n'
                         b"data: [DONE]\n\n")
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    assert r.headers["x-extra"] == "1"


def test_typed_events_carry_an_event_line(streams: tuple[StreamApp, LiveServer]) -> None:
    s, live = streams

    async def events() -> AsyncIterator[sse.Event]:
        yield sse.typed("progress", Delta(text="1"))
        yield sse.typed("state", Delta(text="2", note="done"))

    s.producer, s.keepalive_s = events, None
    assert live.client.get("/stream").content == (b'event: progress\ndata: {"text":"1","note":null}\n\n'
                                                  b'event: state\ndata: {"text":"2","note":"done"}\n\n')


def test_keepalive_comments_fill_a_quiet_stream(streams: tuple[StreamApp, LiveServer]) -> None:
    """While the producer waits, ``: keep-alive`` comments flow; the producer resumes once the client read one."""
    s, live = streams
    seen_comment = threading.Event()

    async def events() -> AsyncIterator[sse.Event]:
        yield sse.data(Delta(text="first"))
        await asyncio.to_thread(seen_comment.wait, 60)
        yield sse.data(Delta(text="after"))

    s.producer, s.keepalive_s = events, 0.01
    lines = []
    with live.client.stream("GET", "/stream") as r:
        for line in r.iter_lines():
            lines.append(line)
            if line == ": keep-alive":
                seen_comment.set()
    assert seen_comment.is_set()  # "after" was produced only once a comment had reached the client
    assert lines.index('data: {"text":"first","note":null}') < lines.index('data: {"text":"after","note":null}')
    assert set(lines) <= {"", ": keep-alive", 'data: {"text":"first","note":null}', 'data: {"text":"after","note":null}'}


def test_token_streams_send_no_keepalive(streams: tuple[StreamApp, LiveServer]) -> None:
    """Without keep-alive (token streams) only events go on the wire, however long the producer waits."""
    s, live = streams
    release = threading.Event()

    async def events() -> AsyncIterator[sse.Event]:
        yield sse.data(Delta(text="first"), exclude_none=True)
        await asyncio.to_thread(release.wait, 60)
        yield sse.DONE

    assert sse.event_stream(events(), keepalive_s=None).ping_interval == 0  # no ping task at all
    s.producer, s.keepalive_s = events, None
    with live.client.stream("GET", "/stream") as r:
        chunks = r.iter_raw()
        first = next(chunks)
        release.set()
        body = first + b"".join(chunks)
    assert body == b'data: {"text":"first"}\n\ndata: [DONE]\n\n'
