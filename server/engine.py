"""One owner thread runs the model: it applies profiles and executes batches, nothing else does.

Requests are queued per profile ("lanes"). The owner picks the lane whose oldest request has
waited longest (FIFO across profiles: no lane starves), takes every queued request of that lane
with the same operation (up to ``max_batch_size``), makes the model hold that profile (a swap only
when it differs), runs the batch, and hands results back to the event loop. With
``mixed_batches``, generate requests of other profiles join the batch too: their rows get their
own weights through per-row overrides (:mod:`laser_ops.mixed`). Either way a request is only
ever computed with its own profile's weights, and swaps happen between batches.

Sweep jobs submit *background* ``task`` items (one config per item). Background work yields to
inference: it runs only when no inference is queued and none finished in the last
``background_grace_s`` (a closed-loop client's next request arrives within that), unless it has
waited ``background_max_wait_s`` (so a sweep still progresses under constant load). The queue is
bounded: :class:`EngineOverloaded` maps to HTTP 429.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from laser_ops.interventions import InterventionSpec
from laser_ops.mixed import RowOverrides
from laser_ops.scoring import GenerationDelta, GenerationRequest, GenerationResult, Scorer
from laser_ops.swap import WeightSwapper

from server.metrics import Metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")
Op = Literal["generate", "loglikelihood", "prompt_logprobs", "rolling", "task"]
_BATCHED: frozenset[str] = frozenset({"generate", "loglikelihood"})
_BACKGROUND = "\x00background"  # lane of background tasks (never a valid profile name)


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


@dataclass(eq=False)
class _Item:
    profile: str | None  # None: a task that manages the model state itself
    op: Op
    payload: Any
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    size: int = 1
    background: bool = False
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)

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


#: What one item's work produced: its result, or the error to raise in its caller.
_Outcome = tuple[_Item, Any, BaseException | None]


class Engine:
    """Owner of the model. Async methods may be called from the event loop; the work runs on one thread."""

    def __init__(
        self,
        swapper: WeightSwapper,
        scorer: Scorer,
        resolve_profile: Callable[[str], Sequence[InterventionSpec]],
        metrics: Metrics,
        *,
        max_queue: int = 256,
        max_batch_size: int = 16,
        batch_wait_s: float = 0.02,
        background_grace_s: float = 0.05,
        background_max_wait_s: float = 10.0,
        mixed_batches: bool = True,
    ) -> None:
        self.swapper = swapper
        self.scorer = scorer
        self.resolve_profile = resolve_profile
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        #: Longest a batch waits for more requests of its lane, while fewer are queued than recent batches had
        #: (closed-loop clients resubmit a few ms after their batch ends; without the wait, batches fragment).
        self.batch_wait_s = batch_wait_s
        self.background_grace_s = background_grace_s
        #: Generate requests of several profiles share one batch (see laser_ops.mixed); else one profile per batch.
        self.mixed_batches = mixed_batches
        self.mixed_batches_run = 0
        self.background_max_wait_s = background_max_wait_s
        self._last_foreground_end = 0.0
        #: Requests still arriving less than this apart (a burst) are gathered into one batch.
        self.batch_quiet_s = min(0.004, batch_wait_s)
        self._last_batch_size = 1
        self.active_profile: str | None = "base"
        self._lanes: dict[str | None, deque[_Item]] = {}
        self._pending = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batch_seconds = 0.5  # moving estimate, for Retry-After
        self._generate_seconds = 0.0  # moving estimate of a generate batch, for the batching wait
        self.batches_run = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_forever, name="laser-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            pending = [item for lane in self._lanes.values() for item in lane]
            self._lanes.clear()
            self._pending = 0
            self._cond.notify_all()
        for item in pending:
            item.resolve(error=EngineStopped("server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queue_depth(self) -> int:
        """Queued requests (each may hold several prompts or continuations)."""
        return self._pending

    # -- submission (event loop side) ------------------------------------------------------------

    async def submit(
        self,
        profile: str | None,
        op: Op,
        payload: Any,
        *,
        size: int = 1,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
        cancelled: threading.Event | None = None,
        background: bool = False,
    ) -> Any:
        """Queue one request and wait for its result; a client that disconnects cancels it."""
        loop = asyncio.get_running_loop()
        item = _Item(profile, op, payload, loop.create_future(), loop, size, background)
        lane_key = _BACKGROUND if background else profile
        if cancelled is not None:
            item.cancelled = cancelled
        with self._cond:
            if self._stopping:
                raise EngineStopped("server is shutting down")
            if op != "task" and self._pending >= self.max_queue:
                self.metrics.rejected.labels(profile or "").inc()
                raise EngineOverloaded(self._retry_after())
            self._lanes.setdefault(lane_key, deque()).append(item)
            self._pending += 1  # the bound counts requests; ``size`` (rows) only shapes batches
            self.metrics.queue_depth.set(self._pending)
            self._cond.notify()
        try:
            if is_disconnected is None:
                return await item.future
            while True:
                done, _ = await asyncio.wait({item.future}, timeout=0.25)
                if done:
                    return item.future.result()
                if await is_disconnected():
                    item.cancelled.set()
                    raise RequestCancelled("client disconnected")
        except asyncio.CancelledError:
            item.cancelled.set()
            raise

    def check_capacity(self) -> None:
        """Raise :class:`EngineOverloaded` if one more queued request would not fit right now."""
        if self._pending >= self.max_queue:
            raise EngineOverloaded(self._retry_after())

    def _retry_after(self) -> float:
        batches_ahead = max(1, self._pending // self.max_batch_size)
        return max(1.0, round(batches_ahead * self._batch_seconds))

    async def generate(self, profile: str, requests: list[GenerationRequest], **kw: Any) -> list[GenerationResult]:
        return await self.submit(profile, "generate", requests, size=len(requests), **kw)

    async def generate_stream(self, profile: str, request: GenerationRequest
                              ) -> AsyncIterator[str | GenerationDelta | GenerationResult]:
        """Yield text deltas as they are decoded (a :class:`GenerationDelta` with each piece's tokens and
        log-probs when the request asks for log-probs, else the text), then the final :class:`GenerationResult`.

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
                yield task.result()[0]
                return
        finally:
            if getter is not None and not getter.done():
                getter.cancel()  # else a closed stream leaves a pending queue.get() task behind
            if not task.done():
                cancelled.set()
                task.cancel()

    async def loglikelihood(self, profile: str, pairs: list[tuple[list[int], list[int]]], **kw: Any) -> list[Any]:
        return await self.submit(profile, "loglikelihood", pairs, size=max(1, len(pairs)), **kw)

    async def prompt_logprobs(self, profile: str, token_ids: list[list[int]], top_n: int, **kw: Any) -> list[Any]:
        return await self.submit(profile, "prompt_logprobs", (token_ids, top_n), size=max(1, len(token_ids)), **kw)

    async def rolling(self, profile: str, texts: list[str], max_length: int | None = None,
                      stride: int | None = None, **kw: Any) -> list[Any]:
        return await self.submit(profile, "rolling", (texts, max_length, stride), size=max(1, len(texts)), **kw)

    async def run_task(self, fn: Callable[[WeightSwapper, Scorer], T], *, profile: str | None = None,
                       cancelled: threading.Event | None = None, background: bool = False) -> T:
        """Run ``fn`` on the owner thread (between inference batches); with ``profile`` it runs on those weights.

        ``background`` work (sweep steps) yields to inference; see the module docstring.
        """
        return await self.submit(profile, "task", fn, cancelled=cancelled, background=background)

    # -- owner thread ----------------------------------------------------------------------------

    def _next_lane(self) -> str | None:
        """Foreground lane whose head waited longest; the background lane only when it may run."""
        foreground = [k for k in self._lanes if k != _BACKGROUND]
        background = self._lanes.get(_BACKGROUND)
        if background and (not foreground or
                           time.perf_counter() - background[0].enqueued >= self.background_max_wait_s):
            return _BACKGROUND
        return min(foreground, key=lambda p: self._lanes[p][0].enqueued)

    def _background_must_wait(self) -> float:
        """Seconds a background task should still wait for inference that may be about to arrive."""
        if _BACKGROUND not in self._lanes or self._next_lane() != _BACKGROUND:
            return 0.0
        if time.perf_counter() - self._lanes[_BACKGROUND][0].enqueued >= self.background_max_wait_s:
            return 0.0
        return max(0.0, self._last_foreground_end + self.background_grace_s - time.perf_counter())

    def _take_batch(self) -> list[_Item]:
        profile = self._next_lane()
        head = self._lanes[profile][0]
        if head.op == "generate" and self.mixed_batches and profile != _BACKGROUND:
            lanes = [k for k in self._lanes if k != _BACKGROUND]  # every profile's generate requests
        else:
            lanes = [profile]
        candidates = sorted((item for k in lanes for item in self._lanes[k]
                             if item is head or (head.op in _BATCHED and item.op == head.op)),
                            key=lambda i: (i is not head, i.enqueued))
        batch, size = [], 0
        for item in candidates:
            if batch and size + item.size > self.max_batch_size:
                break
            batch.append(item)
            size += item.size
        taken = {id(i) for i in batch}
        for k in lanes:
            rest = deque(i for i in self._lanes[k] if id(i) not in taken)
            if rest:
                self._lanes[k] = rest
            else:
                del self._lanes[k]
        self._pending -= len(batch)
        self.metrics.queue_depth.set(self._pending)
        return batch

    def _oldest_lane(self) -> deque[_Item]:
        return self._lanes[self._next_lane()]

    def _gather_batch(self) -> None:
        """With the lock held: wait a little for a fuller batch.

        The wait is bounded by ``batch_wait_s`` or a tenth of a recent batch's duration, whichever is
        longer (capped at 0.25 s): waiting costs at most ~10% of throughput, while a batch cut in two
        halves it on a launch-bound GPU.

        It waits while fewer requests are queued than recent batches held, or while requests are still
        arriving (a burst: gaps under ``batch_quiet_s``). A lone request waits ``batch_quiet_s`` at most.
        """
        wait = min(0.25, max(self.batch_wait_s, 0.1 * self._generate_seconds))
        deadline = time.perf_counter() + wait
        while not self._stopping and self._lanes:
            lane = self._oldest_lane()
            op = lane[0].op
            if op not in _BATCHED:
                return
            pool = ([i for k, l in self._lanes.items() if k != _BACKGROUND for i in l]
                    if op == "generate" and self.mixed_batches else lane)
            queued = sum(i.size for i in pool if i.op == op)
            now = time.perf_counter()
            remaining = deadline - now
            if queued >= self.max_batch_size or remaining <= 0:
                return
            if queued < self._last_batch_size:  # recent batches were bigger: more requests are on their way
                self._cond.wait(remaining)
                continue
            quiet = now - max(i.enqueued for i in pool)
            if quiet >= self.batch_quiet_s:  # nothing arrived lately: go with what is queued
                return
            self._cond.wait(min(remaining, self.batch_quiet_s - quiet))

    def _run_forever(self) -> None:
        while True:
            with self._cond:
                while not self._lanes and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                wait = self._background_must_wait()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                self._gather_batch()
                if self._stopping:
                    return
                batch = self._take_batch()
                # Peak with slow decay: one fragmented batch must not lower the expectation for the next.
                self._last_batch_size = max(sum(i.size for i in batch), int(self._last_batch_size * 0.9))
            self._run_batch(batch)

    def _activate(self, profile: str) -> None:
        try:
            specs = list(self.resolve_profile(profile))
        except KeyError:
            raise UnknownProfile(profile) from None
        stats = self.swapper.apply(specs)
        if stats.written:
            self.metrics.swaps.labels(profile).inc()
            self.metrics.swap_seconds.labels(profile).observe(stats.seconds)
            self.metrics.edit_cache_bytes.set(self.swapper.cached_bytes)
            self.metrics.svd_cache_bytes.set(self.swapper.svd_cache.nbytes)
        if profile != self.active_profile:
            self.metrics.set_active(profile, self.active_profile)
            self.active_profile = profile

    def _run_batch(self, batch: list[_Item]) -> None:
        """Run one batch, publish the state it leaves, then hand results back.

        Order matters: a caller may read engine state (``active_profile``, metrics, counters) the moment
        its future resolves, so every piece of state is updated before any future of the batch is.
        """
        try:
            outcomes = self._execute(batch)
        except BaseException as exc:  # never let the owner thread die
            logger.exception("engine batch failed")
            error = exc if isinstance(exc, Exception) else RuntimeError(str(exc))
            outcomes = [(item, None, error) for item in batch]
        if not batch[0].background:
            self._last_foreground_end = time.perf_counter()
        for item, value, error in outcomes:
            item.resolve(value, error)

    def _execute(self, batch: list[_Item]) -> list[_Outcome]:
        """Compute every item's outcome and update engine state; resolves nothing."""
        live: list[_Item] = []
        outcomes: list[_Outcome] = []
        for item in batch:
            if item.cancelled.is_set():
                outcomes.append((item, None, RequestCancelled("cancelled before it ran")))
            else:
                live.append(item)
        if not live:
            return outcomes
        head = live[0]
        label = head.profile or "task"
        start = time.perf_counter()
        try:
            if head.profile is not None:
                self._activate(head.profile)
        except Exception as exc:
            # Only the head's profile failed: rows of other profiles (a mixed batch) run under their own.
            rest = [item for item in live if item.profile != head.profile]
            outcomes.extend((item, None, exc) for item in live if item.profile == head.profile)
            if rest:
                outcomes.extend(self._execute(rest))
            return outcomes
        for item in live:
            self.metrics.queue_seconds.labels(item.profile or "task").observe(start - item.enqueued)
        # A task may leave other weights live, with or without a profile of its own.
        before = dict(self.swapper.applied) if head.op == "task" else None
        run = getattr(self, f"_op_{head.op}")
        outcomes.extend(run(live, label))
        if before is not None and self.swapper.applied != before:
            # The task left other weights live: no named profile holds until the next batch re-applies one.
            self.metrics.set_active(None, self.active_profile)
            self.active_profile = None
        elapsed = time.perf_counter() - start
        self.batches_run += 1
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
        if head.op == "generate":
            self._generate_seconds = 0.8 * self._generate_seconds + 0.2 * elapsed
        self.metrics.inference_seconds.labels(label, head.op).observe(elapsed)
        self.metrics.batch_size.labels(label, head.op).observe(len(live))
        return outcomes

    def _op_generate(self, items: list[_Item], profile: str) -> list[_Outcome]:
        """Generate for a batch whose rows may belong to several profiles.

        The batch's first profile is live (applied by ``_run_batch``); rows of any other profile get
        that profile's weights through per-row overrides of the few modules where it differs.
        """
        overrides: dict[str, dict[str, Any]] = {}
        outcomes: list[_Outcome] = []
        runnable: list[_Item] = []
        for item in items:
            other = item.profile
            if other is not None and other != profile and other not in overrides:
                try:
                    overrides[other] = self.swapper.overrides_for(list(self.resolve_profile(other)))
                except KeyError:
                    outcomes.append((item, None, UnknownProfile(other)))
                    continue
                except Exception as exc:
                    outcomes.append((item, None, exc))
                    continue
            if other is None or other == profile or other in overrides:
                runnable.append(item)
        items = runnable
        if not items:
            return outcomes
        flat: list[GenerationRequest] = []
        owners: list[int] = []
        for idx, item in enumerate(items):
            for req in item.payload:
                flat.append(replace(self._instrument(req, item, item.profile or profile), tag=item.profile))
                owners.append(idx)
        rows = RowOverrides(self.swapper.model, {p: o for p, o in overrides.items() if o})
        try:
            with rows.installed():
                results = self.scorer.generate(
                    flat, before_forward=None if rows.empty else lambda reqs: rows.set_rows([r.tag for r in reqs]))
        except Exception as exc:
            return outcomes + [(item, None, exc) for item in items]
        if len({i.profile for i in items}) > 1:
            self.mixed_batches_run += 1
        per_item: list[list[GenerationResult]] = [[] for _ in items]
        for owner, res in zip(owners, results, strict=True):
            per_item[owner].append(res)
            label = items[owner].profile or profile
            self.metrics.prompt_tokens.labels(label).inc(res.n_prompt_tokens)
            self.metrics.generated_tokens.labels(label).inc(len(res.token_ids))
        return outcomes + [(item, res, None) for item, res in zip(items, per_item, strict=True)]

    def _instrument(self, req: GenerationRequest, item: _Item, profile: str) -> GenerationRequest:
        """Hook cancellation and time-to-first-token into the request.

        TTFT uses ``on_first_token``, not a text callback: without a text callback the scorer decodes
        text once at the end instead of every step (which matters on a GPU, where a step is fast).
        """
        user_cancel = req.is_cancelled
        cancel = (lambda: item.cancelled.is_set() or bool(user_cancel())) if user_cancel else item.cancelled.is_set
        user_first = req.on_first_token

        def on_first_token() -> None:
            self.metrics.ttft_seconds.labels(profile).observe(time.perf_counter() - item.enqueued)
            if user_first is not None:
                user_first()

        return replace(req, on_first_token=on_first_token, is_cancelled=cancel)

    def _op_loglikelihood(self, items: list[_Item], profile: str) -> list[_Outcome]:
        flat = [pair for item in items for pair in item.payload]
        try:
            results = self.scorer.loglikelihood_tokens(flat)
        except Exception as exc:
            return [(item, None, exc) for item in items]
        self.metrics.prompt_tokens.labels(profile).inc(sum(len(c) + len(x) for c, x in flat))
        outcomes: list[_Outcome] = []
        pos = 0
        for item in items:
            n = len(item.payload)
            outcomes.append((item, results[pos:pos + n], None))
            pos += n
        return outcomes

    def _each(self, items: list[_Item], fn: Callable[[Any], Any]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        for item in items:
            if item.cancelled.is_set():
                outcomes.append((item, None, RequestCancelled("cancelled")))
                continue
            try:
                outcomes.append((item, fn(item.payload), None))
            except Exception as exc:
                outcomes.append((item, None, exc))
        return outcomes

    def _op_prompt_logprobs(self, items: list[_Item], profile: str) -> list[_Outcome]:
        def run(payload: tuple[list[list[int]], int]) -> list[Any]:
            ids, top_n = payload
            self.metrics.prompt_tokens.labels(profile).inc(sum(len(x) for x in ids))
            return self.scorer.prompt_logprobs(ids, top_n)

        return self._each(items, run)

    def _op_rolling(self, items: list[_Item], profile: str) -> list[_Outcome]:
        return self._each(items, lambda p: self.scorer.loglikelihood_rolling(p[0], max_length=p[1], stride=p[2]))

    def _op_task(self, items: list[_Item], profile: str) -> list[_Outcome]:
        return self._each(items, lambda fn: fn(self.swapper, self.scorer))
