"""The serving engine: one owner thread runs the model, and every request joins one continuous batch.

::

    event loop (routes)                            owner thread ("laser-engine")
    ──────────────────────────────────             ──────────────────────────────────────────────────
    resolve profile → stamp (name, hash)
    generate / score / task ──submit──► inbox ─► start job: add its rows to the batch
                                                  │  profile not compiled? ──► compile worker (SVD off
                                                  │                            this thread) ──► RowRouter
                                                  ▼
                                     ┌─► BatchEngine.step(): retire · admit oldest · prompt chunk ·
                                     │     decode all rows (each row routed to its profile's factors)
                                     │   publish metrics & state ─► resolve futures / stream deltas
                                     └── between steps: one foreground task, or one background chunk
                                         (sweeps) when inference is idle or has starved it too long

Requests never wait for each other: at every step the scheduler admits queued rows (up to
``max_running``), computes prompts in chunks (``prefill_chunk``, within ``max_batch_tokens``) and
retires finished or cancelled rows (:mod:`laser_ops.batching.scheduler`). Profiles never swap weights
while serving: rows of a profile get its edits as cached factors applied per row
(:mod:`laser_ops.batching.row_edits`), so any mix of profiles shares one batch and the base weights stay
live (``swapper.bytes_written`` does not move). Swaps are for tasks (sweeps, dry runs), which run
between steps and must leave the base weights live (the engine restores them if a task did not).

Every answer carries a :class:`ProfileStamp`: the profile name and a hash of the interventions that
computed it, resolved when the request was submitted (a profile updated meanwhile does not change it).
State a caller may read (metrics, ``active_profile``, counters) is updated before any future resolves.

Over 400 lines because the owner loop, admission, task turns and publication share one lock-guarded state (inbox,
running jobs, compiled profiles) and one ordering contract; its pieces that stand alone already live in
:mod:`laser_ops.batching` and :mod:`server.model_info`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

from laser_ops.batching.engine import BatchEngine, Generation, ScoringRows
from laser_ops.batching.row_edits import CompiledProfile, RowRouter, compile_profile
from laser_ops.batching.scheduler import SchedulerConfig
from laser_ops.batching.sequence import SeqStatus
from laser_ops.interventions import InterventionSpec
from laser_ops.scoring import (
    GenerationDelta,
    GenerationRequest,
    GenerationResult,
    HFScorer,
    LoglikelihoodResult,
    PromptLogprobs,
    RollingResult,
)
from laser_ops.swap import WeightSwapper, profile_signature

from server.metrics import Metrics
from server.model_info import ModelIdentity, ModelInfo

logger = logging.getLogger(__name__)

T = TypeVar("T")
Op = Literal["generate", "loglikelihood", "prompt_logprobs", "rolling", "task"]


class EngineOverloaded(RuntimeError):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"server overloaded; retry after {retry_after:.0f} s")
        self.retry_after = retry_after


class EngineStopped(RuntimeError):
    pass


class UnknownProfile(KeyError):
    pass


class RequestCancelled(RuntimeError):
    pass


@dataclass(frozen=True)
class ProfileStamp:
    """Which weights made an answer: the profile's name and a short hash of its interventions."""

    name: str
    hash: str

    @property
    def header(self) -> str:
        """The ``X-Laser-Profile`` header value."""
        return f"{self.name}; hash={self.hash}"


@dataclass(frozen=True)
class ResolvedProfile:
    """A profile as a request will be served: its stamp, its interventions and its routing tag."""

    stamp: ProfileStamp
    specs: tuple[InterventionSpec, ...]
    tag: Hashable  # None: the base model (no edits)


@dataclass(frozen=True)
class Served(Generic[T]):
    """A result and the profile stamp of the weights that computed it."""

    value: T
    profile: ProfileStamp


@dataclass(eq=False)
class _Job:
    """One submission: a request's rows, or a task; resolved on the event loop that submitted it."""

    op: Op
    profile: ResolvedProfile | None  # None: a task without a profile
    payload: Any
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    background: bool = False
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # owner-thread state
    items: list[Generation | ScoringRows] = field(default_factory=list)
    admitted: float | None = None
    assemble: Callable[[], Any] | None = None
    chunks: Generator[Any, None, Any] | None = None  # a chunked task in progress

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        def _set() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)

        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the loop is closed: nobody awaits this future, and the owner thread must live on
            logger.debug("result for a closed event loop dropped")

    @property
    def done(self) -> bool:
        return bool(self.items) and all(item.done for item in self.items)

    @property
    def tag(self) -> Hashable:
        return self.profile.tag if self.profile is not None else None

    @property
    def label(self) -> str:
        """The metrics label."""
        return self.profile.stamp.name if self.profile is not None else "task"


class Engine:
    """Owner of the model. Async methods may be called from the event loop; the work runs on one thread."""

    def __init__(
        self,
        swapper: WeightSwapper,
        scorer: HFScorer,
        resolve_profile: Callable[[str], Sequence[InterventionSpec]],
        metrics: Metrics,
        *,
        max_queue: int = 256,
        max_running: int = 16,
        max_batch_tokens: int = 2048,
        prefill_chunk: int = 512,
        profile_cache_bytes: int = 1 << 30,
        background_grace_s: float = 0.05,
        background_max_wait_s: float = 10.0,
        identity: ModelIdentity | None = None,
    ) -> None:
        self.swapper = swapper
        self.scorer = scorer
        #: What the rest of the server may know about the model (identity, tokenization, targets); the
        #: weights themselves are only touched here.
        self.info = ModelInfo(identity, scorer, swapper.targets)
        self.resolve_profile = resolve_profile
        self.metrics = metrics
        self.max_queue = max_queue
        self.background_grace_s = background_grace_s
        self.background_max_wait_s = background_max_wait_s
        self.profile_cache_bytes = profile_cache_bytes
        self.router = RowRouter(swapper.model)
        self.batch = scorer.batch_engine(
            SchedulerConfig(max_running=max_running, max_batch_tokens=max_batch_tokens,
                            prefill_chunk=min(prefill_chunk, max_batch_tokens - max_running)),
            self.router)
        self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="laser-compile")
        self._compiling: dict[Hashable, Future[CompiledProfile]] = {}
        self._compiled: deque[tuple[Hashable, Future[CompiledProfile]]] = deque()
        self._profile_used: OrderedDict[Hashable, None] = OrderedDict()  # LRU of served profiles
        self._inbox: deque[_Job] = deque()
        self._tasks: deque[_Job] = deque()  # foreground tasks, FIFO
        self._background: deque[_Job] = deque()
        self._running: list[_Job] = []  # jobs with rows in the batch
        self._queued = 0  # jobs submitted and not yet admitted (the queue bound counts these)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_foreground = 0.0
        self._background_due = 0.0  # when the head background job was last served (starvation bound)
        self._job_seconds = 0.5  # moving estimate of a request's time in the engine, for Retry-After
        self._stalled = False  # the last step could run nothing (rows wait for a profile being compiled)
        self._weights_held = 0  # > 0: someone reads the base weights off this thread (an export being written)
        self._bytes_written_seen = swapper.bytes_written
        #: Steps run, and steps whose rows belonged to more than one profile.
        self.steps_run = 0
        self.mixed_steps = 0
        self.submitted = 0  # jobs ever submitted (requests and tasks)
        self.max_rows_in_step = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_forever, name="laser-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step or task chunk; queued work fails with :class:`EngineStopped`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._compiler.shutdown(wait=False, cancel_futures=True)
        with self._cond:
            jobs = [*self._inbox, *self._tasks, *self._background, *self._running]
            self._inbox.clear()
            self._tasks.clear()
            self._background.clear()
            self._running.clear()
        for job in jobs:
            if job.chunks is not None:  # a chunked task (a sweep step) ends at the chunk boundary it reached
                job.chunks.close()
            job.resolve(error=EngineStopped("server is shutting down"))

    @property
    def queue_depth(self) -> int:
        """Requests submitted and not yet running."""
        return self._queued

    @property
    def running_rows(self) -> int:
        return self.batch.scheduler.running

    @property
    def active_profile(self) -> str | None:
        """Whose weights are in the model's parameters: always the base while serving."""
        return "base" if self.swapper.is_base else None

    # -- submission (event loop side) ------------------------------------------------------------

    def resolve(self, profile: str | ResolvedProfile) -> ResolvedProfile:
        """The profile's current interventions and stamp; raises :class:`UnknownProfile`.

        Requests are served with the interventions resolved here, at submission, so the stamp a
        response carries (and a stream's header, known before the first token) is exact even if the
        profile is updated while the request runs.
        """
        if isinstance(profile, ResolvedProfile):
            return profile
        try:
            specs = tuple(self.resolve_profile(profile))
        except KeyError:
            raise UnknownProfile(profile) from None
        signature = profile_signature(specs)
        return ResolvedProfile(ProfileStamp(profile, signature[:12]), specs, signature if specs else None)

    async def submit(self, profile: str | ResolvedProfile | None, op: Op, payload: Any, *,
                     is_disconnected: Callable[[], Awaitable[bool]] | None = None,
                     cancelled: threading.Event | None = None, background: bool = False) -> Any:
        """Queue one request and wait for its result; a client that disconnects cancels it."""
        loop = asyncio.get_running_loop()
        resolved = self.resolve(profile) if profile is not None else None
        job = _Job(op, resolved, payload, loop.create_future(), loop, background)
        if cancelled is not None:
            job.cancelled = cancelled
        with self._cond:
            if self._stopping:
                raise EngineStopped("server is shutting down")
            if op != "task" and self._queued >= self.max_queue:
                self.metrics.rejected.labels(job.label).inc()
                raise EngineOverloaded(self._retry_after())
            if op != "task":
                self._queued += 1
                self.metrics.queue_depth.set(self._queued)
            self._inbox.append(job)
            self.submitted += 1
            self._cond.notify()
        try:
            if is_disconnected is None:
                return await job.future
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=0.25)
                if done:
                    return job.future.result()
                if await is_disconnected():
                    self._cancel(job)
                    raise RequestCancelled("client disconnected")
        except asyncio.CancelledError:
            self._cancel(job)
            raise

    def _cancel(self, job: _Job) -> None:
        job.cancelled.set()
        with self._cond:
            self._cond.notify()

    def check_capacity(self) -> None:
        """Raise :class:`EngineOverloaded` if one more queued request would not fit right now (the bound counts
        requests, whatever number of prompts or continuations each holds)."""
        if self._queued >= self.max_queue:
            raise EngineOverloaded(self._retry_after())

    def _retry_after(self) -> float:
        per_slot = max(1, self.batch.config.max_running)
        return max(1.0, round((self._queued / per_slot + 1) * self._job_seconds))

    @contextlib.asynccontextmanager
    async def weights_held(self) -> AsyncIterator[None]:
        """While held, background tasks (sweep steps, which swap weights) wait: another thread may read the
        base weights meanwhile (an export writes them). Serving goes on: it never writes weights."""
        with self._cond:
            self._weights_held += 1
        try:
            yield
        finally:
            with self._cond:
                self._weights_held -= 1
                self._cond.notify()

    async def generate(self, profile: str | ResolvedProfile, requests: list[GenerationRequest],
                       **kw: Any) -> Served[list[GenerationResult]]:
        return await self.submit(profile, "generate", requests, **kw)

    async def generate_stream(self, profile: str | ResolvedProfile, request: GenerationRequest
                              ) -> AsyncIterator[str | GenerationDelta | GenerationResult]:
        """Yield text deltas as they are decoded (a :class:`GenerationDelta` with each piece's tokens and
        log-probs when the request asks for log-probs, else the text), then the final result (its stamp:
        ``resolve(profile)``).

        Closing the iterator early (client gone) cancels the request on the engine.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | GenerationDelta] = asyncio.Queue()
        cancelled = threading.Event()

        def push(delta: str | GenerationDelta) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        req = replace(request, on_delta=push) if request.logprobs is not None else replace(request, on_text=push)
        task = asyncio.ensure_future(self.submit(profile, "generate", [req], cancelled=cancelled))
        getter: asyncio.Future[str | GenerationDelta] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not queue.empty():
                    yield queue.get_nowait()
                yield task.result().value[0]
                return
        finally:
            if getter is not None and not getter.done():
                getter.cancel()  # else a closed stream leaves a pending queue.get() task behind
            if not task.done():
                cancelled.set()
                task.cancel()

    async def loglikelihood(self, profile: str | ResolvedProfile, pairs: list[tuple[list[int], list[int]]],
                            **kw: Any) -> Served[list[LoglikelihoodResult]]:
        return await self.submit(profile, "loglikelihood", pairs, **kw)

    async def prompt_logprobs(self, profile: str | ResolvedProfile, token_ids: list[list[int]], top_n: int,
                              **kw: Any) -> Served[list[PromptLogprobs]]:
        return await self.submit(profile, "prompt_logprobs", (token_ids, top_n), **kw)

    async def rolling(self, profile: str | ResolvedProfile, texts: list[str], max_length: int | None = None,
                      stride: int | None = None, **kw: Any) -> Served[list[RollingResult]]:
        return await self.submit(profile, "rolling", (texts, max_length, stride), **kw)

    async def run_task(self, fn: Callable[[WeightSwapper, HFScorer], T], *, profile: str | ResolvedProfile | None = None,
                       cancelled: threading.Event | None = None, background: bool = False) -> T:
        """Run ``fn`` on the owner thread between steps; with ``profile`` its weights are applied around it.

        If ``fn`` returns a generator, the engine runs it one chunk (``next``) per turn, serving steps in
        between, and the generator's return value is the result; each chunk must leave the base weights
        live (apply edits with ``swapper.applied_profile`` inside the chunk). ``background`` work (sweep
        steps) yields to inference; see the module docstring.
        """
        return await self.submit(profile, "task", fn, cancelled=cancelled, background=background)

    # -- owner thread ----------------------------------------------------------------------------

    def _run_forever(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._has_turn():
                    self._cond.wait(self._background_wait())
                if self._stopping:
                    return
                inbox = list(self._inbox)
                self._inbox.clear()
                compiled = list(self._compiled)
                self._compiled.clear()
            try:
                self._turn(inbox, compiled)
            except BaseException:  # never let the owner thread die
                logger.exception("engine turn failed")

    def _has_turn(self) -> bool:
        return bool(self._inbox or self._compiled or self._tasks or (self.batch.has_work and not self._stalled)
                    or any(j.cancelled.is_set() for j in self._running) or self._background_ready())

    def _background_ready(self) -> bool:
        if not self._background or self._weights_held:
            return False
        if time.perf_counter() >= self._background_due + self.background_max_wait_s:
            return True  # inference has kept it waiting long enough
        idle = not (self._inbox or self._tasks or self.batch.has_work)
        return idle and time.perf_counter() >= self._last_foreground + self.background_grace_s

    def _background_wait(self) -> float | None:
        """Seconds until a waiting background job may run (None: nothing to wait for)."""
        if not self._background:
            return None
        now = time.perf_counter()
        return max(0.0, min(self._background_due + self.background_max_wait_s,
                            self._last_foreground + self.background_grace_s) - now) + 1e-3

    def _turn(self, inbox: list[_Job], compiled: list[tuple[Hashable, Future[CompiledProfile]]]) -> None:
        if inbox or compiled:
            self._stalled = False
        for tag, fut in compiled:
            self._install(tag, fut)
        for job in inbox:
            self._start(job)
        self._reap_cancelled()
        starved = self._background and time.perf_counter() >= self._background_due + self.background_max_wait_s
        if self._tasks and not (starved and self._background[0].enqueued <= self._tasks[0].enqueued):
            if self._run_task(self._tasks[0]):  # a chunked task stays at the head until its last chunk
                self._tasks.popleft()
            self._last_foreground = time.perf_counter()
        elif self._background_ready():
            job = self._background[0]
            self._background_due = time.perf_counter()
            if self._run_task(job):
                self._background.popleft()
                self._background_due = time.perf_counter()
        if self.batch.has_work:
            self._step()
            self._last_foreground = time.perf_counter()
        self._settle()

    # -- jobs -------------------------------------------------------------------------------------

    def _start(self, job: _Job) -> None:
        if job.op == "task":
            if job.background:
                if not self._background:
                    self._background_due = time.perf_counter()
                self._background.append(job)
            else:
                self._tasks.append(job)
            return
        assert job.profile is not None
        tag = job.tag
        if tag is not None and tag not in self.router and tag not in self._compiling:
            fut = self._compiler.submit(compile_profile, self.swapper, job.profile.specs, tag)
            self._compiling[tag] = fut
            fut.add_done_callback(lambda f, tag=tag: self._compile_done(tag, f))
        try:
            self._add_rows(job)
        except Exception as exc:  # a request the model cannot run (validated upstream; defensive)
            self._fail(job, exc)
            return
        self._running.append(job)

    def _add_rows(self, job: _Job) -> None:
        batch, scorer, tag = self.batch, self.scorer, job.tag
        if job.op == "generate":
            for req in job.payload:
                req = self._instrument(req, job)
                job.items.append(batch.add_generation(req, scorer.prompt_ids(req), tag=tag))
            job.assemble = lambda: [g.result for g in job.items]  # type: ignore[union-attr]
        elif job.op == "loglikelihood":
            windows, contexts, where = scorer.loglikelihood_windows(job.payload)
            rows = batch.add_scoring(windows, contexts=contexts, tag=tag)
            job.items.append(rows)
            job.assemble = lambda: scorer.loglikelihood_results(where, rows.rows)
        elif job.op == "prompt_logprobs":
            token_ids, top_n = job.payload
            windows, spans = scorer.prompt_windows(token_ids)
            rows = batch.add_scoring(windows, top_n=top_n, tag=tag)
            job.items.append(rows)
            job.assemble = lambda: scorer.assemble_prompt_logprobs(token_ids, spans, rows.rows, top_n)
        elif job.op == "rolling":
            texts, max_length, stride = job.payload
            pairs, counts = scorer.rolling_pairs(texts, max_length, stride)
            windows, contexts, where = scorer.loglikelihood_windows(pairs)
            rows = batch.add_scoring(windows, contexts=contexts, tag=tag)
            job.items.append(rows)
            job.assemble = lambda: scorer.rolling_results(scorer.loglikelihood_results(where, rows.rows), counts)
        else:
            raise ValueError(f"unknown op {job.op!r}")

    def _instrument(self, req: GenerationRequest, job: _Job) -> GenerationRequest:
        """Hook the job's cancellation and time-to-first-token into one of its requests."""
        user_cancel, user_first = req.is_cancelled, req.on_first_token
        profile = job.label

        def cancelled() -> bool:
            return job.cancelled.is_set() or (user_cancel is not None and bool(user_cancel()))

        def on_first_token() -> None:
            self.metrics.ttft_seconds.labels(profile).observe(time.perf_counter() - job.enqueued)
            if user_first is not None:
                user_first()

        return replace(req, is_cancelled=cancelled, on_first_token=on_first_token)

    def _fail(self, job: _Job, error: BaseException) -> None:
        self._dequeue(job)
        for item in job.items:
            self.batch.abort(item)
        job.resolve(error=error)

    def _dequeue(self, job: _Job) -> None:
        if job.admitted is None and job.op != "task":
            job.admitted = time.perf_counter()
            self._queued -= 1
            self.metrics.queue_depth.set(self._queued)

    def _reap_cancelled(self) -> None:
        for job in [j for j in self._running if j.cancelled.is_set()]:
            self._stalled = False
            self._running.remove(job)
            self._fail(job, RequestCancelled("cancelled"))
        for queue in (self._tasks, self._background):
            for job in [j for j in queue if j.cancelled.is_set()]:
                queue.remove(job)
                if job.chunks is not None:
                    job.chunks.close()
                job.resolve(error=RequestCancelled("cancelled before it finished"))

    # -- profiles ---------------------------------------------------------------------------------

    def _compile_done(self, tag: Hashable, fut: Future[CompiledProfile]) -> None:  # worker thread
        with self._cond:
            self._compiled.append((tag, fut))
            self._cond.notify()

    def _install(self, tag: Hashable, fut: Future[CompiledProfile]) -> None:
        self._compiling.pop(tag, None)
        try:
            compiled = fut.result()
        except Exception as exc:
            for job in [j for j in self._running if j.tag == tag]:
                self._running.remove(job)
                self._fail(job, exc)
            return
        self.router.add(tag, compiled)
        self._profile_used[tag] = None
        self._evict_profiles()
        self.metrics.profile_factor_bytes.set(self.router.nbytes)

    def _evict_profiles(self) -> None:
        """Drop the least recently served compiled profiles over ``profile_cache_bytes`` (never one in use)."""
        in_use = {j.tag for j in self._running}
        for tag in list(self._profile_used):
            if self.router.nbytes <= self.profile_cache_bytes:
                break
            if tag not in in_use:
                self.router.remove(tag)
                del self._profile_used[tag]

    def _is_ready(self, tag: Hashable) -> bool:
        return tag is None or tag in self.router

    # -- steps ------------------------------------------------------------------------------------

    def _step(self) -> None:
        if not self.swapper.is_base:  # a task left edits live; serving computes on base weights + factors
            logger.error("weights were left edited by a task; restoring the base before serving")
            self.swapper.revert()
        report = self.batch.step(self._is_ready, on_plan=lambda _: self._note_admissions())
        plan = report.plan
        rows = len(plan.decode) + len(plan.prefill)
        if rows:
            self.steps_run += 1
            self.max_rows_in_step = max(self.max_rows_in_step, rows)
            if len({r.tag for r in plan.decode} | {r.tag for r, _ in plan.prefill}) > 1:
                self.mixed_steps += 1
            for op, n in (("decode", len(plan.decode)), ("prefill", len(plan.prefill))):
                if n:
                    self.metrics.batch_size.labels("all", op).observe(n)
        self._stalled = plan.empty
        self._publish_gauges()

    def _note_admissions(self) -> None:
        """Jobs with a row in the batch have left the queue (before the step runs: the bound is exact)."""
        now = time.perf_counter()
        for job in self._running:
            if job.admitted is None and any(_admitted(item) for item in job.items):
                self._dequeue(job)
                self.metrics.queue_seconds.labels(job.label).observe(now - job.enqueued)

    def _settle(self) -> None:
        """Finish done jobs: publish their metrics and state, then resolve them."""
        self._note_admissions()
        now = time.perf_counter()
        finished: list[tuple[_Job, Any]] = []
        for job in [j for j in self._running if j.done]:
            self._running.remove(job)
            self._dequeue(job)
            if job.tag is not None:
                self._profile_used.pop(job.tag, None)
                self._profile_used[job.tag] = None
            value = job.assemble() if job.assemble is not None else None
            self._account(job, value, now)
            finished.append((job, value))
        # Everything a caller may read is published: now hand the results back.
        for job, value in finished:
            assert job.profile is not None
            job.resolve(Served(value, job.profile.stamp))

    def _account(self, job: _Job, value: Any, now: float) -> None:
        profile = job.label
        elapsed = now - (job.admitted or job.enqueued)
        self._job_seconds = 0.9 * self._job_seconds + 0.1 * (now - job.enqueued)
        self.metrics.inference_seconds.labels(profile, job.op).observe(elapsed)
        if job.op == "generate":
            for result in value:
                self.metrics.prompt_tokens.labels(profile).inc(result.n_prompt_tokens)
                self.metrics.generated_tokens.labels(profile).inc(len(result.token_ids))
        else:
            scored = sum(len(r.inputs) for item in job.items if isinstance(item, ScoringRows) for r in item.rows)
            self.metrics.prompt_tokens.labels(profile).inc(scored)

    # -- tasks ------------------------------------------------------------------------------------

    def _run_task(self, job: _Job) -> bool:
        """Run a task, or one chunk of a chunked one; True when it is finished (and resolved)."""
        if job.cancelled.is_set():
            if job.chunks is not None:
                job.chunks.close()
            job.resolve(error=RequestCancelled("cancelled before it ran"))
            return True
        start = time.perf_counter()
        try:
            if job.chunks is None:
                if job.profile is not None:
                    with self.swapper.applied_profile(list(job.profile.specs)):
                        value = job.payload(self.swapper, self.scorer)
                else:
                    value = job.payload(self.swapper, self.scorer)
                if not isinstance(value, Generator):
                    self._after_task(job, start)
                    job.resolve(value)
                    return True
                job.chunks = value
            next(job.chunks)
            self._after_task(job, start)
            return False
        except StopIteration as stop:
            self._after_task(job, start)
            job.resolve(stop.value)
            return True
        except Exception as exc:
            self._after_task(job, start)
            job.resolve(error=exc)
            return True

    def _after_task(self, job: _Job, start: float) -> None:
        if not self.swapper.is_base:
            logger.error("a task left edited weights live; restoring the base")
            self.swapper.revert()
        self.metrics.inference_seconds.labels("task", "task").observe(time.perf_counter() - start)
        self.metrics.edit_cache_bytes.set(self.swapper.cached_bytes)
        self.metrics.svd_cache_bytes.set(self.swapper.svd_cache.nbytes)
        self._publish_gauges()

    def _publish_gauges(self) -> None:
        self.metrics.running_rows.set(self.batch.scheduler.running)
        self.metrics.kv_cache_bytes.set(self.batch.runner.cache.nbytes)
        written = self.swapper.bytes_written
        if written > self._bytes_written_seen:
            self.metrics.weight_bytes_written.inc(written - self._bytes_written_seen)
            self._bytes_written_seen = written


def _admitted(item: Generation | ScoringRows) -> bool:
    rows = [item.row] if isinstance(item, Generation) else item.rows
    return item.done or any(r.status is not SeqStatus.WAITING for r in rows)
