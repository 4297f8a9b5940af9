""":class:`HFScorer`: the :class:`~laser_ops.scoring.api.Scorer` of a Hugging Face causal LM.

Every method runs on the continuous-batching core (:mod:`laser_ops.batching`), the same code the
server's engine steps: generation rows decode with a per-row KV cache, scoring windows are prompt-only
rows whose logits are read at the scored positions, and windows that share a context (the
continuations of one multiple-choice question) compute it once. There is one decode loop in the
project, not one per caller.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from laser_ops.batching.engine import BatchEngine
from laser_ops.batching.row_edits import RowRouter
from laser_ops.batching.scheduler import SchedulerConfig
from laser_ops.batching.sequence import Sequence as Row
from laser_ops.scoring.api import (
    DEFAULT_MAX_LENGTH_CAP,
    GenerationRequest,
    GenerationResult,
    LoglikelihoodResult,
    PromptLogprobs,
    Scorer,
    rolling_windows,
)

logger = logging.getLogger(__name__)


def _require_causal_lm(model: PreTrainedModel) -> None:
    """Refuse models that cannot score left-to-right (masked LMs, encoder-decoders)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (tuple, list)) else [value])
    name = type(model).__name__
    config = model.config
    causal = (name in names or name.endswith(("ForCausalLM", "LMHeadModel"))) and not getattr(
        config, "is_encoder_decoder", False
    )
    if not causal:
        raise ValueError(
            f"{name} ({config.model_type}) is not a causal language model; scoring and generation "
            "need P(token | tokens before it), which a masked or encoder-decoder model does not give"
        )


def _max_positions(config: object) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class HFScorer(Scorer):
    """:class:`Scorer` for a Hugging Face causal LM, on whatever device the model is on.

    Not thread-safe: callers serialise access (the model is shared state). ``batch_size`` bounds the
    rows in flight at once (generating, or scoring windows, which mostly last one step);
    ``max_batch_tokens`` the tokens of one step (longer inputs are computed in chunks); ``max_length`` is
    the scoring window (default: the model's maximum positions, capped at :data:`DEFAULT_MAX_LENGTH_CAP`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        max_batch_tokens: int = 4096,
    ) -> None:
        _require_causal_lm(model)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.max_batch_tokens = max(max_batch_tokens, batch_size + 1)
        #: Hard limit on prompt + generated tokens (None if the config does not say).
        self.max_positions = _max_positions(model.config)
        if max_length is None:
            max_length = min(self.max_positions or DEFAULT_MAX_LENGTH_CAP, DEFAULT_MAX_LENGTH_CAP)
        elif self.max_positions is not None and max_length > self.max_positions:
            raise ValueError(f"max_length {max_length} exceeds the model's {self.max_positions} positions")
        super().__init__(tokenizer, max_length)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        #: Fills padded slots of a prompt chunk; never attended to and never scored.
        self.pad_token_id: int = pad
        #: Generating any of these ends a request with finish_reason "stop".
        self.eos_token_ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config, tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                self.eos_token_ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        if model.training:
            logger.warning("model is in training mode; dropout will make scores noisy (call model.eval())")
        self._engine: BatchEngine | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def batch_engine(self, config: SchedulerConfig | None = None, router: RowRouter | None = None) -> BatchEngine:
        """A new continuous-batching engine over this model (the server's engine thread owns one)."""
        config = config or SchedulerConfig(max_running=self.batch_size, max_batch_tokens=self.max_batch_tokens,
                                           prefill_chunk=min(512, self.max_batch_tokens - self.batch_size))
        return BatchEngine(self.model, self.tokenizer, eos_token_ids=self.eos_token_ids,
                           pad_token_id=self.pad_token_id, config=config, router=router)

    def _run(self) -> BatchEngine:
        if self._engine is None:
            self._engine = self.batch_engine()
        return self._engine

    # ---- scoring

    def loglikelihood_tokens(
        self, requests: Sequence[tuple[list[int], list[int]]]
    ) -> list[LoglikelihoodResult]:
        """See :meth:`Scorer.loglikelihood_tokens`; an empty continuation scores (0.0, 0, True).

        Continuations of one context share its computation (see ``BatchEngine.add_scoring``).
        """
        windows, contexts, where = self.loglikelihood_windows(requests)
        engine = self._run()
        job = engine.add_scoring(windows, contexts=contexts)
        engine.run()
        return self.loglikelihood_results(where, job.rows)

    @staticmethod
    def loglikelihood_results(where: Sequence[int | None], rows: Sequence[Row]) -> list[LoglikelihoodResult]:
        """Results of :meth:`loglikelihood_windows` once its rows are scored."""
        results: list[LoglikelihoodResult] = []
        for w in where:
            if w is None:
                results.append(LoglikelihoodResult(0.0, 0, True))
            else:
                row = rows[w]
                results.append(LoglikelihoodResult(math.fsum(row.score_logprobs), len(row.score_logprobs),
                                                   all(row.score_greedy)))
        return results

    def loglikelihood_windows(
        self, requests: Sequence[tuple[list[int], list[int]]]
    ) -> tuple[list[tuple[list[int], list[int]]], list[int | None], list[int | None]]:
        """Scoring windows ``(inputs, targets)`` of (context, continuation) pairs, the context length each
        may share, and for each request the index of its window (None: empty continuation)."""
        windows: list[tuple[list[int], list[int]]] = []
        contexts: list[int | None] = []
        where: list[int | None] = []
        for context, continuation in requests:
            context = list(context) or [self._require_prefix_token()]
            continuation = list(continuation)
            if not continuation:
                where.append(None)
                continue
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"continuation of {len(continuation)} tokens does not fit the {self.max_length}-token window"
                )
            inputs = (context + continuation)[:-1]
            truncated = len(inputs) > self.max_length
            if truncated:
                logger.debug("truncating context from %d to %d tokens", len(inputs), self.max_length)
                inputs = inputs[-self.max_length:]
            where.append(len(windows))
            windows.append((inputs, continuation))
            contexts.append(None if truncated else len(context))
        return windows, contexts, where

    def prompt_logprobs(self, token_ids: Sequence[list[int]], top_n: int = 0) -> list[PromptLogprobs]:
        """See :meth:`Scorer.prompt_logprobs`; prompts longer than the window are scored in windows."""
        windows, spans = self.prompt_windows(token_ids)
        engine = self._run()
        job = engine.add_scoring(windows, top_n=top_n)
        engine.run()
        return self.assemble_prompt_logprobs(token_ids, spans, job.rows, top_n)

    def prompt_windows(self, token_ids: Sequence[list[int]]
                       ) -> tuple[list[tuple[list[int], list[int]]], list[tuple[int, int]]]:
        """Scoring windows covering each sequence (every token after the first scored once), and each
        sequence's (first window, window count)."""
        windows: list[tuple[list[int], list[int]]] = []
        spans: list[tuple[int, int]] = []
        for ids in token_ids:
            ids = list(ids)
            parts = rolling_windows(ids[1:], ids[0], self.max_length) if len(ids) > 1 else []
            spans.append((len(windows), len(parts)))
            windows.extend(((ctx + cont)[:-1], cont) for ctx, cont in parts)
        return windows, spans

    @staticmethod
    def assemble_prompt_logprobs(token_ids: Sequence[list[int]], spans: Sequence[tuple[int, int]],
                                 rows: Sequence[Row], top_n: int) -> list[PromptLogprobs]:
        """Results of :meth:`prompt_windows` once its rows are scored."""
        out: list[PromptLogprobs] = []
        for ids, (first, count) in zip(token_ids, spans, strict=True):
            lps: list[float | None] = [None] if ids else []
            tops: list[dict[int, float] | None] = [None] if ids else []
            for row in rows[first:first + count]:
                lps.extend(row.score_logprobs)
                tops.extend(row.score_top if top_n > 0 else [None] * len(row.score_logprobs))
            out.append(PromptLogprobs(list(ids), lps, tops))
        return out

    # ---- generation

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        """The request's prompt as ids (never empty), checked against the model's positions."""
        ids = list(req.prompt_ids) if req.prompt_ids is not None else self.encode(req.prompt or "")
        if not ids:
            ids = [self._require_prefix_token()]
        if self.max_positions is not None and len(ids) + req.max_new_tokens > self.max_positions:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds the model's "
                f"{self.max_positions} positions"
            )
        return ids

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """See :meth:`Scorer.generate`. Requests run as rows of one continuous batch: a request that
        stops, runs out of tokens or is cancelled leaves it; the others carry on unaffected."""
        prompts = [self.prompt_ids(r) for r in requests]  # validate everything before any work
        engine = self._run()
        gens = [engine.add_generation(req, ids) for req, ids in zip(requests, prompts, strict=True)]
        engine.run()
        return [g.result for g in gens]  # type: ignore[misc]
