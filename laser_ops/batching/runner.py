"""Runs a :class:`~laser_ops.batching.scheduler.StepPlan` on the model: copies, a chunk pass, a decode pass.

The runner owns the :class:`~laser_ops.batching.kv_cache.SlotKVCache` and knows how to call a Hugging
Face causal LM with it (explicit position ids, a prepared 4D mask, per-row profile routing through
:class:`~laser_ops.batching.row_edits.RowRouter`). It computes logits only where they are needed: the
last position of every decoding row, the last input of a generating row whose prompt completes, and
every scored position of a scoring row. It does not sample and does not decide anything: it returns
the logits of rows that need a token, and the log-probs of scored targets.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from laser_ops.batching.kv_cache import SlotKVCache, attention_mask
from laser_ops.batching.row_edits import RowRouter
from laser_ops.batching.scheduler import StepPlan
from laser_ops.batching.sequence import Sequence as Row

logger = logging.getLogger(__name__)

#: Upper bound on logits materialised at once when scoring (rows x vocab floats, ~128 MiB in fp32).
LOGIT_CHUNK_ELEMENTS = 2**25


@dataclass
class StepOutput:
    """Logits of the rows that need a next token (in ``needs_token`` order); scored targets were
    appended to each scoring row's ``score_*`` lists."""

    needs_token: list[Row]
    logits: torch.Tensor | None  # (len(needs_token), vocab) float32


def _num_layers(model: PreTrainedModel) -> int:
    config = model.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell how many layers a {type(model).__name__} has")


class ModelRunner:
    """Executes step plans on one model; not thread-safe (the engine's owner thread calls it)."""

    def __init__(self, model: PreTrainedModel, *, pad_token_id: int, router: RowRouter | None = None,
                 slots: int = 8) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.router = router
        self.cache = SlotKVCache(_num_layers(model), slots=slots)
        self._head_path: bool | None = None
        self.sliding_window: int | None = getattr(model.config, "sliding_window", None) or None
        self.forward_passes = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- one step ---------------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> StepOutput:
        needs: list[Row] = []
        logits: list[torch.Tensor] = []
        with torch.inference_mode():
            for src, dst, length in plan.copies:
                self.cache.copy_row(src, dst, length)
            if plan.prefill:
                rows, chunk_logits = self._prefill(plan.prefill)
                needs += rows
                if chunk_logits is not None:
                    logits.append(chunk_logits)
            if plan.decode:
                needs += plan.decode
                logits.append(self._decode(plan.decode))
        return StepOutput(needs, torch.cat(logits) if logits else None)

    def _decode(self, rows: Sequence[Row]) -> torch.Tensor:
        ids = torch.tensor([[r.output_ids[-1]] for r in rows], device=self.device)
        out = self._forward([r.slot for r in rows], ids, [r.computed for r in rows], [r.tag for r in rows], [0])
        for r in rows:
            r.computed += 1
        return out.logits([(i, 0) for i in range(len(rows))])

    def _prefill(self, chunk: Sequence[tuple[Row, int]]) -> tuple[list[Row], torch.Tensor | None]:
        width = max(n for _, n in chunk)
        ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
        score_picks: list[tuple[int, int]] = []  # (row in chunk, column) of scored positions
        score_targets: list[int] = []
        scored: list[tuple[Row, int, int]] = []  # (row, first index into score_picks, count)
        token_picks: list[tuple[int, int]] = []  # last input of generating rows whose prompt completes
        completes: list[Row] = []
        for r, (row, n) in enumerate(chunk):
            start = row.computed
            ids[r, :n] = torch.tensor(row.inputs[start:start + n], dtype=torch.long)
            positions = row.scored_positions(start, start + n)
            if len(positions):
                assert row.targets is not None
                scored.append((row, len(score_picks), len(positions)))
                score_picks += [(r, p - start) for p in positions]
                score_targets += [row.targets[p - row.score_from] for p in positions]
            if row.generates and start + n == len(row.inputs):
                completes.append(row)
                token_picks.append((r, n - 1))
        keep = sorted({c for _, c in score_picks + token_picks})
        out = self._forward([row.slot for row, _ in chunk], ids.to(self.device),
                            [row.computed for row, _ in chunk], [row.tag for row, _ in chunk], keep)
        for row, n in chunk:
            row.computed += n
        if scored:
            self._score(out, score_picks, score_targets, scored)
        return completes, (out.logits(token_picks) if completes else None)

    # -- the model --------------------------------------------------------------------------------

    def _forward(self, slots: Sequence[int | None], ids: torch.Tensor, offsets: list[int],
                 tags: Sequence[Hashable], keep: list[int]) -> _Output:
        """Run ``ids`` (rows x q) at per-row offsets; logits will be wanted only at columns ``keep``."""
        device = ids.device
        q = ids.shape[1]
        offsets_t = torch.tensor(offsets, device=device)
        positions = offsets_t[:, None] + torch.arange(q, device=device)[None, :]
        self.forward_passes += 1
        with self.cache.step([s for s in slots if s is not None], offsets, q, device):
            assert self.cache.current is not None
            mask = attention_mask(offsets_t, q, self.cache.current.kv_len, self.dtype, self.sliding_window)
            with self.router.route(tags) if self.router is not None else contextlib.nullcontext():
                if self._use_head_path():
                    hidden = self.model.base_model(input_ids=ids, position_ids=positions, attention_mask=mask,
                                                   past_key_values=self.cache, use_cache=True).last_hidden_state
                    return _Output(self.model.get_output_embeddings(), hidden=hidden)
                if not keep:
                    self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                               past_key_values=self.cache, use_cache=True, logits_to_keep=1)
                    return _Output(None)
                keep_t = torch.tensor(keep, device=device)
                logits = self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                                    past_key_values=self.cache, use_cache=True, logits_to_keep=keep_t).logits
                return _Output(None, logits=logits, columns={c: i for i, c in enumerate(keep)})

    def _score(self, out: _Output, picks: list[tuple[int, int]], targets: list[int],
               scored: list[tuple[Row, int, int]]) -> None:
        """Append each scored target's log-prob, greedy flag and (if asked) top-N to its row."""
        target_t = torch.tensor(targets, device=self.device)
        top_n = max(row.top_n for row, _, _ in scored)
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 0) or 1
        chunk = max(1, LOGIT_CHUNK_ELEMENTS // vocab)
        lps, greedy, tops_v, tops_i = [], [], [], []
        for a in range(0, len(picks), chunk):
            logit = out.logits(picks[a:a + chunk])
            logp = torch.log_softmax(logit, dim=-1)
            tgt = target_t[a:a + chunk]
            lps.append(logp.gather(-1, tgt[:, None])[:, 0])
            greedy.append(logit.argmax(-1) == tgt)
            if top_n > 0:
                top = torch.topk(logp, min(top_n, logp.shape[-1]), dim=-1)
                tops_v.append(top.values)
                tops_i.append(top.indices)
        lp = torch.cat(lps).tolist()
        gr = torch.cat(greedy).tolist()
        tv = torch.cat(tops_v).tolist() if tops_v else None
        ti = torch.cat(tops_i).tolist() if tops_i else None
        for row, first, count in scored:
            row.score_logprobs += lp[first:first + count]
            row.score_greedy += gr[first:first + count]
            if row.top_n > 0 and tv is not None and ti is not None:
                row.score_top += [dict(zip(ti[k][:row.top_n], tv[k][:row.top_n])) for k in range(first, first + count)]

    def _use_head_path(self) -> bool:
        """Whether logits can be computed as ``lm_head(base_model(...))`` at chosen positions only.

        That skips the (rows x length x vocab) logits of a chunk. Checked once against the full forward,
        so models that post-process logits (soft-capping, scaling) use ``model(...)`` instead.
        """
        if self._head_path is None:
            base, head = self.model.base_model, self.model.get_output_embeddings()
            ok = base is not None and base is not self.model and head is not None
            if ok:
                probe = torch.tensor([[self.pad_token_id] * 3], device=self.device)
                try:
                    with torch.inference_mode():
                        full = self.model(input_ids=probe, use_cache=False).logits.float()
                        mine = head(base(input_ids=probe, use_cache=False).last_hidden_state).float()
                    ok = full.shape == mine.shape and torch.allclose(full, mine, rtol=1e-3, atol=1e-3)
                except Exception:  # noqa: BLE001 - any failure just means "use the generic path"
                    logger.debug("lm_head(base_model) probe failed", exc_info=True)
                    ok = False
            self._head_path = ok
            logger.debug("logits via %s", "lm_head at chosen positions" if ok else "the full model forward")
        return self._head_path


class _Output:
    """A forward pass's result: hidden states (logits computed on demand) or logits at kept columns."""

    def __init__(self, head: torch.nn.Module | None, *, hidden: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None, columns: dict[int, int] | None = None) -> None:
        self._head, self._hidden, self._logits, self._columns = head, hidden, logits, columns or {}

    def logits(self, picks: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Float32 logits at (row, column) picks."""
        source = self._hidden if self._hidden is not None else self._logits
        assert source is not None, "no logits were kept for this forward pass"
        rows = torch.tensor([r for r, _ in picks], device=source.device)
        if self._hidden is not None:
            cols = torch.tensor([c for _, c in picks], device=source.device)
            assert self._head is not None
            return self._head(self._hidden[rows, cols]).float()
        cols = torch.tensor([self._columns[c] for _, c in picks], device=source.device)
        return source[rows, cols].float()
