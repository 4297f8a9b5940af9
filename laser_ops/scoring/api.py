"""The one scoring interface shared by the server, validation sweeps and tests: requests, results, ``Scorer``.

Modelled on lm-evaluation-harness's ``LM`` API: a :class:`Scorer` has three abstract, batched methods
(:meth:`Scorer.loglikelihood_tokens`, :meth:`Scorer.prompt_logprobs`, :meth:`Scorer.generate`) that take a
list of requests and return results in the same order. Everything else (text log-likelihoods, multiple
choice, rolling perplexity) is derived from them in the base class, so a new backend overrides three
methods and gets identical tokenization and metric semantics for free.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: Default scoring window when the model allows more: long windows cost memory, not accuracy.
DEFAULT_MAX_LENGTH_CAP = 2048


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LoglikelihoodResult:
    """log P(continuation | context), summed over ``n_tokens`` continuation tokens.

    ``is_greedy`` is True iff every continuation token is the argmax at its position (lm-eval's meaning).
    """

    logprob: float
    n_tokens: int
    is_greedy: bool


@dataclass(frozen=True)
class ChoicePrediction:
    """The chosen candidate (``index``) and the per-candidate scores it was chosen from."""

    index: int
    logprobs: list[float]
    n_tokens: list[int]
    is_greedy: list[bool]


@dataclass(frozen=True)
class RollingResult:
    """Total log-likelihood of a whole text, every token scored exactly once."""

    logprob: float
    n_tokens: int

    @property
    def perplexity(self) -> float:
        """exp(-mean token log-prob); NaN for an empty text (no evidence either way)."""
        if self.n_tokens == 0:
            return math.nan
        return math.exp(-self.logprob / self.n_tokens)


@dataclass(frozen=True)
class PromptLogprobs:
    """Per-token log-probs of a prompt, aligned one-to-one with ``token_ids`` (OpenAI ``echo`` layout).

    The first entry of ``token_logprobs`` and ``top_logprobs`` is None (nothing conditions it);
    ``top_logprobs`` entries are None throughout when no top-N was requested.
    """

    token_ids: list[int]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]


@dataclass
class GenerationRequest:
    """One generation request; give exactly one of ``prompt`` (text) or ``prompt_ids`` (token ids).

    ``temperature`` 0 means greedy; ``top_k`` 0 and ``top_p`` 1 switch those filters off. ``seed`` seeds a
    per-request generator, so a seed reproduces the same text whatever else shares the batch.
    ``on_text`` receives text deltas as they are decoded (their concatenation is the final text);
    ``is_cancelled`` is polled before the prompt is processed and before every token. ``logprobs`` (N) records the chosen token's log-prob and the
    top-N alternatives under the model's raw distribution (before temperature and filtering).
    ``on_delta`` is ``on_text`` with the tokens that produced each piece (:class:`GenerationDelta`), so a
    stream can send each delta's log-probs with it; the deltas' tokens together are the result's tokens.
    """

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None
    is_cancelled: Callable[[], bool] | None = None
    logprobs: int | None = None
    on_first_token: Callable[[], None] | None = None  # called once, when the first token is chosen (TTFT)
    on_delta: Callable[[GenerationDelta], None] | None = None

    def __post_init__(self) -> None:
        # Fail at construction, where the caller can still map the error to a 400, not mid-batch.
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("GenerationRequest needs exactly one of prompt or prompt_ids")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]


@dataclass(frozen=True)
class GenerationDelta:
    """One streamed piece of text and the tokens decoded since the previous piece (with their log-probs when
    the request asked for them). A piece may hold several tokens: text is held back while a token ends inside
    a multi-byte character or could begin a stop string."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


@dataclass(frozen=True)
class GenerationResult:
    """Generated text and ids (EOS excluded).

    On a stop string, ``text`` is cut just before it while ``token_ids`` keep every generated token.
    """

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "cancelled"]
    n_prompt_tokens: int
    token_logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


# --------------------------------------------------------------------------------------------- helpers


def rolling_windows(
    tokens: Sequence[int], prefix_token: int, max_length: int, stride: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Split ``tokens`` into (context, continuation) windows that score every token exactly once.

    The sequence is ``[prefix_token] + tokens``; each window's model input (context + continuation minus
    its last token) is at most ``max_length`` long. The first window scores up to ``max_length`` tokens;
    each later one scores the next ``stride`` tokens, conditioned on as much preceding text as fits, so a
    smaller stride buys more context per token at the cost of more forward passes.
    """
    stride = max_length if stride is None else stride
    if max_length < 1 or not 1 <= stride <= max_length:
        raise ValueError(f"need 1 <= stride <= max_length, got stride={stride}, max_length={max_length}")
    seq = [prefix_token, *tokens]
    n = len(tokens)
    windows: list[tuple[list[int], list[int]]] = []
    done = 0  # tokens[:done] are scored; tokens[i] is seq[i + 1]
    while done < n:
        end = min(done + (max_length if done == 0 else stride), n)
        start = max(0, end - max_length)
        windows.append((seq[start : done + 1], seq[done + 1 : end + 1]))
        done = end
    return windows


def _default_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The BOS the tokenizer puts in front of text by default ([] if none), found by asking it."""
    with_special = tokenizer("a").input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and len(with_special) > len(without) and with_special[0] == bos:
        return [bos]
    return []


# --------------------------------------------------------------------------------------------- Scorer


class Scorer(ABC):
    """Batched scoring and generation over one model and its tokenizer.

    What to override: :meth:`loglikelihood_tokens`, :meth:`prompt_logprobs` and :meth:`generate`;
    everything else (tokenization, :meth:`loglikelihood`, :meth:`predict_choice(s)`,
    :meth:`loglikelihood_rolling`) is derived, so every backend shares the same semantics.
    Subclasses call ``super().__init__(tokenizer, max_length)``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer = tokenizer
        #: Longest model input a scoring window may have.
        self.max_length = max_length
        #: Prepended by :meth:`encode` when the tokenizer adds a BOS by default (models trained with it).
        self.prefix_ids: list[int] = _default_prefix(tokenizer)
        #: Conditions the first token when there is no context (BOS, else EOS, like lm-eval).
        self.prefix_token_id: int | None = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )

    # ---- the three methods a backend provides

    @abstractmethod
    def loglikelihood_tokens(
        self, requests: Sequence[tuple[list[int], list[int]]]
    ) -> list[LoglikelihoodResult]:
        """Score each (context ids, continuation ids); an empty context means :attr:`prefix_token_id`.

        Contexts longer than the window are truncated on the left; results come in request order.
        """

    @abstractmethod
    def prompt_logprobs(self, token_ids: Sequence[list[int]], top_n: int = 0) -> list[PromptLogprobs]:
        """Log-prob of every token of each sequence given the ones before it (first entry None)."""

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate a continuation for each request; results in request order (requests run concurrently;
        each one's tokens do not depend on what else runs beside it)."""

    # ---- tokenization

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with the tokenizer's default BOS but no other special tokens."""
        return self.prefix_ids + self._encode_raw(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _encode_raw(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids) if text else []

    def _require_prefix_token(self) -> int:
        if self.prefix_token_id is None:
            raise ValueError("tokenizer has neither a BOS nor an EOS token to condition the first token on")
        return self.prefix_token_id

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) the way lm-eval splits them.

        Trailing whitespace of the context moves onto the continuation (BPE merges a space with the
        following word); the continuation's ids are taken from the encoding of the whole string so they
        are the ids the model would actually see. An empty context becomes ``[prefix_token_id]``.
        """
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        if not context:
            return [self._require_prefix_token()], self._encode_raw(continuation)
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    # ---- derived metrics

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LoglikelihoodResult]:
        """log P(continuation | context) for each (context, continuation) text pair."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def predict_choices(
        self, items: Sequence[tuple[str, Sequence[str]]], normalize: bool = False
    ) -> list[ChoicePrediction]:
        """Multiple choice for many prompts at once: all candidates of all prompts go in one call.

        The prediction is the candidate with the highest summed log-prob (divided by its token count when
        ``normalize``); ties go to the lowest index.
        """
        flat: list[tuple[str, str]] = []
        for context, choices in items:
            if not choices:
                raise ValueError(f"no choices given for context {context!r}")
            flat.extend((context, choice) for choice in choices)
        results = self.loglikelihood(flat)
        predictions: list[ChoicePrediction] = []
        pos = 0
        for _, choices in items:
            group = results[pos : pos + len(choices)]
            pos += len(choices)
            scores = [r.logprob / max(r.n_tokens, 1) if normalize else r.logprob for r in group]
            best = max(range(len(scores)), key=lambda i: (scores[i], -i))
            predictions.append(
                ChoicePrediction(
                    index=best,
                    logprobs=[r.logprob for r in group],
                    n_tokens=[r.n_tokens for r in group],
                    is_greedy=[r.is_greedy for r in group],
                )
            )
        return predictions

    def predict_choice(
        self, context: str, choices: Sequence[str], normalize: bool = False
    ) -> ChoicePrediction:
        """Pick the candidate continuation the model finds most likely (see :meth:`predict_choices`)."""
        return self.predict_choices([(context, choices)], normalize=normalize)[0]

    def loglikelihood_rolling(
        self, texts: Sequence[str], max_length: int | None = None, stride: int | None = None
    ) -> list[RollingResult]:
        """Whole-text log-likelihood over sliding windows (for perplexity).

        Windows are ``max_length`` long (default :attr:`max_length`) and advance by ``stride`` (default
        ``max_length``, i.e. disjoint); each token is scored exactly once, the first conditioned on
        :attr:`prefix_token_id`. All windows of all texts are scored in one batched call.
        """
        pairs, counts = self.rolling_pairs(texts, max_length, stride)
        return self.rolling_results(self.loglikelihood_tokens(pairs), counts)

    def rolling_pairs(self, texts: Sequence[str], max_length: int | None = None, stride: int | None = None
                      ) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
        """The (context, continuation) windows of :meth:`loglikelihood_rolling`, and how many each text has."""
        max_length = self.max_length if max_length is None else max_length
        if max_length > self.max_length:
            raise ValueError(f"max_length {max_length} exceeds this scorer's window {self.max_length}")
        prefix = self._require_prefix_token()
        all_windows: list[tuple[list[int], list[int]]] = []
        counts: list[int] = []
        for text in texts:
            windows = rolling_windows(self._encode_raw(text), prefix, max_length, stride)
            all_windows.extend(windows)
            counts.append(len(windows))
        return all_windows, counts

    @staticmethod
    def rolling_results(results: Sequence[LoglikelihoodResult], counts: Sequence[int]) -> list[RollingResult]:
        """Sum each text's window results (see :meth:`rolling_pairs`)."""
        out: list[RollingResult] = []
        pos = 0
        for count in counts:
            group = results[pos : pos + count]
            pos += count
            out.append(RollingResult(sum(r.logprob for r in group), sum(r.n_tokens for r in group)))
        return out
