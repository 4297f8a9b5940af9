"""The one scoring interface shared by the server, validation sweeps and tests.

Modelled on lm-evaluation-harness's ``LM`` API: a :class:`Scorer` has three abstract, batched methods
(:meth:`Scorer.loglikelihood_tokens`, :meth:`Scorer.prompt_logprobs`, :meth:`Scorer.generate`) that take a
list of requests and return results in the same order. Everything else (text log-likelihoods, multiple
choice, rolling perplexity) is derived from them in the base class, so a new backend overrides three
methods and gets identical tokenization and metric semantics for free.

:class:`HFScorer` implements them for a Hugging Face causal LM with its own KV-cached decode loop, so that
batched requests can be streamed, cancelled and stopped one by one without affecting the others.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: Default scoring window when the model allows more: long windows cost memory, not accuracy.
DEFAULT_MAX_LENGTH_CAP = 2048
#: Upper bound on logits materialised at once when scoring (rows x vocab floats, ~128 MiB in fp32).
_LOGIT_CHUNK_ELEMENTS = 2**25


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
    tag: Hashable = None  # opaque to the scorer; reported to ``before_forward`` (e.g. the row's profile)

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
    def generate(self, requests: Sequence[GenerationRequest], *,
                 before_forward: Callable[[list[GenerationRequest]], None] | None = None) -> list[GenerationResult]:
        """Generate a continuation for each request; results in request order.

        ``before_forward`` is called before every forward pass with the requests of the rows in that
        pass, in row order (mixed-profile batches use it to route each row to its own weights).
        """

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
        results = self.loglikelihood_tokens(all_windows)
        out: list[RollingResult] = []
        pos = 0
        for count in counts:
            group = results[pos : pos + count]
            pos += count
            out.append(RollingResult(sum(r.logprob for r in group), sum(r.n_tokens for r in group)))
        return out


# --------------------------------------------------------------------------------------------- HF backend


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


@dataclass
class _Scored:
    """Per-window scores at the scored positions."""

    logprobs: list[float]
    greedy: list[bool]
    top: list[dict[int, float]] | None


class _TextTracker:
    """Turns a growing list of generated ids into final text and safe streaming deltas.

    Decodes the whole continuation each step (so multi-byte characters split over tokens come out right),
    holds back a trailing partial character and any suffix that could begin a stop string.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, anchor: list[int], stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        # Decoding after one prompt token keeps a leading space that SentencePiece decoders strip from a
        # sequence's first token; unusable if that token is itself half a character.
        anchor_text = self._decode(anchor) if anchor else ""
        self.anchor, self.anchor_text = (anchor, anchor_text) if "\ufffd" not in anchor_text else ([], "")

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self) -> str:
        if not self.anchor:
            return self._decode(self.ids)
        full = self._decode(self.anchor + self.ids)
        return full[len(self.anchor_text) :] if full.startswith(self.anchor_text) else self._decode(self.ids)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text so far, whether a stop string ended it — text then cut before it)."""
        self.ids.append(token_id)
        text = self.text()
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return text[: min(hits)], True
        return text, False

    def delta(self, text: str, final: bool) -> str:
        """The next piece of ``text`` that is safe to stream (everything left, when ``final``)."""
        safe = text
        if not final:
            safe = safe.rstrip("\ufffd")
            for k in range(min(len(safe), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
                if any(s.startswith(safe[-k:]) for s in self.stop):
                    safe = safe[:-k]
                    break
        if len(safe) <= len(self.emitted) or not safe.startswith(self.emitted):
            if final and not safe.startswith(self.emitted):
                logger.warning("streamed text is not a prefix of the final text; stream and result differ")
            return ""
        piece = safe[len(self.emitted) :]
        self.emitted = safe
        return piece


class _GenState:
    """Book-keeping of one request inside a decode batch."""

    def __init__(self, req: GenerationRequest, prompt: list[int], tokenizer: PreTrainedTokenizerBase,
                 device: torch.device) -> None:
        self.req = req
        self.prompt = prompt
        self.tracker = _TextTracker(tokenizer, prompt[-1:], req.stop)
        # Text is decoded every step only for stop strings and streaming; otherwise once at the end.
        self.needs_text = bool(self.tracker.stop) or req.on_text is not None or req.on_delta is not None
        self.delivered = 0  # tokens already sent with an on_delta piece
        self.text = ""
        self.finish: Literal["stop", "length", "cancelled"] | None = None
        self.logprobs: list[float] = []
        self.top: list[dict[int, float]] = []
        self.generator: torch.Generator | None = None
        if req.temperature > 0:
            self.generator = torch.Generator(device=device)
            if req.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(req.seed)

    @property
    def done(self) -> bool:
        return self.finish is not None

    def end(self, reason: Literal["stop", "length", "cancelled"]) -> None:
        self.finish = reason
        if not self.needs_text:
            self.text = self.tracker.text()
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        piece = self.tracker.delta(self.text, final)
        if piece and self.req.on_text is not None:
            self.req.on_text(piece)
        on_delta = self.req.on_delta
        n = len(self.tracker.ids)
        if on_delta is not None and (piece or (final and n > self.delivered)):
            start, self.delivered = self.delivered, n
            want = self.req.logprobs is not None
            on_delta(GenerationDelta(piece, self.tracker.ids[start:n], self.logprobs[start:n] if want else None,
                                     self.top[start:n] if want else None))

    def cancelled(self) -> bool:
        return self.req.is_cancelled is not None and bool(self.req.is_cancelled())

    def result(self) -> GenerationResult:
        assert self.finish is not None
        want = self.req.logprobs is not None
        return GenerationResult(
            text=self.text,
            token_ids=list(self.tracker.ids),
            finish_reason=self.finish,
            n_prompt_tokens=len(self.prompt),
            token_logprobs=list(self.logprobs) if want else None,
            top_logprobs=list(self.top) if want else None,
        )


def _sample(logits: torch.Tensor, req: GenerationRequest, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of float logits with this request's settings."""
    if req.temperature == 0 or generator is None:
        return int(torch.argmax(logits))
    # In float64 and shifted so the top logit is 0: dividing by a tiny temperature (1e-38, even a subnormal
    # 1e-320) sends every other score to -inf instead of overflowing to inf and NaN; the top token stays.
    scores = (logits.double() - logits.max()) / req.temperature
    if req.top_k > 0 and req.top_k < scores.numel():
        kth = torch.topk(scores, req.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if req.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays, even for a
        # top_p so small (1e-320) that it rounds to 0.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= req.top_p
        drop[0] = False
        scores = scores.scatter(0, order[drop], -math.inf)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class HFScorer(Scorer):
    """:class:`Scorer` for a Hugging Face causal LM, on whatever device the model is on.

    Not thread-safe: callers serialise access (the model is shared state). ``batch_size`` bounds how many
    sequences go through one forward pass; ``max_length`` is the scoring window (default: the model's
    maximum positions, capped at :data:`DEFAULT_MAX_LENGTH_CAP`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> None:
        _require_causal_lm(model)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
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
        #: Fills padded slots; never attended to and never scored, so its value does not matter.
        self.pad_token_id: int = pad
        #: Generating any of these ends a request with finish_reason "stop".
        self.eos_token_ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config, tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                self.eos_token_ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        self._head_path: bool | None = None
        if model.training:
            logger.warning("model is in training mode; dropout will make scores noisy (call model.eval())")

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- scoring

    def _use_head_path(self) -> bool:
        """Whether logits can be computed as ``lm_head(base_model(...))`` at chosen positions only.

        That skips the (batch x length x vocab) logits tensor. Checked once against the full forward,
        so models that post-process logits (soft-capping, scaling) fall back to ``logits_to_keep``.
        """
        if self._head_path is None:
            base, head = self.model.base_model, self.model.get_output_embeddings()
            ok = base is not None and base is not self.model and head is not None
            if ok:
                probe = torch.tensor([[self._require_prefix_token()] * 3], device=self.device)
                try:
                    with torch.inference_mode():
                        full = self.model(input_ids=probe, use_cache=False).logits.float()
                        mine = head(base(input_ids=probe, use_cache=False).last_hidden_state).float()
                    ok = full.shape == mine.shape and torch.allclose(full, mine, rtol=1e-3, atol=1e-3)
                except Exception:  # noqa: BLE001 - any failure just means "use the generic path"
                    logger.debug("lm_head(base_model) probe failed", exc_info=True)
                    ok = False
            self._head_path = ok
            logger.debug("scoring via %s", "lm_head at scored positions" if ok else "logits_to_keep")
        return self._head_path

    def _score_windows(self, windows: Sequence[tuple[list[int], list[int]]], top_n: int = 0) -> list[_Scored]:
        """Score ``targets`` against the last ``len(targets)`` positions of each ``(inputs, targets)``.

        Windows are sorted longest first and batched, so batches hold similar lengths and little padding.
        """
        out: list[_Scored | None] = [None] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            for i, scored in zip(idx, self._score_batch([windows[i] for i in idx], top_n)):
                out[i] = scored
        return out  # type: ignore[return-value]

    def _score_batch(self, batch: list[tuple[list[int], list[int]]], top_n: int) -> list[_Scored]:
        width = max(len(inp) for inp, _ in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows: list[int] = []
        cols: list[int] = []
        targets: list[int] = []
        for r, (inp, tgt) in enumerate(batch):
            # Right padding: real tokens keep positions 0..n-1, pads sit after them and are masked.
            ids[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            mask[r, : len(inp)] = 1
            first = len(inp) - len(tgt)
            rows.extend([r] * len(tgt))
            cols.extend(range(first, len(inp)))
            targets.extend(tgt)
        device = self.device
        ids, mask = ids.to(device), mask.to(device)
        row_t = torch.tensor(rows, dtype=torch.long, device=device)
        col_t = torch.tensor(cols, dtype=torch.long, device=device)
        tgt_t = torch.tensor(targets, dtype=torch.long, device=device)
        with torch.inference_mode():
            if self._use_head_path():
                hidden = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                selected = hidden[row_t, col_t]
                head = self.model.get_output_embeddings()
                logits_of = lambda a, b: head(selected[a:b])  # noqa: E731
            else:
                keep = torch.unique(col_t)  # sorted union of scored positions in this batch
                logits = self.model(
                    input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep
                ).logits
                at = torch.searchsorted(keep, col_t)
                logits_of = lambda a, b: logits[row_t[a:b], at[a:b]]  # noqa: E731
            n = len(targets)
            vocab = getattr(self.model.config, "vocab_size", None) or 1
            chunk = max(1, _LOGIT_CHUNK_ELEMENTS // max(vocab, 1))
            lps, greedy, tops_v, tops_i = [], [], [], []
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                logit = logits_of(a, b).float()
                logp = torch.log_softmax(logit, dim=-1)
                lps.append(logp.gather(-1, tgt_t[a:b, None]).squeeze(-1))
                greedy.append(logit.argmax(-1) == tgt_t[a:b])
                if top_n > 0:
                    top = torch.topk(logp, min(top_n, logp.shape[-1]), dim=-1)
                    tops_v.append(top.values)
                    tops_i.append(top.indices)
        lp_list = torch.cat(lps).cpu().tolist() if lps else []
        gr_list = torch.cat(greedy).cpu().tolist() if greedy else []
        tv = torch.cat(tops_v).cpu().tolist() if tops_v else []
        ti = torch.cat(tops_i).cpu().tolist() if tops_i else []
        results: list[_Scored] = []
        pos = 0
        for _, tgt in batch:
            end = pos + len(tgt)
            top = [dict(zip(ti[k], tv[k])) for k in range(pos, end)] if top_n > 0 else None
            results.append(_Scored(lp_list[pos:end], gr_list[pos:end], top))
            pos = end
        return results

    def loglikelihood_tokens(
        self, requests: Sequence[tuple[list[int], list[int]]]
    ) -> list[LoglikelihoodResult]:
        """See :meth:`Scorer.loglikelihood_tokens`; an empty continuation scores (0.0, 0, True)."""
        windows: list[tuple[list[int], list[int]]] = []
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
            if len(inputs) > self.max_length:
                logger.debug("truncating context from %d to %d tokens", len(inputs), self.max_length)
                inputs = inputs[-self.max_length :]
            where.append(len(windows))
            windows.append((inputs, continuation))
        scored = self._score_windows(windows)
        results: list[LoglikelihoodResult] = []
        for w in where:
            if w is None:
                results.append(LoglikelihoodResult(0.0, 0, True))
            else:
                s = scored[w]
                results.append(LoglikelihoodResult(math.fsum(s.logprobs), len(s.logprobs), all(s.greedy)))
        return results

    def prompt_logprobs(self, token_ids: Sequence[list[int]], top_n: int = 0) -> list[PromptLogprobs]:
        """See :meth:`Scorer.prompt_logprobs`; prompts longer than the window are scored in windows."""
        windows: list[tuple[list[int], list[int]]] = []
        spans: list[tuple[int, int]] = []
        for ids in token_ids:
            ids = list(ids)
            parts = rolling_windows(ids[1:], ids[0], self.max_length) if len(ids) > 1 else []
            spans.append((len(windows), len(parts)))
            windows.extend(((ctx + cont)[:-1], cont) for ctx, cont in parts)
        scored = self._score_windows(windows, top_n=top_n)
        out: list[PromptLogprobs] = []
        for ids, (first, count) in zip(token_ids, spans):
            lps: list[float | None] = [None] if ids else []
            tops: list[dict[int, float] | None] = [None] if ids else []
            for s in scored[first : first + count]:
                lps.extend(s.logprobs)
                tops.extend(s.top if s.top is not None else [None] * len(s.logprobs))
            out.append(PromptLogprobs(list(ids), lps, tops))
        return out

    # ---- generation

    def _prompt_of(self, req: GenerationRequest) -> list[int]:
        ids = list(req.prompt_ids) if req.prompt_ids is not None else self.encode(req.prompt or "")
        if not ids:
            ids = [self._require_prefix_token()]
        if self.max_positions is not None and len(ids) + req.max_new_tokens > self.max_positions:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds the model's "
                f"{self.max_positions} positions"
            )
        return ids

    def generate(self, requests: Sequence[GenerationRequest], *,
                 before_forward: Callable[[list[GenerationRequest]], None] | None = None) -> list[GenerationResult]:
        """See :meth:`Scorer.generate`.

        Requests are batched (similar prompt lengths together), left-padded with explicit position ids so
        a batched greedy decode equals a solo one, and decoded with a KV cache. A request that stops,
        runs out of tokens or is cancelled leaves the batch; the others carry on unaffected.
        """
        prompts = [self._prompt_of(r) for r in requests]  # validate everything before any work
        results: list[GenerationResult | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            states = [_GenState(requests[i], prompts[i], self.tokenizer, self.device) for i in idx]
            self._decode_batch(states, before_forward)
            for i, state in zip(idx, states):
                results[i] = state.result()
        return results  # type: ignore[return-value]

    def _step(self, state: _GenState, logits: torch.Tensor, greedy_token: int) -> None:
        """Choose, record and account for one token of one request (``greedy_token``: the row's argmax)."""
        req = state.req
        token = greedy_token if state.generator is None else _sample(logits, req, state.generator)
        if req.on_first_token is not None and not state.tracker.ids:
            req.on_first_token()
        if token in self.eos_token_ids:
            state.end("stop")
            return
        if req.logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            state.logprobs.append(float(logp[token]))
            top: dict[int, float] = {}
            if req.logprobs > 0:
                values, indices = torch.topk(logp, min(req.logprobs, logp.numel()))
                top = dict(zip(indices.tolist(), values.tolist()))
            state.top.append(top)
        if state.needs_text:
            state.text, hit_stop = state.tracker.push(token)
        else:  # nobody reads the text before the end: decode once, in end()
            state.tracker.ids.append(token)
            hit_stop = False
        if hit_stop:
            state.end("stop")
        elif len(state.tracker.ids) >= req.max_new_tokens:
            state.end("length")
        elif state.needs_text:
            state._emit(final=False)

    def _decode_batch(self, states: list[_GenState],
                      before_forward: Callable[[list[GenerationRequest]], None] | None = None) -> None:
        for s in states:
            if s.req.max_new_tokens == 0:
                s.end("length")
            elif s.cancelled():
                s.end("cancelled")
        active = [s for s in states if not s.done]
        if not active:
            return
        device = self.device
        width = max(len(s.prompt) for s in active)
        ids = torch.full((len(active), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(active), width), dtype=torch.long)
        for r, s in enumerate(active):
            ids[r, width - len(s.prompt) :] = torch.tensor(s.prompt, dtype=torch.long)
            mask[r, width - len(s.prompt) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        # Left padding shifts real tokens right; explicit positions keep them at 0..n-1 as in a solo run.
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            if before_forward is not None:
                before_forward([s.req for s in active])
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()
            next_pos = positions[:, -1:] + 1
            while True:
                greedy = logits.argmax(-1).tolist()  # one device sync per step, not one per request
                for r, s in enumerate(active):
                    if s.cancelled():
                        s.end("cancelled")
                    else:
                        self._step(s, logits[r], greedy[r])
                keep = [r for r, s in enumerate(active) if not s.done]
                if not keep:
                    return
                if len(keep) < len(active):
                    keep_t = torch.tensor(keep, dtype=torch.long, device=device)
                    cache.batch_select_indices(keep_t)
                    mask, next_pos = mask[keep_t], next_pos[keep_t]
                    active = [active[r] for r in keep]
                step_ids = torch.tensor([[s.tracker.ids[-1]] for s in active], dtype=torch.long, device=device)
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
                if before_forward is not None:
                    before_forward([s.req for s in active])
                out = self.model(
                    input_ids=step_ids, attention_mask=mask, position_ids=next_pos,
                    past_key_values=cache, use_cache=True,
                )
                cache = out.past_key_values
                logits = out.logits[:, -1, :].float()
                next_pos = next_pos + 1
