"""The unit of work of continuous batching: one row's tokens and how far they got."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued, no slot yet
    PREFILL = "prefill"  # has a slot; its inputs are being run through the model, chunk by chunk
    DECODE = "decode"  # generating one token per step
    READY = "ready"  # a shared prefix whose KV is computed, held for the rows that copy it
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One row: ``inputs`` to run through the model, then either tokens to generate or targets to score.

    * generation: ``max_new_tokens > 0``; the first token comes from the logits at the last input.
    * scoring: ``targets[j]`` is scored at input position ``score_from + j`` (log-prob of the token
      that follows that position), e.g. a loglikelihood window or a prompt's echo.
    * a shared prefix (``is_prefix``): inputs only; once computed (status READY) its KV is copied into
      every sequence that names it as ``prefix`` and whose inputs start with it.

    ``tag`` routes the row to its profile's weights (None: base). The scheduler owns ``status``,
    ``slot`` and ``computed``; whoever created the sequence reads the outputs.
    """

    inputs: list[int]
    tag: Hashable = None
    max_new_tokens: int = 0
    targets: list[int] | None = None
    score_from: int = 0
    top_n: int = 0
    prefix: Sequence | None = None
    is_prefix: bool = False
    owner: Any = None  # the creator's handle (request state); opaque here
    arrival: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_ids))

    status: SeqStatus = SeqStatus.WAITING
    slot: int | None = None
    computed: int = 0  # tokens whose keys/values are in the cache
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    waiting_children: int = 0  # a prefix: rows that still have to copy it

    # scoring outputs, one entry per scored position, in order
    score_logprobs: list[float] = field(default_factory=list)
    score_greedy: list[bool] = field(default_factory=list)
    score_top: list[dict[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("a sequence needs at least one input token")
        if self.targets is not None and len(self.targets) != len(self.inputs) - self.score_from:
            raise ValueError(f"{len(self.targets)} targets for {len(self.inputs) - self.score_from} scored positions")
        if self.prefix is not None:
            if self.inputs[:len(self.prefix.inputs)] != self.prefix.inputs or len(self.inputs) <= len(self.prefix.inputs):
                raise ValueError("a sequence's prefix must be a proper prefix of its inputs")
            self.prefix.waiting_children += 1

    @property
    def generates(self) -> bool:
        return self.max_new_tokens > 0

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def remaining_inputs(self) -> int:
        return len(self.inputs) - self.computed if self.status in (SeqStatus.WAITING, SeqStatus.PREFILL) else 0

    def scored_positions(self, start: int, stop: int) -> range:
        """Input positions in ``[start, stop)`` whose next-token log-prob is scored."""
        if self.targets is None:
            return range(0)
        return range(max(start, self.score_from), stop)

    def finish(self, reason: str) -> None:
        self.status = SeqStatus.FINISHED
        self.finish_reason = reason
