"""The synchronous client (``httpx.Client``)::

    from clients import LaserClient
    with LaserClient("http://127.0.0.1:8000") as c:          # or LASER_URL
        print(c.generate("The capital of France is", profile="late-fc-in").text)
        for ev in c.generate_stream("Once upon a time"):
            print(ev.text, end="", flush=True)
        job = c.create_sweep("epistemic_reasoning", types=["fc_in"], layers=[-1], rhos=[0.01])
        job = c.wait(job.id, on_progress=lambda p: print(p.done, p.total))

Every endpoint is inherited from :class:`~clients.endpoints.Endpoints`; only what depends on the I/O model is
here: sending with retries, streams (generate deltas, job events), :meth:`LaserClient.wait` and downloads. Errors
raise :mod:`clients.errors` exceptions carrying the server's message and status.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import httpx
from httpx_sse import EventSource, ServerSentEvent
from tenacity import Retrying

from clients.core import DEFAULT_TIMEOUT, UNSET, Call, T, generate_event
from clients.endpoints import Endpoints
from clients.errors import LaserConnectionError, LaserTimeoutError, error_from_response
from clients.transfers import FileSink, Waiter, download_plan
from laser_protocol.exports import ExportPublic
from laser_protocol.inference import GenerateStreamEvent
from laser_protocol.jobs import JobProgress, JobPublic


class LaserClient(Endpoints):
    """Synchronous client (``httpx.Client``). Use as a context manager, or call :meth:`close`."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, admin_api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT, max_retries: int = 3, backoff: float = 0.5,
                 max_backoff: float = 30.0, headers: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key=api_key, admin_api_key=admin_api_key, timeout=timeout,
                         max_retries=max_retries, backoff=backoff, max_backoff=max_backoff, headers=headers)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout,
                                  transport=transport)
        self._sleep: Callable[[float], None] = time.sleep

    def __enter__(self) -> LaserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send_raw(self, call: Call[Any], stream: bool = False) -> httpx.Response:
        """Send with retries (:meth:`~clients.core.ClientBase._retry_policy`); an error answer is read and raised. A
        streamed answer is returned open."""

        def attempt() -> httpx.Response:
            request = self._request(self._http, call, stream)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.HTTPError as e:
                raise self._transport_error(e, request) from e
            if stream and self._is_failure(call, response):
                response.read()  # the body names the error; the connection goes back to the pool
                response.close()
            return response

        response = Retrying(sleep=self._sleep, **self._retry_policy(call))(attempt)
        if self._is_failure(call, response):
            raise error_from_response(response)
        return response

    def _send(self, call: Call[T]) -> T:
        return self._result(call, self._send_raw(call))

    @contextmanager
    def _events(self, call: Call[Any]) -> Iterator[Iterator[ServerSentEvent]]:
        """The answer's Server-Sent Events (httpx-sse); transport failures while reading are typed."""
        response = self._send_raw(call, stream=True)
        try:
            yield EventSource(response).iter_sse()
        except httpx.HTTPError as e:
            raise self._transport_error(e, response.request) from e
        finally:
            response.close()

    def generate_stream(self, prompt: str, *, profile: str | None = None, max_new_tokens: int | None = None,
                        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                        seed: int | None = None, stop: str | Sequence[str] | None = None
                        ) -> Iterator[GenerateStreamEvent]:
        """Generate one prompt as a stream of text deltas; the last event carries finish_reason and usage.

        Closing the iterator early (``break``) closes the connection; the server then cancels the request.
        """
        call = self._generate_stream_call(prompt, profile, dict(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop))
        with self._events(call) as events:
            for sse in events:
                event = generate_event(sse.data)
                if event is None:
                    return
                yield event

    def job_events(self, job_id: str, *, timeout: float | httpx.Timeout | None = UNSET) -> Iterator[JobProgress]:
        """The job's progress events (Server-Sent Events): a snapshot first, one per step, ending at a terminal state."""
        with self._events(self._events_call(job_id, timeout)) as events:
            for sse in events:
                yield JobProgress.model_validate_json(sse.data)

    def wait(self, job_id: str, *, timeout: float | None = None,
             on_progress: Callable[[JobProgress], Any] | None = None, poll_interval: float = 1.0) -> JobPublic:
        """Follow the job's progress until it ends (succeeded, failed or cancelled); the finished job.

        Follows the event stream, calling ``on_progress`` per event; if the stream breaks it polls
        ``get_job`` every ``poll_interval`` seconds and reconnects. Raises
        :class:`~clients.errors.LaserTimeoutError` after ``timeout`` seconds.
        """
        w = Waiter(timeout, on_progress, poll_interval)
        while True:
            try:
                for ev in self.job_events(job_id, timeout=w.stream_timeout(self.timeout)):
                    if w.event(ev):
                        return self.get_job(job_id)
            except (LaserConnectionError, LaserTimeoutError):
                w.check(job_id)
                job = self.get_job(job_id)
                if w.snapshot(job):
                    return job
                self._sleep(min(poll_interval, max(0.0, w.remaining() or poll_interval)))
            w.check(job_id)

    def download_export(self, name: str, dest: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Download every file of export ``name`` into the local folder ``dest``, checking sizes and SHA-256.

        A non-empty ``dest`` is refused unless ``overwrite`` (then the listed files are replaced, others kept).
        """
        export = self.get_export(name)
        dest = Path(dest)
        for spec, target in download_plan(export, dest, overwrite):
            sink = FileSink(spec, target)
            try:
                with self._lines_raw(self._file_call(name, spec)) as chunks:
                    for chunk in chunks:
                        sink.write(chunk)
                sink.commit()
            except BaseException:
                sink.abort()
                raise
        return dest

    @contextmanager
    def _lines_raw(self, call: Call[Any]) -> Iterator[Iterator[bytes]]:
        response = self._send_raw(call, stream=True)
        try:
            yield response.iter_bytes(1 << 20)
        except httpx.HTTPError as e:
            raise self._transport_error(e, response.request) from e
        finally:
            response.close()

    def export(self, profile: str, dest: str | os.PathLike, *, mode: Literal["dense", "factored"] = "dense",
               name: str | None = None, overwrite: bool = False, factor_dtype: str | None = None
               ) -> tuple[ExportPublic, Path]:
        """Export ``profile`` on the server, then download it into ``dest``: (the export's listing, the folder)."""
        export = self.export_profile(profile, mode=mode, name=name, overwrite=overwrite, factor_dtype=factor_dtype)
        return export, self.download_export(export.name, dest, overwrite=overwrite)
