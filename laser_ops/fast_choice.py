"""Multiple-choice predictions for one fixed item set under many edit profiles, fast, on any causal LM.

:class:`FastChoiceEvaluator` returns what ``scorer.predict_choices(items)`` returns (same tokenization
via ``scorer.encode_pair``, same truncation, ties to the lowest index), much cheaper per profile:

- **packed rows**: all candidates of a prompt share one row: the prompt once, then each candidate's
  tokens, with a block mask (a candidate sees the prompt and itself) and positions restarting after
  the prompt, so the prompt is computed once per example, not once per candidate;
- **the model's own modules**: one base forward of the model (its embeddings, position handling and
  mask code, given the packed rows' 4D mask and position ids) runs with pre-hooks on every decoder
  layer that record the hidden state entering it and the arguments the model passed it. A profile
  whose lowest edited layer is ``l`` then calls the model's own decoder layers ``l..L-1`` on the
  recorded state with the recorded arguments, then the model's final norm and output head at the
  scored positions only. Nothing of an architecture is re-implemented, so every causal family of
  the contract table takes this path (a start-up probe against the plain scorer guards it);
- **cached states**: an edit at layer ``l`` cannot change anything below it, so the states entering
  each layer are kept (an LRU bounded in bytes) and only layers ``>= l`` rerun;
- **one pass for all ranks of a matrix**: :meth:`FastChoiceEvaluator.evaluate_group` replicates each
  batch once per config and a forward hook on the edited module gives every replica its own rank
  through the cached SVD factors (``x Vh_k^T S_k U_k^T``): seven rho of one (type, layer) are one
  pass over layers ``>= l`` with no weight swap and no rank-k matrix materialised.

Work is cut into chunks of one batch of rows (:meth:`FastChoiceEvaluator.iter_group`): each chunk sets
the weights it needs in a scope and restores them, so a server may run other work between chunks.
Must run on the thread that owns the model (see :class:`~laser_ops.swap.WeightSwapper`).

Over 400 lines because it is one evaluator: the recording hooks, the state cache and the replicated group pass
share one packed batch and the recorded layer arguments, which a split would have to expose.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from laser_ops.interventions import InterventionSpec, parse_profile, rank_for
from laser_ops.scoring import ChoicePrediction, HFScorer
from laser_ops.swap import ProfileLike, WeightSwapper
from laser_ops.targets import TargetRef

logger = logging.getLogger(__name__)

#: Modules applied after the last decoder layer, relative to ``model.base_model``, in order (the ones present).
FINAL_MODULES: tuple[str, ...] = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "decoder.final_layer_norm",
                                   "decoder.project_out")
#: Edit kinds whose per-row output is a slice of the SVD factors (evaluated in one replicated pass).
FACTORED_KINDS = ("laser", "keep_bottom")
#: At most this many rows (replicas x batch) go through one replicated forward pass.
MAX_REPLICATED_ROWS = 256

Scores = list[tuple[list[float], list[int], list[bool]]]


class _Stop(Exception):
    """Raised from a capture hook to end a forward pass early."""


@dataclass
class _Batch:
    """Padded packed rows and everything about them that does not depend on weights."""

    ids: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, 1, T, T): bool (sdpa, ...) or additive float (eager)
    sel: torch.Tensor  # (N,) flat index into (B * T) of the scored positions
    targets: torch.Tensor  # (N,)
    spans: list[tuple[int, int, int, int]]  # (item, choice, start, stop) into the N scores
    items: list[int]  # items with a candidate in this batch
    layer_args: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)  # recorded per layer


def _layers_of(model: nn.Module) -> nn.ModuleList | None:
    from laser_ops.targets import ModelTargets, TargetError

    try:
        targets = ModelTargets.of(model)
    except TargetError:
        return None
    layers = model.get_submodule(targets.layer_prefix)
    return layers if isinstance(layers, nn.ModuleList) else None


def _replicate(obj: Any, copies: int, batch: int) -> Any:
    """Tile every batch-major tensor (>= 2 dims, leading dim ``batch``) ``copies`` times along dim 0."""
    if copies == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and obj.shape[0] == batch:
            return obj.repeat(copies, *([1] * (obj.dim() - 1)))
        return obj
    if isinstance(obj, tuple):
        return tuple(_replicate(o, copies, batch) for o in obj)
    if isinstance(obj, list):
        return [_replicate(o, copies, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: _replicate(v, copies, batch) for k, v in obj.items()}
    return obj


@dataclass(frozen=True)
class RankedRows:
    """Replica ``r`` of a replicated batch sees the matrix ``ref`` through the factors at ``ranks[r]``.

    ``keep="top"`` is LASER's ``W_k``; ``"bottom"`` is ``W - W_k`` (``keep_bottom``).
    """

    ref: TargetRef
    U: torch.Tensor  # (m, r)
    S: torch.Tensor  # (r,)
    Vh: torch.Tensor  # (r, n)
    ranks: tuple[int, ...]
    keep: str = "top"

    def output(self, x: torch.Tensor, k: int) -> torch.Tensor:
        xf = x.to(self.Vh.dtype)
        if self.keep == "top":
            return ((xf @ self.Vh[:k].T) * self.S[:k]) @ self.U[:, :k].T
        return ((xf @ self.Vh[k:].T) * self.S[k:]) @ self.U[:, k:].T

    @contextmanager
    def installed(self, module: nn.Module, rows_per_replica: int) -> Iterator[None]:
        """A forward hook on ``module`` that rewrites each replica's slice of the output; removed in ``finally``."""
        ref = self.ref
        cols = ref.row_index(self.U.device)

        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            lead = x.shape[0]
            per = lead // len(self.ranks)
            if per * len(self.ranks) != lead or per % rows_per_replica:
                raise RuntimeError(f"cannot map {lead} leading rows onto {len(self.ranks)} replicas")
            bias = getattr(mod, "bias", None)
            for r, k in enumerate(self.ranks):
                y = self.output(x[r * per:(r + 1) * per], k)
                if cols is None:
                    if bias is not None:
                        y = y + bias.to(y.dtype)
                    out[r * per:(r + 1) * per] = y.to(out.dtype)
                else:
                    if bias is not None:
                        y = y + bias.to(y.dtype).index_select(0, cols)
                    out[r * per:(r + 1) * per].index_copy_(-1, cols, y.to(out.dtype))
            return out

        handle = module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


class FastChoiceEvaluator:
    """See the module docstring. ``blocks`` partitions the items (successive halving scores one block at a time)."""

    def __init__(
        self,
        scorer: HFScorer,
        items: Sequence[tuple[str, Sequence[str]]],
        *,
        batch_size: int = 16,
        max_cache_bytes: int = 1 << 30,
        normalize: bool = False,
        verify: bool = True,
        blocks: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.scorer = scorer
        self.model = scorer.model
        self.items = [(c, list(ch)) for c, ch in items]
        self.batch_size = batch_size
        self.max_cache_bytes = max_cache_bytes
        self.normalize = normalize
        self.blocks = [list(b) for b in blocks] if blocks is not None else [list(range(len(self.items)))]
        if sorted(i for b in self.blocks for i in b) != list(range(len(self.items))):
            raise ValueError("blocks must partition the item indices")
        self._states: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()  # (layer, batch) -> state
        self._state_bytes = 0
        self._batches: list[list[_Batch]] | None = None  # per block
        self._layers = _layers_of(self.model)
        self._final = self._final_modules()
        self.fast = self._layers is not None and self._final is not None and \
            self.model.get_output_embeddings() is not None
        if self.fast and verify:
            self.fast = self._probe()
        logger.info("fast choice evaluator: %s path for %d items", "layer-cached" if self.fast else "plain",
                    len(self.items))

    # ---- public

    @property
    def num_layers(self) -> int:
        return len(self._layers) if self._layers is not None else 0

    def block_items(self, block: int | None) -> list[int]:
        return list(range(len(self.items))) if block is None else list(self.blocks[block])

    def predict(self, min_layer: int = 0, *, block: int | None = None) -> list[ChoicePrediction]:
        """Predictions under the live weights, assuming no layer below ``min_layer`` is edited."""
        return _drive(self._iter_live(min_layer, block))

    def evaluate_profile(self, swapper: WeightSwapper, specs: ProfileLike, *,
                         block: int | None = None) -> list[ChoicePrediction]:
        """Predictions with ``specs`` applied (scoped), rerunning only the edited layers up."""
        return self.evaluate_group(swapper, [specs], block=block)[0]

    def evaluate_group(self, swapper: WeightSwapper, profiles: Sequence[ProfileLike], *,
                       block: int | None = None) -> list[list[ChoicePrediction]]:
        """Predictions for each profile, in one replicated pass when they are single edits of one matrix."""
        return _drive(self.iter_group(swapper, profiles, block=block))

    def iter_group(self, swapper: WeightSwapper, profiles: Sequence[ProfileLike], *, block: int | None = None
                   ) -> Generator[None, None, list[list[ChoicePrediction]]]:
        """:meth:`evaluate_group` cut into chunks: yields after each batch of rows (weights restored)."""
        parsed = [parse_profile(p) for p in profiles]
        ranked = self._ranked(swapper, parsed) if self.fast else None
        if ranked is not None:
            return (yield from self._iter_ranked(swapper, ranked, block))
        out = []
        for specs in parsed:
            out.append((yield from self._iter_profile(swapper, specs, block)))
        return out

    def clear_cache(self) -> None:
        self._states.clear()
        self._state_bytes = 0

    # ---- set-up

    def _final_modules(self) -> list[nn.Module] | None:
        base = getattr(self.model, "base_model", None)
        if base is None or base is self.model:
            return None
        found = []
        for name in FINAL_MODULES:
            try:
                module = base.get_submodule(name)
            except AttributeError:
                continue
            if module is not None:
                found.append(module)
        return found or None

    def _probe(self) -> bool:
        """Compare the layer path with the plain scorer on a few items; any disagreement disables it."""
        sample = self.items[:3]
        if not sample:
            return True
        plain = self.scorer.predict_choices(sample)
        saved_items, saved_blocks = self.items, self.blocks
        try:
            self.items, self.blocks = sample, [list(range(len(sample)))]
            self._batches = None
            mine = _drive(self._iter_scores(0, None, None, 1))
            mine_mid = _drive(self._iter_scores(self.num_layers - 1, None, None, 1))  # replayed from cached states
        except Exception:  # noqa: BLE001 - an unexpected layer signature just means "use the plain path"
            logger.warning("fast evaluator probe failed; using the plain path", exc_info=True)
            return False
        finally:
            self.items, self.blocks = saved_items, saved_blocks
            self._batches = None
            self.clear_cache()
        worst = max(abs(a - b) for got in (mine, mine_mid)
                    for p, (lps, _, _) in zip(plain, got[0]) for a, b in zip(p.logprobs, lps))
        if worst > 1e-3:
            logger.warning("fast evaluator disagrees with the plain path by %.2g; using the plain path", worst)
            return False
        return True

    def _pack(self) -> list[list[_Batch]]:
        """Tokenize once; build padded batches of packed rows, block by block, longest rows first."""
        sc = self.scorer
        rows: dict[int, list[tuple[list[int], list[int], list[tuple[int, int, int, list[int]]]]]] = {}
        for item, (context, choices) in enumerate(self.items):
            pairs = [sc.encode_pair(context, c) for c in choices]
            ctx = list(pairs[0][0]) or [sc._require_prefix_token()]
            live = [(j, list(cont)) for j, (_, cont) in enumerate(pairs) if cont]
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
                rows.setdefault(item, []).append((ids, pos, packed))
        out = []
        for block in self.blocks:
            mine = [r for i in block for r in rows.get(i, [])]
            mine.sort(key=lambda r: -len(r[0]))
            out.append([self._batch(mine[s:s + self.batch_size]) for s in range(0, len(mine), self.batch_size)])
        return out

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        if getattr(self.model.config, "_attn_implementation", "eager") != "eager":
            return allowed
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    def _batch(self, chunk: list[tuple[list[int], list[int], list[tuple[int, int, int, list[int]]]]]) -> _Batch:
        width = max(len(ids) for ids, _, _ in chunk)
        B = len(chunk)
        ids_t = torch.full((B, width), self.scorer.pad_token_id, dtype=torch.long)
        pos_t = torch.zeros((B, width), dtype=torch.long)
        allowed = torch.zeros((B, width, width), dtype=torch.bool)
        allowed[:, torch.arange(width), torch.arange(width)] = True  # pads see themselves: no NaN rows
        sel: list[int] = []
        targets: list[int] = []
        spans: list[tuple[int, int, int, int]] = []
        items: list[int] = []
        for b, (ids, pos, cands) in enumerate(chunk):
            ids_t[b, : len(ids)] = torch.tensor(ids)
            pos_t[b, : len(ids)] = torch.tensor(pos)
            ctx = cands[0][2]
            allowed[b, :ctx, :ctx] = torch.tril(torch.ones(ctx, ctx, dtype=torch.bool))
            for item, j, begin, cont in cands:
                end = begin + len(cont) - 1
                allowed[b, begin:end, :ctx] = True
                allowed[b, begin:end, begin:end] = torch.tril(torch.ones(end - begin, end - begin, dtype=torch.bool))
                spans.append((item, j, len(targets), len(targets) + len(cont)))
                sel.extend(b * width + c for c in [ctx - 1, *range(begin, end)])
                targets.extend(cont)
                if not items or items[-1] != item:
                    items.append(item)
        device = self.model.device
        return _Batch(ids_t.to(device), pos_t.to(device), self._mask(allowed[:, None]).to(device),
                      torch.tensor(sel, device=device), torch.tensor(targets, device=device), spans, items)

    # ---- states

    def _batches_of(self, block: int | None) -> list[_Batch]:
        if self._batches is None:
            self._batches = self._pack()
        if block is None:
            return [b for blk in self._batches for b in blk]
        return self._batches[block]

    def _capture(self, batch: _Batch, layer: int) -> torch.Tensor:
        """The state entering ``layer``, from a forward of the model itself on ``batch``.

        Pre-hooks on the decoder layers record each one's input state (kept for layers ``<= layer``,
        which the caller guarantees are unedited) and, once per batch, the arguments the model passed
        each layer (masks, positions, rotary tables: they do not depend on weights). The pass stops
        at ``layer`` unless it still has arguments to record.
        """
        assert self._layers is not None
        record = not batch.layer_args
        args_seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        entering: list[torch.Tensor] = []
        handles = []

        def pre(index: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                if record:
                    kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values",
                                                                        "layer_past")}
                    kw["use_cache"] = False
                    args_seen.append((args[1:] if args else (), kw))
                if index <= layer:
                    self._remember((index, id(batch)), hidden)
                if index == layer:
                    entering.append(hidden)
                    if not record:
                        raise _Stop
            return hook

        for i, module in enumerate(self._layers):
            handles.append(module.register_forward_pre_hook(pre(i), with_kwargs=True))
        try:
            self.model.base_model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions,
                                  use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if record:
            batch.layer_args = args_seen
        return entering[0]

    def _state(self, layer: int, batch: _Batch) -> torch.Tensor:
        """The base state entering ``layer`` (the live weights below it are base by contract)."""
        key = (layer, id(batch))
        cached = self._states.get(key)
        if cached is not None:
            self._states.move_to_end(key)
            return cached
        below = [j for (j, b) in self._states if b == id(batch) and j < layer]
        if not below or not batch.layer_args:
            return self._capture(batch, layer)
        start = max(below)
        h = self._states[(start, id(batch))]
        for j in range(start, layer):
            h = self._run_layer(j, h, batch, 1)
            self._remember((j + 1, id(batch)), h)
        return h

    def _remember(self, key: tuple[int, int], state: torch.Tensor) -> None:
        size = state.numel() * state.element_size()
        if size > self.max_cache_bytes:
            return
        old = self._states.pop(key, None)
        if old is not None:
            self._state_bytes -= old.numel() * old.element_size()
        self._states[key] = state
        self._state_bytes += size
        while self._state_bytes > self.max_cache_bytes:
            _, evicted = self._states.popitem(last=False)
            self._state_bytes -= evicted.numel() * evicted.element_size()

    # ---- scoring

    def _run_layer(self, index: int, h: torch.Tensor, batch: _Batch, copies: int) -> torch.Tensor:
        assert self._layers is not None
        rest, kw = batch.layer_args[index]
        B = batch.ids.shape[0]
        out = self._layers[index](h, *_replicate(rest, copies, B), **_replicate(kw, copies, B))
        return out[0] if isinstance(out, tuple) else out

    def _scores(self, h: torch.Tensor, batch: _Batch, copies: int) -> list[dict[tuple[int, int], tuple[float, int, bool]]]:
        """Per replica: (item, choice) -> (summed log-prob, tokens, all greedy) from the last layer's output."""
        B, T, d = batch.ids.shape[0], batch.ids.shape[1], h.shape[-1]
        flat = h.reshape(copies, B * T, d)[:, batch.sel].reshape(-1, d)
        for module in self._final or []:
            flat = module(flat)
        logits = self.model.get_output_embeddings()(flat).float()
        targets = batch.targets.repeat(copies)
        tok = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        greedy = (logits.argmax(-1) == targets)
        n = batch.targets.numel()
        tok_l, greedy_l = tok.tolist(), greedy.tolist()
        out = []
        for r in range(copies):
            scores = {}
            for item, j, a, b in batch.spans:
                scores[(item, j)] = (math.fsum(tok_l[r * n + a:r * n + b]), b - a, all(greedy_l[r * n + a:r * n + b]))
            out.append(scores)
        return out

    def _iter_scores(self, min_layer: int, block: int | None, ranked: RankedRows | None, copies: int
                     ) -> Generator[None, None, list[Scores]]:
        """Scores per replica for the block's items; one chunk (yield) per batch. Caller scopes the weights."""
        assert self._layers is not None
        last = self.num_layers
        min_layer = max(0, min(min_layer, last - 1))
        merged: list[dict[tuple[int, int], tuple[float, int, bool]]] = [{} for _ in range(copies)]
        for batch in self._batches_of(block):
            with torch.inference_mode():
                h = self._state(min_layer, batch)
                B = batch.ids.shape[0]
                if copies > 1:
                    h = h.repeat(copies, *([1] * (h.dim() - 1)))
                ctx = ranked.installed(self.model.get_submodule(ranked.ref.module_name), B) if ranked else _null()
                with ctx:
                    for j in range(min_layer, last):
                        h = self._run_layer(j, h, batch, copies)
                for r, scores in enumerate(self._scores(h, batch, copies)):
                    merged[r].update(scores)
            yield
        out = []
        items = self.block_items(block)
        for r in range(copies):
            res = []
            for item in items:
                choices = self.items[item][1]
                got = [merged[r].get((item, j), (0.0, 0, True)) for j in range(len(choices))]
                res.append(([g[0] for g in got], [g[1] for g in got], [g[2] for g in got]))
            out.append(res)
        return out

    def _predictions(self, scores: Scores) -> list[ChoicePrediction]:
        out = []
        for lps, ns, greedy in scores:
            key = [lp / max(n, 1) if self.normalize else lp for lp, n in zip(lps, ns)]
            best = max(range(len(lps)), key=lambda i: (key[i], -i))
            out.append(ChoicePrediction(index=best, logprobs=lps, n_tokens=ns, is_greedy=greedy))
        return out

    def _iter_live(self, min_layer: int, block: int | None) -> Generator[None, None, list[ChoicePrediction]]:
        if not self.fast:
            items = [self.items[i] for i in self.block_items(block)]
            yield
            return self.scorer.predict_choices(items, normalize=self.normalize)
        return self._predictions((yield from self._iter_scores(min_layer, block, None, 1))[0])

    def _iter_profile(self, swapper: WeightSwapper, specs: list[InterventionSpec], block: int | None
                      ) -> Generator[None, None, list[ChoicePrediction]]:
        edits = swapper.plan(specs)
        min_layer = min((e.ref.layer for e in edits), default=swapper.targets.num_layers)
        if not self.fast:
            with swapper.applied_profile(specs):
                items = [self.items[i] for i in self.block_items(block)]
                preds = self.scorer.predict_choices(items, normalize=self.normalize)
            yield
            return preds
        chunks = self._iter_scores(min_layer, block, None, 1)
        while True:  # each chunk holds the profile only while it computes
            with swapper.applied_profile(specs):
                try:
                    next(chunks)
                except StopIteration as done:
                    return self._predictions(done.value[0])
            yield

    def _ranked(self, swapper: WeightSwapper, profiles: list[list[InterventionSpec]]) -> RankedRows | None:
        """The replicated plan when every profile is one factorable edit of the same single matrix."""
        if len(profiles) < 2 or any(len(p) != 1 for p in profiles):
            return None
        specs = [p[0] for p in profiles]
        kinds = {s.kind for s in specs}
        if len(kinds) != 1 or next(iter(kinds)) not in FACTORED_KINDS:
            return None
        try:
            edits = [swapper.plan([s]) for s in specs]
        except ValueError:
            return None
        if any(len(e) != 1 for e in edits) or len({e[0].ref for e in edits}) != 1:
            return None
        ref = edits[0][0].ref
        dec = swapper.factors(ref)
        ranks = tuple(rank_for(s, ref.shape, lambda: dec.S) for s in specs)
        device = self.model.device
        return RankedRows(ref, dec.U.to(device), dec.S.to(device), dec.Vh.to(device), ranks,
                          "top" if specs[0].kind == "laser" else "bottom")

    def _iter_ranked(self, swapper: WeightSwapper, ranked: RankedRows, block: int | None
                     ) -> Generator[None, None, list[list[ChoicePrediction]]]:
        out: list[Scores] = [[] for _ in ranked.ranks]
        step = max(1, MAX_REPLICATED_ROWS // max(1, self.batch_size))
        for start in range(0, len(ranked.ranks), step):
            part = RankedRows(ranked.ref, ranked.U, ranked.S, ranked.Vh, ranked.ranks[start:start + step],
                              ranked.keep)
            chunks = self._iter_scores(ranked.ref.layer, block, part, len(part.ranks))
            while True:
                with swapper.applied_profile([]):  # replicas differ only through the hook: base weights live
                    try:
                        next(chunks)
                    except StopIteration as done:
                        for r, scores in enumerate(done.value):
                            out[start + r] = scores
                        break
                yield
        return [self._predictions(s) for s in out]


@contextmanager
def _null() -> Iterator[None]:
    yield


def _drive(gen: Generator[None, None, Any]) -> Any:
    """Run a chunked computation to the end and return its result."""
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value
