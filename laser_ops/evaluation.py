"""The paper's metrics, computed only through the :class:`~laser_ops.scoring.Scorer` interface.

- classification accuracy: the candidate with the highest log-probability is the prediction;
- generation accuracy: greedy-decode N tokens; correct iff a lower-cased, stripped accepted answer
  occurs in the generated continuation (never in the prompt);
- top-k accuracy for single-token answers; mean gold log-loss (-log P(gold | prompt));
- perplexity (sliding window), used as an optional guard against edits that wreck the model.

Every report keeps per-example outcomes so two runs on the same examples can be compared with the
exact McNemar test; accuracies carry a 95% Wilson interval.

:class:`FastChoiceEvaluator` scores one fixed multiple-choice set under many edit profiles much
faster than the plain path, with the same predictions (see its docstring for how).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field
from scipy.stats import binomtest, norm

from laser_ops.datasets import Dataset
from laser_ops.scoring import ChoicePrediction, GenerationRequest, HFScorer, Scorer
from laser_ops.swap import ProfileLike, WeightSwapper

logger = logging.getLogger(__name__)

MetricName = Literal["classification_accuracy", "generation_accuracy", "top_k_accuracy"]


# ---------------------------------------------------------------------------------------------- reports


class ExampleOutcome(BaseModel):
    """What happened on one example (``id`` is the example's id in its source file)."""

    id: int
    correct: bool
    prediction: int | str | None = Field(None, description="MC: chosen index; generation: generated text.")
    gold_logprob: float | None = None


class EvalReport(BaseModel):
    """Accuracy with its Wilson interval, mean gold log-loss, and the per-example outcomes."""

    metric: MetricName
    n: int
    n_correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    log_loss: float | None = None
    perplexity: float | None = None
    skipped: int = Field(0, description="Examples the metric does not apply to (e.g. multi-token answers for top-k).")
    outcomes: list[ExampleOutcome] = Field(default_factory=list)

    @property
    def correct(self) -> list[bool]:
        return [o.correct for o in self.outcomes]

    def summary(self) -> dict[str, Any]:
        """The report without per-example outcomes (for tables and progress messages)."""
        return self.model_dump(exclude={"outcomes"})


def _report(metric: MetricName, outcomes: list[ExampleOutcome], skipped: int = 0) -> EvalReport:
    n = len(outcomes)
    k = sum(o.correct for o in outcomes)
    lo, hi = wilson_interval(k, n)
    gold = [o.gold_logprob for o in outcomes if o.gold_logprob is not None]
    log_loss = -math.fsum(gold) / len(gold) if gold else None
    return EvalReport(metric=metric, n=n, n_correct=k, accuracy=k / n if n else 0.0, ci_low=lo, ci_high=hi,
                      log_loss=log_loss, skipped=skipped, outcomes=outcomes)


def report_from_predictions(dataset: Dataset, predictions: Sequence[ChoicePrediction]) -> EvalReport:
    """Classification report of multiple-choice predictions (one per example, in order)."""
    if len(predictions) != len(dataset.examples):
        raise ValueError(f"{len(predictions)} predictions for {len(dataset.examples)} examples")
    outcomes = [
        ExampleOutcome(id=ex.id, correct=p.index in ex.correct, prediction=p.index, gold_logprob=p.logprobs[ex.gold])
        for ex, p in zip(dataset.examples, predictions)
    ]
    return _report("classification_accuracy", outcomes)


# ---------------------------------------------------------------------------------------------- metrics


def evaluate_multiple_choice(scorer: Scorer, dataset: Dataset, *, normalize: bool = False) -> EvalReport:
    """Classification accuracy and gold log-loss via ``scorer.predict_choices`` (the reference path)."""
    _require_kind(dataset, "multiple_choice")
    return report_from_predictions(dataset, scorer.predict_choices(dataset.choice_items(), normalize=normalize))


def generation_prompt(dataset: Dataset, index: int) -> str:
    """The prompt to decode from: trailing spaces go, so BPE models generate ``" Paris"`` as one token."""
    return dataset.prompt(dataset.examples[index]).rstrip(" ")


def answer_in(generated: str, targets: Sequence[str]) -> bool:
    """Generation correctness: a lower-cased, stripped accepted answer occurs in the generated text."""
    text = generated.lower()
    return any(t.strip().lower() and t.strip().lower() in text for t in targets)


def evaluate_generation(
    scorer: Scorer,
    dataset: Dataset,
    *,
    max_new_tokens: int = 10,
    stop: Sequence[str] = (),
    with_log_loss: bool = True,
) -> EvalReport:
    """Generation accuracy: greedy ``max_new_tokens`` tokens; only the continuation is searched."""
    _require_kind(dataset, "generation")
    requests = [
        GenerationRequest(prompt=generation_prompt(dataset, i), max_new_tokens=max_new_tokens, temperature=0.0,
                          stop=list(stop))
        for i in range(len(dataset))
    ]
    results = scorer.generate(requests)
    gold: list[float | None] = [None] * len(dataset)
    if with_log_loss:
        scored = scorer.loglikelihood([(dataset.prompt(e), e.gold_text) for e in dataset.examples])
        gold = [r.logprob for r in scored]
    outcomes = [
        ExampleOutcome(id=ex.id, correct=answer_in(r.text, ex.targets), prediction=r.text, gold_logprob=g)
        for ex, r, g in zip(dataset.examples, results, gold)
    ]
    return _report("generation_accuracy", outcomes)


def evaluate_top_k(scorer: Scorer, dataset: Dataset, *, k: int = 10) -> EvalReport:
    """Top-k accuracy: the gold answer's single token is among the k most likely next tokens.

    Only examples whose gold answer (MC: the gold choice; generation: the first target) is exactly one
    token after the prompt count; the others are reported in ``skipped``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    seqs: list[list[int]] = []
    kept: list[int] = []
    for i, ex in enumerate(dataset.examples):
        ctx, cont = scorer.encode_pair(dataset.prompt(ex), ex.gold_text)
        if len(cont) == 1:
            seqs.append(ctx + cont)
            kept.append(i)
    scored = scorer.prompt_logprobs(seqs, top_n=k) if seqs else []
    outcomes = []
    for i, seq, s in zip(kept, seqs, scored):
        top = s.top_logprobs[-1] or {}
        outcomes.append(ExampleOutcome(id=dataset.examples[i].id, correct=seq[-1] in top,
                                       prediction=max(top, key=top.__getitem__) if top else None,
                                       gold_logprob=s.token_logprobs[-1]))
    return _report("top_k_accuracy", outcomes, skipped=len(dataset) - len(kept))


def evaluate(scorer: Scorer, dataset: Dataset, *, max_new_tokens: int = 10, normalize: bool = False) -> EvalReport:
    """The paper's metric for the dataset's kind (classification or generation accuracy)."""
    if dataset.kind == "multiple_choice":
        return evaluate_multiple_choice(scorer, dataset, normalize=normalize)
    return evaluate_generation(scorer, dataset, max_new_tokens=max_new_tokens)


def perplexity(scorer: Scorer, texts: Sequence[str], *, max_length: int | None = None,
               stride: int | None = None) -> float:
    """Corpus perplexity exp(-sum log p / tokens) over sliding windows (NaN for no tokens)."""
    results = scorer.loglikelihood_rolling(list(texts), max_length=max_length, stride=stride)
    n = sum(r.n_tokens for r in results)
    return math.exp(-math.fsum(r.logprob for r in results) / n) if n else math.nan


def _require_kind(dataset: Dataset, kind: str) -> None:
    if dataset.kind != kind:
        raise ValueError(f"dataset {dataset.name!r} is {dataset.kind}, this metric needs {kind}")


# ---------------------------------------------------------------------------------------------- statistics


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there is no data.

    Preferred over the normal interval because it stays inside [0, 1] and behaves near 0 and 1.
    """
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    z = float(norm.ppf(1 - (1 - confidence) / 2))
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test of B against A on the same examples."""

    only_a: int  # A right, B wrong
    only_b: int  # A wrong, B right
    p_value: float
    alpha: float
    verdict: str

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha

    def to_dict(self) -> dict[str, Any]:
        return {"only_a": self.only_a, "only_b": self.only_b, "p_value": self.p_value, "alpha": self.alpha,
                "significant": self.significant, "verdict": self.verdict}


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool], *, alpha: float = 0.05,
                  names: tuple[str, str] = ("base", "edited")) -> McNemarResult:
    """Two-sided exact McNemar: a binomial test (p = 1/2) on the discordant pairs only.

    Agreements carry no information about which model is better, so only the examples exactly one
    of the two gets right count.
    """
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired outcomes differ in length: {len(a_correct)} vs {len(b_correct)}")
    only_a = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    only_b = sum(1 for a, b in zip(a_correct, b_correct) if b and not a)
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(binomtest(only_b, discordant, 0.5, alternative="two-sided").pvalue)
    a_name, b_name = names
    if discordant == 0:
        verdict = f"no discordant examples: {a_name} and {b_name} are right on exactly the same examples"
    elif p < alpha:
        better = b_name if only_b > only_a else a_name
        verdict = (f"significant at {alpha:g}: {better} is better ({b_name} fixes {only_b}, breaks {only_a}; "
                   f"p={p:.3g})")
    else:
        verdict = f"not significant at {alpha:g} ({b_name} fixes {only_b}, breaks {only_a}; p={p:.3g})"
    return McNemarResult(only_a, only_b, p, alpha, verdict)


# ---------------------------------------------------------------------------------------------- fast path


#: Llama-family models whose decoder layers can be driven directly (plain RoPE, full causal attention).
FAST_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class _KV:
    """Duck-typed stand-in for a transformers ``Cache``: attention layers only call ``update``.

    ``record`` keeps each layer's keys/values (the shared prompt prefix); ``prefix`` puts the
    recorded ones in front of a batch's own; ``fixed`` ignores the new ones and returns the stored
    full keys/values (the last layer, run at scored positions only).
    """

    def __init__(self, store: dict[int, tuple[torch.Tensor, torch.Tensor]], mode: str) -> None:
        self.store = store
        self.mode = mode

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "record":
            self.store[layer_idx] = (key, value)
            return key, value
        if self.mode == "fixed":
            return self.store[layer_idx]
        pk, pv = self.store[layer_idx]
        b = key.shape[0]
        return (torch.cat([pk.expand(b, -1, -1, -1), key], dim=2),
                torch.cat([pv.expand(b, -1, -1, -1), value], dim=2))


@dataclass
class _Rows:
    """Padded packed rows (or the shared prefix row) and everything that does not depend on weights."""

    ids: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, 1, T, P + T): bool (sdpa) or additive float (eager)
    sel_cols: torch.Tensor | None = None  # (B, S) columns of the scored positions, padded with 0
    sel_mask: torch.Tensor | None = None  # (B, 1, S, P + T)
    sel_flat: torch.Tensor | None = None  # (N,) index into the flattened (B * S) scored positions
    targets: torch.Tensor | None = None  # (N,)
    spans: list[tuple[int, int, int, int]] | None = None  # (item, choice, start, stop) into the N scores


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class FastChoiceEvaluator:
    """Multiple-choice predictions for one fixed item set under many edit profiles, fast.

    Equal to ``scorer.predict_choices(items)`` (same tokenization via ``scorer.encode_pair``, same
    truncation, ties to the lowest index) but much cheaper per profile:

    - all candidates of a prompt share one packed row: the prompt once, then each candidate's tokens
      with a block mask (a candidate sees the prompt and itself) and positions restarting after the
      prompt, so the prompt is computed once per example, not once per candidate;
    - the token prefix every row shares (a task instruction) is computed once per profile and fed to
      every batch as cached keys/values;
    - rows are batched by length; the last layer and the logits run at scored positions only;
    - the hidden state entering layer ``l`` is cached (an LRU bounded in bytes): an edit at layer ``l``
      cannot change anything below it, so a profile whose lowest edited layer is ``l`` reruns only
      layers ``>= l``.

    The layer path drives the decoder layers directly and exists for the Llama family
    (:data:`FAST_MODEL_TYPES`); other models, and any model whose start-up probe disagrees with the
    plain path, are scored through ``scorer.predict_choices`` (same predictions, no speed-up).
    Must run on the thread that owns the model (see :class:`~laser_ops.swap.WeightSwapper`).
    """

    def __init__(
        self,
        scorer: HFScorer,
        items: Sequence[tuple[str, Sequence[str]]],
        *,
        batch_size: int = 16,
        max_cache_bytes: int = 1 << 30,
        normalize: bool = False,
        verify: bool = True,
    ) -> None:
        self.scorer = scorer
        self.model = scorer.model
        self.items = [(c, list(ch)) for c, ch in items]
        self.batch_size = batch_size
        self.max_cache_bytes = max_cache_bytes
        self.normalize = normalize
        self._states: OrderedDict[int, tuple[torch.Tensor | None, list[torch.Tensor]]] = OrderedDict()
        self._state_bytes = 0
        self._packed: tuple[_Rows | None, list[_Rows]] | None = None
        self.prefix_len = 0
        self.fast = self._supports_fast_path()
        if self.fast and verify:
            self.fast = self._probe()
        logger.info("fast choice evaluator: %s path for %d items", "layer-cached" if self.fast else "plain",
                    len(self.items))

    # ---- public

    def predict(self, min_layer: int = 0) -> list[ChoicePrediction]:
        """Predictions under the live weights, assuming no layer below ``min_layer`` is edited."""
        if not self.fast:
            return self.scorer.predict_choices(self.items, normalize=self.normalize)
        out = []
        for (_, choices), (lps, ns, greedy) in zip(self.items, self._score(min_layer)):
            key = [lp / max(n, 1) if self.normalize else lp for lp, n in zip(lps, ns)]
            best = max(range(len(choices)), key=lambda i: (key[i], -i))
            out.append(ChoicePrediction(index=best, logprobs=lps, n_tokens=ns, is_greedy=greedy))
        return out

    def evaluate_profile(self, swapper: WeightSwapper, specs: ProfileLike) -> list[ChoicePrediction]:
        """Apply ``specs`` for the duration of the call and predict, rerunning only the edited layers up."""
        edits = swapper.plan(specs)
        min_layer = min((e.ref.layer for e in edits), default=swapper.targets.num_layers)
        with swapper.applied_profile(specs):
            return self.predict(min_layer)

    def clear_cache(self) -> None:
        self._states.clear()
        self._state_bytes = 0

    # ---- set-up

    def _supports_fast_path(self) -> bool:
        cfg = self.model.config
        base = getattr(self.model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if cfg.model_type not in FAST_MODEL_TYPES or base is None or not all(hasattr(base, a) for a in needed):
            return False
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            return False  # the block mask has no window
        attn = base.layers[-1].self_attn
        if not all(hasattr(attn, a) for a in ("k_proj", "v_proj", "head_dim")):
            return False
        return getattr(cfg, "_attn_implementation", "eager") in ("sdpa", "eager") and \
            self.model.get_output_embeddings() is not None

    def _probe(self) -> bool:
        """Compare the layer path with the plain scorer on a few items; any disagreement disables it."""
        sample = self.items[:3]
        if not sample:
            return True
        plain = self.scorer.predict_choices(sample)
        saved = self.items
        try:
            self.items = sample
            self._packed = None
            mine = self._score(0)
        except Exception:  # noqa: BLE001 - an unexpected layer signature just means "use the plain path"
            logger.warning("fast evaluator probe failed; using the plain path", exc_info=True)
            return False
        finally:
            self.items = saved
            self._packed = None
            self.clear_cache()
        worst = max(abs(a - b) for p, (lps, _, _) in zip(plain, mine) for a, b in zip(p.logprobs, lps))
        if worst > 1e-3:
            logger.warning("fast evaluator disagrees with the plain path by %.2g; using the plain path", worst)
            return False
        return True

    def _pack(self) -> tuple[_Rows | None, list[_Rows]]:
        """Tokenize once; split off the shared prefix; build padded batches of packed rows."""
        sc = self.scorer
        rows: list[tuple[list[int], list[int], list[tuple[int, int, int, list[int]]]]] = []
        for item, (context, choices) in enumerate(self.items):
            pairs = [sc.encode_pair(context, c) for c in choices]
            ctx = list(pairs[0][0]) or [sc._require_prefix_token()]
            live = [(j, list(cont)) for j, (_, cont) in enumerate(pairs) if cont]
            if not live:
                continue
            fits = all(len(ctx) + len(cont) - 1 <= sc.max_length for _, cont in live)
            groups = [(ctx, live)] if fits else []
            if not fits:  # truncate per candidate exactly as the plain path does
                for j, cont in live:
                    if len(cont) > sc.max_length:
                        raise ValueError(f"continuation of {len(cont)} tokens does not fit the "
                                         f"{sc.max_length}-token window")
                    inputs = (ctx + cont)[:-1][-sc.max_length:]
                    groups.append((inputs[: len(inputs) - (len(cont) - 1)], [(j, cont)]))
            for g_ctx, cands in groups:
                ids, pos = list(g_ctx), list(range(len(g_ctx)))
                packed: list[tuple[int, int, int, list[int]]] = []  # (item, choice, first column, tokens)
                for j, cont in cands:
                    packed.append((item, j, len(ids), cont))
                    ids.extend(cont[:-1])
                    pos.extend(range(len(g_ctx), len(g_ctx) + len(cont) - 1))
                rows.append((ids, pos, packed))
        # The shared prefix must leave every row's last context token (the first scored position) out.
        prefix = 0
        if len(rows) > 1:
            first = rows[0][0]
            limit = min(cands[0][2] for _, _, cands in rows) - 1
            while prefix < limit and all(r[0][prefix] == first[prefix] for r in rows):
                prefix += 1
        self.prefix_len = prefix
        device = self.model.device
        prefix_rows = None
        if prefix:
            allowed = torch.tril(torch.ones(prefix, prefix, dtype=torch.bool))[None, None]
            prefix_rows = _Rows(torch.tensor([rows[0][0][:prefix]], device=device),
                                torch.arange(prefix, device=device)[None], self._mask(allowed).to(device))
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
        batches = [self._batch([rows[r] for r in order[s : s + self.batch_size]], prefix)
                   for s in range(0, len(order), self.batch_size)]
        return prefix_rows, batches

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        if getattr(self.model.config, "_attn_implementation", "eager") != "eager":
            return allowed
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    def _batch(self, chunk: list[tuple[list[int], list[int], list[tuple[int, int, int, list[int]]]]],
               prefix: int) -> _Rows:
        width = max(len(ids) for ids, _, _ in chunk) - prefix
        B = len(chunk)
        ids_t = torch.full((B, width), self.scorer.pad_token_id, dtype=torch.long)
        pos_t = torch.zeros((B, width), dtype=torch.long)
        allowed = torch.zeros((B, width, prefix + width), dtype=torch.bool)
        allowed[:, :, :prefix] = True
        allowed[:, torch.arange(width), prefix + torch.arange(width)] = True  # pads see themselves: no NaN rows
        cols: list[list[int]] = []
        targets: list[int] = []
        spans: list[tuple[int, int, int, int]] = []
        for b, (ids, pos, cands) in enumerate(chunk):
            n = len(ids) - prefix
            ids_t[b, :n] = torch.tensor(ids[prefix:])
            pos_t[b, :n] = torch.tensor(pos[prefix:])
            ctx = cands[0][2]  # columns below are absolute (prefix included)
            allowed[b, : ctx - prefix, prefix:ctx] = torch.tril(torch.ones(ctx - prefix, ctx - prefix,
                                                                           dtype=torch.bool))
            row_cols: list[int] = []
            for item, j, begin, cont in cands:
                end = begin + len(cont) - 1
                allowed[b, begin - prefix : end - prefix, prefix:ctx] = True
                allowed[b, begin - prefix : end - prefix, begin:end] = torch.tril(
                    torch.ones(end - begin, end - begin, dtype=torch.bool))
                spans.append((item, j, len(targets), len(targets) + len(cont)))
                row_cols.extend([ctx - 1 - prefix, *range(begin - prefix, end - prefix)])
                targets.extend(cont)
            cols.append(row_cols)
        width_sel = max(len(c) for c in cols)
        sel = torch.zeros((B, width_sel), dtype=torch.long)
        flat: list[int] = []
        for b, c in enumerate(cols):
            sel[b, : len(c)] = torch.tensor(c)
            flat.extend(b * width_sel + i for i in range(len(c)))
        sel_allowed = allowed[torch.arange(B)[:, None], sel]  # (B, S, P + T)
        device = self.model.device
        return _Rows(ids_t.to(device), pos_t.to(device), self._mask(allowed[:, None]).to(device),
                     sel.to(device), self._mask(sel_allowed[:, None]).to(device),
                     torch.tensor(flat, device=device), torch.tensor(targets, device=device), spans)

    # ---- scoring

    def _layers(self, h: torch.Tensor, rows: _Rows, start: int, stop: int, kv: _KV | None) -> torch.Tensor:
        if start >= stop:
            return h
        base = self.model.model
        cos_sin = base.rotary_emb(h, rows.positions)
        for layer in base.layers[start:stop]:
            h = layer(h, attention_mask=rows.mask, position_ids=rows.positions, position_embeddings=cos_sin,
                      past_key_values=kv, use_cache=False)
            if isinstance(h, tuple):  # older transformers return (hidden, ...)
                h = h[0]
        return h

    def _advance(self, states: tuple[torch.Tensor | None, list[torch.Tensor]], start: int, stop: int
                 ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Run the prefix row and every batch through layers ``start:stop`` under the live weights."""
        prefix_rows, batches = self._packed  # type: ignore[misc]
        store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        p_state = states[0]
        if prefix_rows is not None and p_state is not None:
            p_state = self._layers(p_state, prefix_rows, start, stop, _KV(store, "record"))
        kv = _KV(store, "prefix") if prefix_rows is not None else None
        return p_state, [self._layers(h, b, start, stop, kv) for h, b in zip(states[1], batches)]

    def _state_entering(self, layer: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Hidden states entering ``layer`` (the weights below it are unedited by contract)."""
        cached = self._states.get(layer)
        if cached is not None:
            self._states.move_to_end(layer)
            return cached
        below = [j for j in self._states if j < layer]
        if below:
            start = max(below)
            states = self._states[start]
        else:
            prefix_rows, batches = self._packed  # type: ignore[misc]
            embed = self.model.model.embed_tokens
            start = 0
            states = (embed(prefix_rows.ids) if prefix_rows is not None else None, [embed(b.ids) for b in batches])
        # Walk up one layer at a time and keep every intermediate state: all of them are base states
        # (nothing below ``layer`` is edited), and ascending inserts make the LRU evict low layers first.
        for j in range(start, layer):
            states = self._advance(states, j, j + 1)
            self._remember(j + 1, states)
        return states

    def _remember(self, layer: int, states: tuple[torch.Tensor | None, list[torch.Tensor]]) -> None:
        def nbytes(s: tuple[torch.Tensor | None, list[torch.Tensor]]) -> int:
            return sum(t.numel() * t.element_size() for t in ([s[0]] if s[0] is not None else []) + s[1])

        size = nbytes(states)
        if size > self.max_cache_bytes:
            return
        if layer in self._states:
            self._state_bytes -= nbytes(self._states.pop(layer))
        self._states[layer] = states
        self._state_bytes += size
        while self._state_bytes > self.max_cache_bytes:
            _, old = self._states.popitem(last=False)
            self._state_bytes -= nbytes(old)

    def _last_layer_at_scored(self, h: torch.Tensor, rows: _Rows, kv: _KV | None) -> torch.Tensor:
        """The last decoder layer for scored positions only: keys/values for all, the rest for few."""
        base = self.model.model
        layer = base.layers[-1]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        B, T, _ = x.shape
        cos, sin = base.rotary_emb(x, rows.positions)
        k = attn.k_proj(x).view(B, T, -1, attn.head_dim)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        k = _rope(k.transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        idx = len(base.layers) - 1
        if kv is not None:
            k, v = kv.update(k, v, idx)
        assert rows.sel_cols is not None
        h_sel = h[torch.arange(B, device=h.device)[:, None], rows.sel_cols]
        pos_sel = rows.positions.gather(1, rows.sel_cols)
        cos_sin = base.rotary_emb(h_sel, pos_sel)
        out = layer(h_sel, attention_mask=rows.sel_mask, position_ids=pos_sel, position_embeddings=cos_sin,
                    past_key_values=_KV({idx: (k, v)}, "fixed"), use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def _score(self, min_layer: int) -> list[tuple[list[float], list[int], list[bool]]]:
        if self._packed is None:
            self._packed = self._pack()
        prefix_rows, batches = self._packed
        num_layers = len(self.model.model.layers)
        last = num_layers - 1
        min_layer = max(0, min(min_layer, last))
        head = self.model.get_output_embeddings()
        scores: dict[tuple[int, int], tuple[float, int, bool]] = {}
        with torch.inference_mode():
            p_state, states = self._state_entering(min_layer)
            store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            if prefix_rows is not None and p_state is not None:
                self._layers(p_state, prefix_rows, min_layer, num_layers, _KV(store, "record"))
            kv = _KV(store, "prefix") if prefix_rows is not None else None
            for h, rows in zip(states, batches):
                h = self._layers(h, rows, min_layer, last, kv)
                h = self._last_layer_at_scored(h, rows, kv)
                h = self.model.model.norm(h.reshape(-1, h.shape[-1])[rows.sel_flat])
                logits = head(h).float()
                tok = torch.log_softmax(logits, dim=-1).gather(-1, rows.targets[:, None]).squeeze(-1).tolist()
                greedy = (logits.argmax(-1) == rows.targets).tolist()
                for item, j, a, b in rows.spans or []:
                    scores[(item, j)] = (math.fsum(tok[a:b]), b - a, all(greedy[a:b]))
        out = []
        for item, (_, choices) in enumerate(self.items):
            res = [scores.get((item, j), (0.0, 0, True)) for j in range(len(choices))]
            out.append(([r[0] for r in res], [r[1] for r in res], [r[2] for r in res]))
        return out
