"""Continuous batching over one model: generation and scoring rows join and leave at step boundaries.

:class:`BatchEngine` ties the pieces together: the :class:`~laser_ops.batching.scheduler.Scheduler`
plans a step, the :class:`~laser_ops.batching.runner.ModelRunner` runs it, the batched sampler picks
every row's token with one device sync, and each generating row's text goes through the incremental
detokenizer (stop strings, stream deltas). It is synchronous and single-threaded: the library's
:class:`~laser_ops.scoring.HFScorer` drives it to completion for a list of requests, and the server's
engine thread calls :meth:`BatchEngine.step` in its loop while requests arrive.

Why not ``transformers``' own continuous batching (``generate_batch`` / ``ContinuousBatchingManager``)?
It was evaluated first. Its manager runs its own background thread and scheduler over a packed
(varlen) batch with a paged cache, and exposes neither the per-token row layout of a step nor a hook
between steps; laser-serve needs both: rows of one step belong to different profiles (routed per row
to their own factors, :mod:`laser_ops.batching.row_edits`), and its engine thread must interleave
sweep chunks and model tasks with serving steps. It also offers no per-request seeds, top-N log-probs
or scoring (prompt log-probs) rows, and its paged attention does not cover every architecture in the
contract table (GPT-J's eager attention takes no custom kernel). So laser-serve schedules on the model
itself with a cache whose rows join and leave (:mod:`laser_ops.batching.kv_cache`); ``bench/serve.py``
measures it against ``generate_batch``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from laser_ops.batching.detokenizer import TextStream
from laser_ops.batching.row_edits import RowRouter
from laser_ops.batching.runner import ModelRunner
from laser_ops.batching.sampler import SamplingParams, new_generator, sample
from laser_ops.batching.scheduler import Scheduler, SchedulerConfig, StepPlan
from laser_ops.batching.sequence import Sequence as Row
from laser_ops.batching.sequence import SeqStatus
from laser_ops.scoring.api import GenerationDelta, GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)

#: A context shorter than this is recomputed per continuation instead of shared (copying costs too).
MIN_SHARED_PREFIX = 8


@dataclass(eq=False)
class Generation:
    """A generating row and what it produced so far; ``result`` is set when it finishes."""

    request: GenerationRequest
    row: Row
    stream: TextStream
    params: SamplingParams
    generator: torch.Generator | None
    on_done: Callable[[Generation], None] | None = None
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    result: GenerationResult | None = None
    delivered: int = 0  # tokens already handed to ``on_delta``

    def emit(self, final: bool = False) -> None:
        """Hand the text that is safe to show (all of it when ``final``) to the request's callbacks."""
        req = self.request
        if req.on_text is None and req.on_delta is None:
            return
        piece = self.stream.delta(final)
        if piece and req.on_text is not None:
            req.on_text(piece)
        n = len(self.row.output_ids)
        if req.on_delta is not None and (piece or (final and n > self.delivered)):
            start, self.delivered = self.delivered, n
            want = req.logprobs is not None
            req.on_delta(GenerationDelta(piece, self.row.output_ids[start:n],
                                         self.token_logprobs[start:n] if want else None,
                                         self.top_logprobs[start:n] if want else None))

    @property
    def done(self) -> bool:
        return self.result is not None


@dataclass(eq=False)
class ScoringRows:
    """Rows scored for one caller (with the shared prefixes they copy); done when all rows are."""

    rows: list[Row]
    prefixes: list[Row]
    on_done: Callable[[ScoringRows], None] | None = None

    @property
    def done(self) -> bool:
        return all(r.finished for r in self.rows)


@dataclass
class StepReport:
    """What one step did (for metrics): rows computed and tokens spent."""

    plan: StepPlan
    decoded: int
    prefilled_tokens: int
    finished: list[Generation | ScoringRows]


class BatchEngine:
    """Synchronous continuous-batching core; see the module docstring. Not thread-safe."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                 eos_token_ids: set[int], pad_token_id: int, config: SchedulerConfig | None = None,
                 router: RowRouter | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.config = config or SchedulerConfig()
        self.scheduler = Scheduler(self.config)
        self.runner = ModelRunner(model, pad_token_id=pad_token_id, router=router,
                                  slots=self.config.max_running + 1)
        self._generations: dict[int, Generation] = {}  # seq_id -> generation, while running
        self._scoring: list[ScoringRows] = []

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- submission -------------------------------------------------------------------------------

    def add_generation(self, request: GenerationRequest, prompt_ids: list[int], *, tag: Hashable = None,
                       on_done: Callable[[Generation], None] | None = None) -> Generation:
        """Queue one generation; ``prompt_ids`` is the already encoded prompt (non-empty)."""
        row = Row(list(prompt_ids), tag=tag, max_new_tokens=request.max_new_tokens)
        params = SamplingParams(request.temperature, request.top_p, request.top_k, request.logprobs)
        gen = Generation(request, row, TextStream(self.tokenizer, context=prompt_ids[-1:], stop=request.stop),
                         params, None if params.greedy else new_generator(request.seed, self.device), on_done)
        row.owner = gen
        if request.max_new_tokens == 0 or self._cancelled(gen):
            self._finish(gen, "length" if request.max_new_tokens == 0 else "cancelled")
            return gen
        self._generations[row.seq_id] = gen
        self.scheduler.add(row)
        return gen

    def add_scoring(self, windows: Sequence[tuple[list[int], list[int]]], *, tag: Hashable = None, top_n: int = 0,
                    contexts: Sequence[int | None] | None = None,
                    on_done: Callable[[ScoringRows], None] | None = None) -> ScoringRows:
        """Queue scoring windows ``(inputs, targets)``: ``targets`` are the next tokens of the last
        ``len(targets)`` input positions (non-empty inputs, 1 <= len(targets) <= len(inputs)).

        ``contexts[i]`` (optional) is the length of a context window ``i`` shares with others: windows
        with the same first ``contexts[i]`` inputs compute that context once (one shared prefix row).
        """
        donors: dict[tuple[int, ...], Row] = {}
        if contexts is not None:
            counts: dict[tuple[int, ...], int] = {}
            for (inputs, _), n in zip(windows, contexts, strict=True):
                if n is not None and n - 1 >= MIN_SHARED_PREFIX:
                    key = tuple(inputs[:n - 1])
                    counts[key] = counts.get(key, 0) + 1
            shared = {k for k, c in counts.items() if c >= 2}
            donors = {k: Row(list(k), tag=tag, is_prefix=True) for k in shared}
        rows: list[Row] = []
        for i, (inputs, targets) in enumerate(windows):
            n = contexts[i] if contexts is not None else None
            donor = donors.get(tuple(inputs[:n - 1])) if n is not None and n - 1 >= MIN_SHARED_PREFIX else None
            score_from = len(inputs) - len(targets)
            if donor is not None and score_from < len(donor.inputs):
                donor = None  # the context is not wholly before the scored part
            rows.append(Row(list(inputs), tag=tag, targets=list(targets), score_from=score_from, top_n=top_n,
                            prefix=donor))
        for donor in donors.values():
            if donor.waiting_children == 0:
                donor.finish("unused")
        job = ScoringRows(rows, [d for d in donors.values() if not d.finished], on_done)
        for row in [*job.prefixes, *rows]:
            row.owner = job
            self.scheduler.add(row)
        self._scoring.append(job)
        return job

    def abort(self, item: Generation | ScoringRows, reason: str = "cancelled") -> None:
        """Stop ``item`` now: its rows free their slots at the next step."""
        if isinstance(item, Generation):
            if not item.done:
                self.scheduler.abort(item.row, reason)
                self._generations.pop(item.row.seq_id, None)
                self._finish(item, reason)
            return
        for row in [*item.rows, *item.prefixes]:
            self.scheduler.abort(row, reason)
        if item in self._scoring:
            self._scoring.remove(item)
            if item.on_done is not None:
                item.on_done(item)

    # -- stepping ---------------------------------------------------------------------------------

    def step(self, is_ready: Callable[[Hashable], bool] = lambda tag: True,
             on_plan: Callable[[StepPlan], None] | None = None) -> StepReport:
        """Plan and run one step; finished work is reported (and its ``on_done`` called).

        ``on_plan`` sees the plan before the model runs (rows admitted by it have left the queue).
        """
        finished: list[Generation | ScoringRows] = []
        for gen in list(self._generations.values()):
            if self._cancelled(gen):
                self.scheduler.abort(gen.row, "cancelled")
                del self._generations[gen.row.seq_id]
                self._finish(gen, "cancelled")
                finished.append(gen)
        plan = self.scheduler.schedule(is_ready)
        if on_plan is not None:
            on_plan(plan)
        if plan.empty:
            if plan.copies:
                self.runner.execute(plan)
            return StepReport(plan, 0, 0, finished)
        out = self.runner.execute(plan)
        if out.needs_token:
            assert out.logits is not None
            gens = [self._generations[r.seq_id] for r in out.needs_token]
            picked = sample(out.logits, [g.params for g in gens], [g.generator for g in gens])
            for g, tok, lp, top in zip(gens, picked.tokens, picked.logprobs, picked.top, strict=True):
                if self._on_token(g, tok, lp, top):
                    finished.append(g)
        for row, _ in plan.prefill:
            if row.computed == len(row.inputs) and not row.finished:
                if row.is_prefix:
                    row.status = SeqStatus.READY
                elif not row.generates:
                    row.finish("scored")
        for job in [j for j in self._scoring if j.done]:
            self._scoring.remove(job)
            finished.append(job)
            if job.on_done is not None:
                job.on_done(job)
        prefilled = sum(n for _, n in plan.prefill)
        return StepReport(plan, len(plan.decode), prefilled, finished)

    def run(self) -> None:
        """Step until every queued row is done (the library's synchronous use)."""
        while self.scheduler.has_work:
            self.step()
        self.runner.cache.release()

    # -- tokens -----------------------------------------------------------------------------------

    def _cancelled(self, gen: Generation) -> bool:
        check = gen.request.is_cancelled
        return check is not None and bool(check())

    def _on_token(self, gen: Generation, token: int, logprob: float | None, top: dict[int, float] | None) -> bool:
        """Record one chosen token; returns True when the generation finished."""
        row, req = gen.row, gen.request
        if not row.output_ids and req.on_first_token is not None:
            req.on_first_token()
        if row.status is SeqStatus.PREFILL:
            row.status = SeqStatus.DECODE
        if token in self.eos_token_ids:
            return self._end(gen, "stop")
        row.output_ids.append(token)
        if logprob is not None:
            gen.token_logprobs.append(logprob)
            gen.top_logprobs.append(top or {})
        gen.stream.push(token)
        if gen.stream.stopped:
            return self._end(gen, "stop")
        if len(row.output_ids) >= row.max_new_tokens:
            return self._end(gen, "length")
        gen.emit()
        return False

    def _end(self, gen: Generation, reason: str) -> bool:
        gen.row.finish(reason)
        self._generations.pop(gen.row.seq_id, None)
        self._finish(gen, reason)
        return True

    def _finish(self, gen: Generation, reason: str) -> None:
        gen.stream.finish()
        gen.emit(final=True)
        want = gen.request.logprobs is not None
        gen.result = GenerationResult(
            text=gen.stream.text, token_ids=list(gen.row.output_ids), finish_reason=reason,  # type: ignore[arg-type]
            n_prompt_tokens=len(gen.row.inputs),
            token_logprobs=list(gen.token_logprobs) if want else None,
            top_logprobs=list(gen.top_logprobs) if want else None)
        if gen.on_done is not None:
            gen.on_done(gen)
