"""The asynchronous client (``httpx.AsyncClient``): the same endpoints as :class:`~clients.sync.LaserClient`, each
returning an awaitable of its result::

    async with AsyncLaserClient() as c:
        print((await c.generate("Paris is")).text)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import httpx
from httpx_sse import EventSource
from tenacity import AsyncRetrying

from clients.core import DEFAULT_TIMEOUT, UNSET, Call, T, generate_event
from clients.endpoints import Endpoints
from clients.errors import LaserConnectionError, LaserTimeoutError, error_from_response
from clients.transfers import FileSink, Waiter, download_plan
from laser_protocol.exports import ExportPublic
from laser_protocol.inference import GenerateStreamEvent
from laser_protocol.jobs import JobProgress, JobPublic


class AsyncLaserClient(Endpoints):
    """Asynchronous client (``httpx.AsyncClient``): every endpoint method returns an awaitable of its result type.

    Use as ``async with AsyncLaserClient() as c: ...`` or call :meth:`aclose`.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, admin_api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT, max_retries: int = 3, backoff: float = 0.5,
                 max_backoff: float = 30.0, headers: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key=api_key, admin_api_key=admin_api_key, timeout=timeout,
                         max_retries=max_retries, backoff=backoff, max_backoff=max_backoff, headers=headers)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout,
                                       transport=transport)
        self._sleep: Callable[[float], Any] = asyncio.sleep

    async def __aenter__(self) -> AsyncLaserClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send_raw(self, call: Call[Any], stream: bool = False) -> httpx.Response:
        async def attempt() -> httpx.Response:
            request = self._request(self._http, call, stream)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.HTTPError as e:
                raise self._transport_error(e, request) from e
            if stream and self._is_failure(call, response):
                await response.aread()
                await response.aclose()
            return response

        response = await AsyncRetrying(sleep=self._sleep, **self._retry_policy(call))(attempt)
        if self._is_failure(call, response):
            raise error_from_response(response)
        return response

    async def _send(self, call: Call[T]) -> T:  # type: ignore[override]
        return self._result(call, await self._send_raw(call))

    @asynccontextmanager
    async def _stream(self, call: Call[Any]) -> AsyncIterator[httpx.Response]:
        response = await self._send_raw(call, stream=True)
        try:
            yield response
        except httpx.HTTPError as e:
            raise self._transport_error(e, response.request) from e
        finally:
            await response.aclose()

    async def generate_stream(self, prompt: str, *, profile: str | None = None, max_new_tokens: int | None = None,
                              temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                              seed: int | None = None, stop: str | Sequence[str] | None = None
                              ) -> AsyncIterator[GenerateStreamEvent]:
        """Async iterator of text deltas (see :meth:`LaserClient.generate_stream`)."""
        call = self._generate_stream_call(prompt, profile, dict(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop))
        async with self._stream(call) as response:
            async for sse in EventSource(response).aiter_sse():
                event = generate_event(sse.data)
                if event is None:
                    return
                yield event

    async def job_events(self, job_id: str, *, timeout: float | httpx.Timeout | None = UNSET
                         ) -> AsyncIterator[JobProgress]:
        async with self._stream(self._events_call(job_id, timeout)) as response:
            async for sse in EventSource(response).aiter_sse():
                yield JobProgress.model_validate_json(sse.data)

    async def wait(self, job_id: str, *, timeout: float | None = None,
                   on_progress: Callable[[JobProgress], Any] | None = None, poll_interval: float = 1.0) -> JobPublic:
        """Follow the job until it ends (see :meth:`LaserClient.wait`)."""
        w = Waiter(timeout, on_progress, poll_interval)
        while True:
            try:
                async for ev in self.job_events(job_id, timeout=w.stream_timeout(self.timeout)):
                    if w.event(ev):
                        return await self.get_job(job_id)  # type: ignore[misc]
            except (LaserConnectionError, LaserTimeoutError):
                w.check(job_id)
                job = await self.get_job(job_id)  # type: ignore[misc]
                if w.snapshot(job):
                    return job
                await self._sleep(min(poll_interval, max(0.0, w.remaining() or poll_interval)))
            w.check(job_id)

    async def download_export(self, name: str, dest: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Download export ``name`` into ``dest`` (see :meth:`LaserClient.download_export`)."""
        export: ExportPublic = await self.get_export(name)  # type: ignore[misc]
        dest = Path(dest)
        for spec, target in download_plan(export, dest, overwrite):
            sink = FileSink(spec, target)
            try:
                async with self._stream(self._file_call(name, spec)) as response:
                    async for chunk in response.aiter_bytes(1 << 20):
                        sink.write(chunk)
                sink.commit()
            except BaseException:
                sink.abort()
                raise
        return dest

    async def export(self, profile: str, dest: str | os.PathLike, *, mode: Literal["dense", "factored"] = "dense",
                     name: str | None = None, overwrite: bool = False, factor_dtype: str | None = None
                     ) -> tuple[ExportPublic, Path]:
        """Export ``profile`` on the server, then download it into ``dest``."""
        export: ExportPublic = await self.export_profile(  # type: ignore[misc]
            profile, mode=mode, name=name, overwrite=overwrite, factor_dtype=factor_dtype)
        return export, await self.download_export(export.name, dest, overwrite=overwrite)
