"""Sync and async HTTP clients of laser-serve, sharing one request-building core.

Every endpoint is written once, in :class:`_Endpoints`, as a :class:`Call` (method, path, body, key
scope, how to parse the answer) handed to ``self._send``. :class:`LaserClient` sends it with
``httpx.Client`` and returns the result; :class:`AsyncLaserClient` sends it with
``httpx.AsyncClient`` and returns an awaitable of the same result. Only what must differ by I/O model
is written twice, as thin loops over shared helpers: sending with retries, streams (generate deltas,
job events), :meth:`wait` and :meth:`download_export`.

    from clients import LaserClient
    with LaserClient("http://127.0.0.1:8000") as c:          # or LASER_URL
        print(c.generate("The capital of France is", profile="late-fc-in").text)
        for ev in c.generate_stream("Once upon a time"):
            print(ev.text, end="", flush=True)
        job = c.create_sweep("epistemic_reasoning", types=["fc_in"], layers=[-1], rhos=[0.01])
        job = c.wait(job.id, on_progress=lambda p: print(p.done, p.total))

Keys: ``api_key`` (or ``LASER_API_KEY``) is sent on inference routes and ``admin_api_key`` (or
``LASER_ADMIN_API_KEY``) on admin routes; either one stands in for the other when only one is given
(the admin key passes inference routes too). A 429 (queue full) or a 503 with Retry-After (model
loading) is retried up to ``max_retries`` times, waiting the server's Retry-After, else an exponential
backoff. Errors raise :mod:`clients.errors` exceptions carrying the server's message and status.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter

from clients import models as m
from clients.errors import (
    LaserConnectionError,
    LaserError,
    LaserTimeoutError,
    StreamError,
    error_from_response,
    parse_retry_after,
)

T = TypeVar("T")
Scope = Literal["admin", "inference", "open"]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
RETRY_STATUSES = frozenset({429, 503})
_UNSET: Any = object()


# ---------------------------------------------------------------------------------------------- the core


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request, independent of the I/O model: what to send and how to read the answer."""

    method: str
    path: str
    scope: Scope
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: Mapping[str, Any] | None = None
    timeout: Any = field(default=_UNSET)  # float | httpx.Timeout | None; _UNSET: the client's
    accept: frozenset[int] = frozenset()  # error statuses parsed as results (``/ready``'s 503)


def _model(cls: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda r: cls.model_validate(r.json())


def _listing(cls: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    adapter = TypeAdapter(list[cls])  # type: ignore[valid-type]
    return lambda r: adapter.validate_python(r.json()["data"])


def _seg(value: str) -> str:
    """A path segment, percent-encoded (names are validated by the server; '/' cannot sneak in)."""
    return quote(str(value), safe="")


def _compact(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _generate_params(prompt: str | None, prompts: Sequence[str] | None, max_new_tokens: int | None,
                     temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None,
                     stop: str | Sequence[str] | None) -> dict[str, Any]:
    if (prompt is None) == (prompts is None):
        raise ValueError("give exactly one of prompt or prompts")
    return _compact(prompt=prompt, prompts=list(prompts) if prompts is not None else None,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                    stop=stop if isinstance(stop, str) or stop is None else list(stop))


def _score_params(context: str | None, continuations: Sequence[str] | None, text: str | None,
                  normalize: bool) -> dict[str, Any]:
    return _compact(context=context, continuations=list(continuations) if continuations is not None else None,
                    text=text, normalize=normalize or None)


class SSEDecoder:
    """Incremental Server-Sent Events parser: feed lines (newline stripped), get ``(event, data)`` per event."""

    def __init__(self) -> None:
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str | None, str] | None:
        if line == "":
            out = (self._event, "\n".join(self._data)) if self._data else None
            self._event, self._data = None, []
            return out
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None

    def flush(self) -> tuple[str | None, str] | None:
        return self.feed("")


def _generate_event(data: str) -> m.GenerateStreamEvent | None:
    """One generate SSE payload; None at ``[DONE]``; a server-side failure raises :class:`StreamError`."""
    if data.strip() == "[DONE]":
        return None
    payload = json.loads(data)
    if "error" in payload and "profile" not in payload:
        raise StreamError(str(payload["error"]))
    return m.GenerateStreamEvent.model_validate(payload)


def _safe_relative(name: str) -> PurePosixPath:
    """An export's file name as a relative path that stays inside the destination, or ValueError."""
    p = PurePosixPath(name)
    if (not name or "\\" in name or "\x00" in name or p.is_absolute() or ":" in p.parts[0]
            or any(part in ("", ".", "..") for part in p.parts)):
        raise ValueError(f"refusing unsafe file name {name!r} in the export listing")
    return p


def _download_plan(export: m.Export, dest: Path, overwrite: bool) -> list[tuple[m.ExportFile, Path]]:
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not overwrite)):
        raise FileExistsError(f"{dest} exists and is not an empty folder; pass overwrite=True to write into it")
    return [(f, dest.joinpath(*_safe_relative(f.name).parts)) for f in export.files]


class _FileSink:
    """Writes one downloaded file to ``<target>.part``, hashing; :meth:`commit` checks size and SHA-256, then moves."""

    def __init__(self, spec: m.ExportFile, target: Path) -> None:
        self.spec, self.target = spec, target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.part = target.with_name(target.name + ".part")
        self.fh = self.part.open("wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.fh.write(chunk)
        self.sha.update(chunk)
        self.size += len(chunk)

    def commit(self) -> None:
        self.fh.close()
        if self.size != self.spec.bytes or (self.spec.sha256 and self.sha.hexdigest() != self.spec.sha256):
            self.part.unlink(missing_ok=True)
            raise LaserError(f"download of {self.spec.name} is corrupt: {self.size} bytes (expected "
                             f"{self.spec.bytes}), sha256 {self.sha.hexdigest()} (expected {self.spec.sha256})")
        os.replace(self.part, self.target)

    def abort(self) -> None:
        self.fh.close()
        self.part.unlink(missing_ok=True)


class _Waiter:
    """What :meth:`wait` shares between sync and async: deadline, progress callback, fallback polling."""

    def __init__(self, timeout: float | None, on_progress: Callable[[m.JobProgress], Any] | None,
                 poll_interval: float) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.on_progress = on_progress
        self.poll_interval = poll_interval

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self, job_id: str) -> None:
        left = self.remaining()
        if left is not None and left <= 0:
            raise LaserTimeoutError(f"job {job_id} did not finish in time")

    def stream_timeout(self, default: httpx.Timeout) -> httpx.Timeout:
        """The client's timeouts, with reads bounded by what is left of the deadline."""
        left = self.remaining()
        read = default.read if left is None else max(0.05, min(default.read or left, left))
        return httpx.Timeout(default.connect, read=read, write=default.write, pool=default.pool)

    def event(self, ev: m.JobProgress) -> bool:
        if self.on_progress is not None:
            self.on_progress(ev)
        return ev.terminal

    def snapshot(self, job: m.Job) -> bool:
        """A polled job as a progress event (fallback when the event stream is unavailable)."""
        ev = m.JobProgress(type="state" if job.terminal else "progress", id=job.id, state=job.state, done=job.done,
                           total=job.total, progress=job.progress, elapsed_s=job.elapsed_s, eta_s=job.eta_s,
                           best=job.best, error=job.error)
        return self.event(ev)


class _Base:
    """Settings, keys, request building, retry policy and answer parsing: everything but the I/O."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, admin_api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT, max_retries: int = 3,
                 backoff: float = 0.5, max_backoff: float = 30.0, headers: Mapping[str, str] | None = None) -> None:
        self.base_url = (base_url or os.environ.get("LASER_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("LASER_API_KEY") or None
        self.admin_api_key = (admin_api_key if admin_api_key is not None
                              else os.environ.get("LASER_ADMIN_API_KEY") or None)
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.headers = {"User-Agent": "laser-serve-client", **(headers or {})}

    def _key(self, scope: Scope) -> str | None:
        if scope == "admin":
            return self.admin_api_key or self.api_key
        return self.api_key or self.admin_api_key

    def _request(self, http: httpx.Client | httpx.AsyncClient, call: Call[Any], stream: bool = False) -> httpx.Request:
        headers = {}
        key = self._key(call.scope)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if stream:
            headers["Accept"] = "text/event-stream"
        timeout = self.timeout if call.timeout is _UNSET else call.timeout
        return http.build_request(call.method, call.path, json=call.json, params=call.params, headers=headers,
                                  timeout=timeout)

    def _retry_delay(self, call: Call[Any], attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before retrying this answer, or None to give up (not retryable, or out of retries)."""
        if (response.status_code not in RETRY_STATUSES or response.status_code in call.accept
                or attempt >= self.max_retries):
            return None
        after = parse_retry_after(response.headers.get("retry-after"))
        if response.status_code == 503 and after is None:
            return None  # the engine stopped: retrying will not help
        if after is not None:
            return after
        return min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)

    @staticmethod
    def _transport_error(exc: httpx.HTTPError, request: httpx.Request) -> LaserError:
        if isinstance(exc, httpx.TimeoutException):
            return LaserTimeoutError(f"{request.method} {request.url} timed out ({type(exc).__name__})")
        return LaserConnectionError(f"cannot reach laser-serve at {request.url.scheme}://{request.url.netloc.decode()}"
                                    f": {exc or type(exc).__name__}")

    @staticmethod
    def _result(call: Call[T], response: httpx.Response) -> T:
        if response.is_error and response.status_code not in call.accept:
            raise error_from_response(response)
        return call.parse(response)


# ---------------------------------------------------------------------------------------------- endpoints (once)


class _Endpoints(_Base):
    """Every endpoint, written once. In :class:`AsyncLaserClient` each returns an awaitable of the annotated type."""

    def _send(self, call: Call[T]) -> T:  # overridden by each client
        raise NotImplementedError

    # -- system ----------------------------------------------------------------------------------

    def health(self) -> m.Health:
        """``GET /health``: the process answers."""
        return self._send(Call("GET", "/health", "open", _model(m.Health)))

    def ready(self) -> m.Readiness:
        """``GET /ready``: the model is loaded (a 503 answer is returned as ``ready=False``, not raised)."""
        return self._send(Call("GET", "/ready", "open", _model(m.Readiness), accept=frozenset({503})))

    def info(self) -> m.Info:
        """``GET /info``: the model, its LASER types, dtype, device, version."""
        return self._send(Call("GET", "/info", "open", _model(m.Info)))

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text."""
        return self._send(Call("GET", "/metrics", "open", lambda r: r.text))

    # -- profiles --------------------------------------------------------------------------------

    def list_profiles(self) -> list[m.Profile]:
        """Every profile, 'base' first."""
        return self._send(Call("GET", "/v1/profiles", "inference", _listing(m.Profile)))

    def get_profile(self, name: str) -> m.Profile:
        return self._send(Call("GET", f"/v1/profiles/{_seg(name)}", "inference", _model(m.Profile)))

    def create_profile(self, name: str, interventions: Sequence[Mapping[str, Any]], *,
                       description: str = "") -> m.Profile:
        """Create a profile (409 if it exists: use :meth:`replace_profile`)."""
        body = {"name": name, "description": description, "interventions": [dict(i) for i in interventions]}
        return self._send(Call("POST", "/v1/profiles", "admin", _model(m.Profile), json=body))

    def replace_profile(self, name: str, interventions: Sequence[Mapping[str, Any]], *,
                        description: str = "") -> m.Profile:
        """Create or replace a profile (``PUT``); live traffic uses it from the next batch."""
        body = {"description": description, "interventions": [dict(i) for i in interventions]}
        return self._send(Call("PUT", f"/v1/profiles/{_seg(name)}", "admin", _model(m.Profile), json=body))

    def dry_run_profile(self, name: str, interventions: Sequence[Mapping[str, Any]]) -> m.ProfileDryRun:
        """Per-matrix k, retained energy and Frobenius error of a would-be profile; nothing stored."""
        body = {"description": "", "interventions": [dict(i) for i in interventions]}
        return self._send(Call("PUT", f"/v1/profiles/{_seg(name)}", "admin", _model(m.ProfileDryRun), json=body,
                               params={"dry_run": "true"}))

    def delete_profile(self, name: str) -> m.Deleted:
        return self._send(Call("DELETE", f"/v1/profiles/{_seg(name)}", "admin", _model(m.Deleted)))

    # -- inference -------------------------------------------------------------------------------

    def generate(self, prompt: str | None = None, *, prompts: Sequence[str] | None = None, profile: str | None = None,
                 max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None) -> m.GenerateResponse:
        """Generate from one prompt (or several, ``prompts``) with a profile (default: the server's)."""
        body = {**_generate_params(prompt, prompts, max_new_tokens, temperature, top_p, top_k, seed, stop),
                **_compact(profile=profile)}
        return self._send(Call("POST", "/v1/generate", "inference", _model(m.GenerateResponse), json=body))

    def score(self, context: str | None = None, continuations: Sequence[str] | None = None, *, text: str | None = None,
              normalize: bool = False, profile: str | None = None) -> m.ScoreResponse:
        """Log-prob of each continuation given the context (with argmax), or the perplexity of ``text``."""
        body = {**_score_params(context, continuations, text, normalize), **_compact(profile=profile)}
        return self._send(Call("POST", "/v1/score", "inference", _model(m.ScoreResponse), json=body))

    def compare(self, profiles: Sequence[str], prompt: str | None = None, *, prompts: Sequence[str] | None = None,
                context: str | None = None, continuations: Sequence[str] | None = None, text: str | None = None,
                normalize: bool = False, max_new_tokens: int | None = None, temperature: float | None = None,
                top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                stop: str | Sequence[str] | None = None) -> m.CompareResponse:
        """The same request on each profile, side by side, with a diff against the first.

        A score comparison when ``context``/``continuations`` or ``text`` is given, else a generate one.
        """
        body: dict[str, Any] = {"profiles": list(profiles)}
        if context is not None or continuations is not None or text is not None:
            body["score"] = _score_params(context, continuations, text, normalize)
        else:
            body["generate"] = _generate_params(prompt, prompts, max_new_tokens, temperature, top_p, top_k, seed,
                                                stop)
        return self._send(Call("POST", "/v1/compare", "inference", _model(m.CompareResponse), json=body))

    # -- OpenAI-compatible models ----------------------------------------------------------------

    def list_models(self) -> list[m.ModelCard]:
        """``GET /v1/models``: base and every profile (use the OpenAI SDK for completions)."""
        return self._send(Call("GET", "/v1/models", "inference", _listing(m.ModelCard)))

    def get_model(self, model: str) -> m.ModelCard:
        return self._send(Call("GET", f"/v1/models/{_seg(model)}", "inference", _model(m.ModelCard)))

    # -- datasets --------------------------------------------------------------------------------

    def list_datasets(self) -> list[m.DatasetSummary]:
        return self._send(Call("GET", "/v1/datasets", "inference", _listing(m.DatasetSummary)))

    def get_dataset(self, name: str) -> m.Dataset:
        return self._send(Call("GET", f"/v1/datasets/{_seg(name)}", "inference", _model(m.Dataset)))

    def upload_dataset(self, name: str, content: str | Mapping[str, Any] | Sequence[Mapping[str, Any]] | os.PathLike,
                       *, format: Literal["jsonl", "bigbench"] = "jsonl", kind: str | None = None,
                       prompt_template: str | None = None, single_target_only: bool = False,
                       description: str = "") -> m.Dataset:
        """Upload a dataset: JSONL text, a list of row dicts (sent as JSONL), a BIG-bench task, or a local file.

        A rejected upload raises :class:`~clients.errors.UnprocessableError` whose ``errors`` name each bad line.
        """
        if isinstance(content, os.PathLike):
            content = Path(content).read_text()
        elif isinstance(content, Sequence) and not isinstance(content, str):
            content = "".join(json.dumps(dict(r)) + "\n" for r in content)
        body = {"name": name, "format": format, "content": content, "single_target_only": single_target_only,
                "description": description, **_compact(kind=kind, prompt_template=prompt_template)}
        return self._send(Call("POST", "/v1/datasets", "admin", _model(m.Dataset), json=body))

    def delete_dataset(self, name: str) -> m.Deleted:
        return self._send(Call("DELETE", f"/v1/datasets/{_seg(name)}", "admin", _model(m.Deleted)))

    # -- jobs ------------------------------------------------------------------------------------

    def create_sweep(self, dataset: str, **config: Any) -> m.Job:
        """Queue a validation sweep (config: types, layers, rhos, strategy, kind, max_configs, ...); 202 with the job."""
        return self._send(Call("POST", "/v1/jobs/sweeps", "admin", _model(m.Job), json={"dataset": dataset, **config}))

    def list_jobs(self, state: str | None = None) -> list[m.JobSummary]:
        """Jobs, newest first (optionally only one state)."""
        return self._send(Call("GET", "/v1/jobs", "inference", _listing(m.JobSummary),
                               params=_compact(state=state) or None))

    def get_job(self, job_id: str) -> m.Job:
        return self._send(Call("GET", f"/v1/jobs/{_seg(job_id)}", "inference", _model(m.Job)))

    def cancel_job(self, job_id: str) -> m.Job:
        """Cancel a queued or running job (finished rows are kept; the best so far stays promotable)."""
        return self._send(Call("POST", f"/v1/jobs/{_seg(job_id)}/cancel", "admin", _model(m.Job)))

    def delete_job(self, job_id: str) -> m.JobDeleted:
        """Delete a finished job and its rows (a queued or running one must be cancelled first)."""
        return self._send(Call("DELETE", f"/v1/jobs/{_seg(job_id)}", "admin", _model(m.JobDeleted)))

    def job_examples(self, job_id: str, config: str, *, split: str = "validation", filter: str = "flips",
                     offset: int = 0, limit: int = 50) -> m.ExamplePage:
        """Per-example evidence of ``config`` against base: ``filter`` flips (fixed or broken), fixed, broken,
        disagree or all; ``split`` validation (any config) or test (base and the winner)."""
        params = {"config": config, "split": split, "filter": filter, "offset": offset, "limit": limit}
        return self._send(Call("GET", f"/v1/jobs/{_seg(job_id)}/examples", "inference", _model(m.ExamplePage),
                               params=params))

    def job_plot(self, job_id: str) -> bytes:
        """PNG heatmap of validation accuracy over layer x rho."""
        return self._send(Call("GET", f"/v1/jobs/{_seg(job_id)}/plot.png", "inference", lambda r: r.content))

    def promote(self, job_id: str, name: str, *, description: str | None = None, replace: bool = False) -> m.Profile:
        """Store the job's best config as profile ``name``."""
        body = {"name": name, "replace": replace, **_compact(description=description)}
        return self._send(Call("POST", f"/v1/jobs/{_seg(job_id)}/promote", "admin", _model(m.Profile), json=body))

    # -- exports ---------------------------------------------------------------------------------

    def export_profile(self, profile: str, *, mode: Literal["dense", "factored"] = "dense", name: str | None = None,
                       overwrite: bool = False, factor_dtype: str | None = None,
                       timeout: float | httpx.Timeout | None = None) -> m.Export:
        """Have the server write ``profile`` as a Hugging Face folder (its own exports area); the export's listing.

        ``timeout`` defaults to none at all: writing a large model takes a while.
        """
        body = _compact(mode=mode, name=name, overwrite=overwrite or None, factor_dtype=factor_dtype)
        return self._send(Call("POST", f"/v1/profiles/{_seg(profile)}/export", "admin", _model(m.Export), json=body,
                               timeout=timeout))

    def list_exports(self) -> list[m.ExportSummary]:
        return self._send(Call("GET", "/v1/exports", "admin", _listing(m.ExportSummary)))

    def get_export(self, name: str) -> m.Export:
        return self._send(Call("GET", f"/v1/exports/{_seg(name)}", "admin", _model(m.Export)))

    def delete_export(self, name: str) -> m.Deleted:
        return self._send(Call("DELETE", f"/v1/exports/{_seg(name)}", "admin", _model(m.Deleted)))

    # -- shared pieces of the streamed calls -----------------------------------------------------

    @staticmethod
    def _generate_stream_call(prompt: str, profile: str | None, params: dict[str, Any]) -> Call[None]:
        body = {**_generate_params(prompt, None, *(params.get(k) for k in (
            "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop"))), **_compact(profile=profile),
                "stream": True}
        return Call("POST", "/v1/generate", "inference", lambda r: None, json=body)

    @staticmethod
    def _events_call(job_id: str, timeout: Any = _UNSET) -> Call[None]:
        return Call("GET", f"/v1/jobs/{_seg(job_id)}/events", "inference", lambda r: None, timeout=timeout)

    @staticmethod
    def _file_call(export: str, file: m.ExportFile) -> Call[None]:
        return Call("GET", f"/v1/exports/{_seg(export)}/files/{quote(file.name)}", "admin", lambda r: None)


# ---------------------------------------------------------------------------------------------- sync


class LaserClient(_Endpoints):
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
        """Send with retries; an error answer is read and raised. A streamed answer is returned open."""
        attempt = 0
        while True:
            request = self._request(self._http, call, stream)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.HTTPError as e:
                raise self._transport_error(e, request) from e
            delay = self._retry_delay(call, attempt, response)
            if delay is None:
                if response.is_error and response.status_code not in call.accept:
                    if stream:
                        response.read()
                        response.close()
                    raise error_from_response(response)
                return response
            response.close()
            attempt += 1
            self._sleep(delay)

    def _send(self, call: Call[T]) -> T:
        return self._result(call, self._send_raw(call))

    @contextmanager
    def _lines(self, call: Call[Any]) -> Iterator[Iterator[str]]:
        response = self._send_raw(call, stream=True)
        try:
            yield response.iter_lines()
        except httpx.HTTPError as e:
            raise self._transport_error(e, response.request) from e
        finally:
            response.close()

    def generate_stream(self, prompt: str, *, profile: str | None = None, max_new_tokens: int | None = None,
                        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                        seed: int | None = None, stop: str | Sequence[str] | None = None
                        ) -> Iterator[m.GenerateStreamEvent]:
        """Generate one prompt as a stream of text deltas; the last event carries finish_reason and usage.

        Closing the iterator early (``break``) closes the connection; the server then cancels the request.
        """
        call = self._generate_stream_call(prompt, profile, dict(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop))
        decoder = SSEDecoder()
        with self._lines(call) as lines:
            for line in lines:
                ev = decoder.feed(line)
                if ev is None:
                    continue
                event = _generate_event(ev[1])
                if event is None:
                    return
                yield event

    def job_events(self, job_id: str, *, timeout: float | httpx.Timeout | None = _UNSET) -> Iterator[m.JobProgress]:
        """The job's progress events (Server-Sent Events): a snapshot first, one per step, ending at a terminal state."""
        decoder = SSEDecoder()
        with self._lines(self._events_call(job_id, timeout)) as lines:
            for line in lines:
                ev = decoder.feed(line)
                if ev is not None:
                    yield m.JobProgress.model_validate_json(ev[1])

    def wait(self, job_id: str, *, timeout: float | None = None,
             on_progress: Callable[[m.JobProgress], Any] | None = None, poll_interval: float = 1.0) -> m.Job:
        """Follow the job's progress until it ends (succeeded, failed or cancelled); the finished job.

        Follows the event stream, calling ``on_progress`` per event; if the stream breaks it polls
        ``get_job`` every ``poll_interval`` seconds and reconnects. Raises
        :class:`~clients.errors.LaserTimeoutError` after ``timeout`` seconds.
        """
        w = _Waiter(timeout, on_progress, poll_interval)
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
        for spec, target in _download_plan(export, dest, overwrite):
            sink = _FileSink(spec, target)
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
               ) -> tuple[m.Export, Path]:
        """Export ``profile`` on the server, then download it into ``dest``: (the export's listing, the folder)."""
        export = self.export_profile(profile, mode=mode, name=name, overwrite=overwrite, factor_dtype=factor_dtype)
        return export, self.download_export(export.name, dest, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------- async


class AsyncLaserClient(_Endpoints):
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
        attempt = 0
        while True:
            request = self._request(self._http, call, stream)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.HTTPError as e:
                raise self._transport_error(e, request) from e
            delay = self._retry_delay(call, attempt, response)
            if delay is None:
                if response.is_error and response.status_code not in call.accept:
                    if stream:
                        await response.aread()
                        await response.aclose()
                    raise error_from_response(response)
                return response
            await response.aclose()
            attempt += 1
            await self._sleep(delay)

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
                              ) -> AsyncIterator[m.GenerateStreamEvent]:
        """Async iterator of text deltas (see :meth:`LaserClient.generate_stream`)."""
        call = self._generate_stream_call(prompt, profile, dict(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop))
        decoder = SSEDecoder()
        async with self._stream(call) as response:
            async for line in response.aiter_lines():
                ev = decoder.feed(line)
                if ev is None:
                    continue
                event = _generate_event(ev[1])
                if event is None:
                    return
                yield event

    async def job_events(self, job_id: str, *, timeout: float | httpx.Timeout | None = _UNSET
                         ) -> AsyncIterator[m.JobProgress]:
        decoder = SSEDecoder()
        async with self._stream(self._events_call(job_id, timeout)) as response:
            async for line in response.aiter_lines():
                ev = decoder.feed(line)
                if ev is not None:
                    yield m.JobProgress.model_validate_json(ev[1])

    async def wait(self, job_id: str, *, timeout: float | None = None,
                   on_progress: Callable[[m.JobProgress], Any] | None = None, poll_interval: float = 1.0) -> m.Job:
        """Follow the job until it ends (see :meth:`LaserClient.wait`)."""
        w = _Waiter(timeout, on_progress, poll_interval)
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
        export: m.Export = await self.get_export(name)  # type: ignore[misc]
        dest = Path(dest)
        for spec, target in _download_plan(export, dest, overwrite):
            sink = _FileSink(spec, target)
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
                     ) -> tuple[m.Export, Path]:
        """Export ``profile`` on the server, then download it into ``dest``."""
        export: m.Export = await self.export_profile(  # type: ignore[misc]
            profile, mode=mode, name=name, overwrite=overwrite, factor_dtype=factor_dtype)
        return export, await self.download_export(export.name, dest, overwrite=overwrite)
