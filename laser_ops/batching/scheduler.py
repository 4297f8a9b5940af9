"""Iteration-level scheduling as pure bookkeeping: what runs in the next step, and where its KV lives.

Each :meth:`Scheduler.schedule` call (one engine step) retires finished and cancelled rows, moves rows
whose prompt is done into the decode range, admits waiting sequences oldest first while there are
free slots (``max_running``), and spends the step's token budget (``max_batch_tokens``): one token
per decoding row, the rest on prompt chunks of at most ``prefill_chunk`` tokens, oldest first. So a
request never waits for another request to finish, and a long prompt delays running rows by one
chunk per step at most.

Slots are rows of the :class:`~laser_ops.batching.kv_cache.SlotKVCache`. Decoding rows always occupy
slots ``[0, R)`` (a decode step reads a contiguous view); prefilling rows and shared prefixes live in
free slots above. The plan lists the KV copies that keep that invariant (when rows leave, each row
left above the new end moves into a hole, once; a row starting to decode is moved or swapped to slot
``R``, through a scratch slot) and the copies of shared prefixes into their children, in order.
Nothing here touches a tensor: a test drives it with plain sequences.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from laser_ops.batching.sequence import Sequence, SeqStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 16  # rows with a slot (decoding, prefilling or held as a prefix)
    max_batch_tokens: int = 2048  # tokens computed per step: decode rows + prompt chunk rows x chunk width
    prefill_chunk: int = 512  # longest slice of one prompt computed in one step

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.max_batch_tokens <= self.max_running:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must exceed max_running "
                             f"({self.max_running}): a full decode step must leave room for a prompt chunk")

    @property
    def scratch_slot(self) -> int:
        """The slot swaps go through (never holds a row)."""
        return self.max_running


@dataclass
class StepPlan:
    """What one step runs: KV copies first (in order), then a prompt-chunk pass, then a decode pass."""

    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src slot, dst slot, length)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (row, tokens of its inputs this step)
    decode: list[Sequence] = field(default_factory=list)  # decoding rows, in slot order 0..R-1
    retired: list[Sequence] = field(default_factory=list)  # rows that left this step (slots freed)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def tokens(self) -> int:
        width = max((n for _, n in self.prefill), default=0)
        return len(self.decode) + width * len(self.prefill)


class Scheduler:
    """Waiting queue, slot table and token budget; see the module docstring."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.decoding: list[Sequence] = []  # index == slot
        self.others: dict[int, Sequence] = {}  # slot -> prefilling row or held prefix

    # -- queue ------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.status is not SeqStatus.WAITING:
            raise ValueError(f"sequence {seq.seq_id} is {seq.status.value}, not waiting")
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.decoding or self.others)

    @property
    def running(self) -> int:
        """Rows holding a slot."""
        return len(self.decoding) + len(self.others)

    def abort(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Finish ``seq`` now; a waiting one leaves the queue, a running one its slot at the next step."""
        if seq.finished:
            return
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
            if seq.prefix is not None:
                self._child_gone(seq.prefix)
        seq.finish(reason)

    # -- one step ---------------------------------------------------------------------------------

    def schedule(self, is_ready: Callable[[Hashable], bool] = lambda tag: True) -> StepPlan:
        """Plan the next step; ``is_ready(tag)`` says whether a profile can be served yet."""
        plan = StepPlan()
        self._retire(plan)
        self._promote(plan)
        self._admit(plan, is_ready)
        plan.decode = list(self.decoding)
        budget = self.config.max_batch_tokens - len(plan.decode)
        width = 0
        for seq in sorted((s for s in self.others.values() if s.status is SeqStatus.PREFILL),
                          key=lambda s: (s.arrival, s.seq_id)):
            n = min(seq.remaining_inputs, self.config.prefill_chunk)
            if not plan.prefill:
                n = max(1, min(n, budget))
            elif (len(plan.prefill) + 1) * max(width, n) > budget:
                break
            plan.prefill.append((seq, n))
            width = max(width, n)
        return plan

    def _retire(self, plan: StepPlan) -> None:
        for slot, seq in list(self.others.items()):
            if seq.finished or (seq.status is SeqStatus.READY and seq.waiting_children == 0):
                if not seq.finished:
                    seq.finish("done")
                del self.others[slot]
                seq.slot = None
                plan.retired.append(seq)
        gone = [s for s in self.decoding if s.finished]
        if not gone:
            return
        size = len(self.decoding) - len(gone)
        holes = sorted(s.slot for s in gone if s.slot < size)
        movers = [s for s in self.decoding[size:] if not s.finished]
        for seq, hole in zip(movers, holes, strict=True):  # each survivor above the new end moves once
            plan.copies.append((seq.slot, hole, seq.computed))
            self.decoding[hole] = seq
            seq.slot = hole
        del self.decoding[size:]
        for seq in gone:
            seq.slot = None
            plan.retired.append(seq)

    def _promote(self, plan: StepPlan) -> None:
        ready = sorted((s for s in self.others.values() if s.status is SeqStatus.DECODE),
                       key=lambda s: (s.arrival, s.seq_id))
        for seq in ready:
            target = len(self.decoding)
            src = seq.slot
            assert src is not None
            del self.others[src]
            if src != target:
                occupant = self.others.pop(target, None)
                if occupant is None:
                    plan.copies.append((src, target, seq.computed))
                else:  # swap through the scratch slot
                    scratch = self.config.scratch_slot
                    plan.copies += [(target, scratch, occupant.computed), (src, target, seq.computed),
                                    (scratch, src, occupant.computed)]
                    occupant.slot = src
                    self.others[src] = occupant
            seq.slot = target
            self.decoding.append(seq)

    def _free_slot(self) -> int | None:
        for slot in range(len(self.decoding), self.config.max_running):
            if slot not in self.others:
                return slot
        return None

    def _admit(self, plan: StepPlan, is_ready: Callable[[Hashable], bool]) -> None:
        """Oldest first. A row waiting for its prefix, or for a profile being compiled, is passed over (it keeps
        its place). Each admitted prefix with rows still to come keeps one slot in reserve for them, so a queue of
        prefixes cannot fill every slot while their rows wait: a new prefix needs room for itself, one of its rows
        and the reserve; a plain row needs room beyond the reserve; a prefix's own rows may use the reserve."""
        reserved = sum(1 for s in self.others.values() if s.is_prefix and s.waiting_children > 0)
        kept: deque[Sequence] = deque()
        while self.waiting:
            seq = self.waiting.popleft()
            if seq.finished:  # a prefix whose rows were all cancelled before it started
                continue
            free = self.config.max_running - self.running
            if seq.prefix is not None:
                need = 1
            elif seq.is_prefix:
                need = reserved + 2
            else:
                need = reserved + 1
            blocked = (not is_ready(seq.tag) or free < need
                       or (seq.prefix is not None and seq.prefix.status is not SeqStatus.READY))
            if blocked:
                kept.append(seq)
                if free < 1:
                    break
                continue
            slot = self._free_slot()
            assert slot is not None
            seq.slot = slot
            seq.status = SeqStatus.PREFILL
            self.others[slot] = seq
            if seq.is_prefix and seq.waiting_children > 0:
                reserved += 1
            if seq.prefix is not None:
                donor = seq.prefix
                assert donor.slot is not None
                plan.copies.append((donor.slot, slot, donor.computed))
                seq.computed = donor.computed
                self._child_gone(donor)
                if donor.waiting_children == 0:
                    reserved -= 1
        kept.extend(self.waiting)
        self.waiting = kept

    @staticmethod
    def _child_gone(donor: Sequence) -> None:
        donor.waiting_children -= 1
        if donor.waiting_children <= 0 and donor.status is SeqStatus.WAITING:
            donor.finish("unused")
