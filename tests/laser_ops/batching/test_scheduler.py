"""The scheduler is pure bookkeeping: these tests drive it with plain sequences and no model."""

from __future__ import annotations

import pytest

from laser_ops.batching.scheduler import Scheduler, SchedulerConfig
from laser_ops.batching.sequence import Sequence, SeqStatus


def _gen(n_inputs: int, max_new: int = 4, tag: object = None) -> Sequence:
    return Sequence(list(range(1, n_inputs + 1)), tag=tag, max_new_tokens=max_new)


def _run_step(sched: Scheduler, plan) -> None:
    """What the runner and engine do after a step: advance computed, start decoding, count tokens."""
    for seq, n in plan.prefill:
        seq.computed += n
        if seq.computed == len(seq.inputs):
            if seq.is_prefix:
                seq.status = SeqStatus.READY
            elif seq.generates:
                seq.status = SeqStatus.DECODE
                seq.output_ids.append(0)
            else:
                seq.finish("scored")
    for seq in plan.decode:
        seq.computed += 1
        seq.output_ids.append(0)
        if len(seq.output_ids) >= seq.max_new_tokens:
            seq.finish("length")


def _check_slots(sched: Scheduler) -> None:
    assert [s.slot for s in sched.decoding] == list(range(len(sched.decoding)))
    assert all(slot >= len(sched.decoding) and s.slot == slot for slot, s in sched.others.items())
    assert len(sched.decoding) + len(sched.others) <= sched.config.max_running


def test_admits_oldest_first_up_to_max_running() -> None:
    sched = Scheduler(SchedulerConfig(max_running=2, max_batch_tokens=64, prefill_chunk=8))
    seqs = [_gen(3) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    assert [s for s, _ in plan.prefill] == seqs[:2] and not plan.decode
    assert [s.status for s in seqs] == [SeqStatus.PREFILL] * 2 + [SeqStatus.WAITING] * 2
    _check_slots(sched)


def test_rows_join_a_running_decode_and_finished_rows_leave_at_once() -> None:
    sched = Scheduler(SchedulerConfig(max_running=4, max_batch_tokens=64, prefill_chunk=8))
    long, short = _gen(3, max_new=10), _gen(2, max_new=1)
    sched.add(long)
    _run_step(sched, sched.schedule())
    sched.add(short)
    plan = sched.schedule()  # the short one is prefilled while the long one decodes
    assert plan.decode == [long] and [s for s, _ in plan.prefill] == [short]
    _run_step(sched, plan)  # short's prompt completes; with max_new 1 its first token ends it
    short.finish("length")
    plan = sched.schedule()
    assert plan.decode == [long] and short in plan.retired and short.slot is None
    _check_slots(sched)


def test_long_prompts_are_chunked_within_the_token_budget() -> None:
    sched = Scheduler(SchedulerConfig(max_running=4, max_batch_tokens=10, prefill_chunk=6))
    running = _gen(2, max_new=50)
    sched.add(running)
    _run_step(sched, sched.schedule())
    long = _gen(20)
    sched.add(long)
    chunks = []
    while long.status is not SeqStatus.DECODE:
        plan = sched.schedule()
        assert plan.tokens <= 10 and plan.decode == [running]  # the running row decodes every step
        chunks.append(dict(plan.prefill)[long])
        _run_step(sched, plan)
    assert chunks == [6, 6, 6, 2]


def test_leaving_rows_keep_decode_slots_contiguous() -> None:
    sched = Scheduler(SchedulerConfig(max_running=4, max_batch_tokens=64, prefill_chunk=8))
    seqs = [_gen(2, max_new=20) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    _run_step(sched, sched.schedule())
    _run_step(sched, sched.schedule())
    assert [s.slot for s in seqs] == [0, 1, 2, 3]
    seqs[0].finish("cancelled")
    seqs[2].finish("stop")
    plan = sched.schedule()
    # slot 2 freed: nothing moves there (3 moves into 0 instead); the last row fills slot 0
    assert plan.copies == [(3, 0, seqs[3].computed)]
    assert [s.slot for s in sched.decoding] == [0, 1] and sched.decoding == [seqs[3], seqs[1]]
    _check_slots(sched)


def test_a_row_starting_to_decode_swaps_past_a_prefilling_row() -> None:
    sched = Scheduler(SchedulerConfig(max_running=3, max_batch_tokens=12, prefill_chunk=4))
    big, small = _gen(8), _gen(2)
    sched.add(big)
    sched.add(small)
    plan = sched.schedule()
    assert (big.slot, small.slot) == (0, 1)
    _run_step(sched, plan)  # small completes its prompt, big has 4 of 8 left
    plan = sched.schedule()
    scratch = sched.config.scratch_slot
    assert plan.copies == [(0, scratch, 4), (1, 0, 2), (scratch, 1, 4)]
    assert (small.slot, big.slot) == (0, 1) and plan.decode == [small]
    _check_slots(sched)


def test_shared_prefix_is_computed_once_and_copied_into_each_row() -> None:
    sched = Scheduler(SchedulerConfig(max_running=4, max_batch_tokens=64, prefill_chunk=16))
    donor = Sequence(list(range(1, 11)), is_prefix=True)
    rows = [Sequence(donor.inputs + [20 + i, 30 + i], targets=[30 + i], score_from=11, prefix=donor)
            for i in range(3)]
    for s in [donor, *rows]:
        sched.add(s)
    plan = sched.schedule()
    assert [s for s, _ in plan.prefill] == [donor]  # the rows wait for the prefix
    _run_step(sched, plan)
    plan = sched.schedule()
    assert [c for c in plan.copies if c[0] == donor.slot] == [(donor.slot, r.slot, 10) for r in rows]
    assert all(r.computed == 10 and n == 2 for (r, n) in plan.prefill)
    _run_step(sched, plan)
    plan = sched.schedule()
    assert donor in plan.retired and all(r in plan.retired for r in rows) and not sched.has_work


def test_a_prefix_leaves_room_for_its_rows() -> None:
    sched = Scheduler(SchedulerConfig(max_running=2, max_batch_tokens=64, prefill_chunk=16))
    blocker = _gen(2, max_new=50)
    sched.add(blocker)
    _run_step(sched, sched.schedule())
    donor = Sequence(list(range(1, 11)), is_prefix=True)
    child = Sequence(donor.inputs + [5], targets=[5], score_from=10, prefix=donor)
    sched.add(donor)
    sched.add(child)
    plan = sched.schedule()
    assert not plan.prefill and donor.status is SeqStatus.WAITING  # 1 free slot: not enough for donor + row
    blocker.finish("length")
    _run_step(sched, sched.schedule())
    assert donor.status in (SeqStatus.PREFILL, SeqStatus.READY)


def test_rows_of_a_profile_not_ready_wait_without_blocking_others() -> None:
    sched = Scheduler(SchedulerConfig(max_running=4, max_batch_tokens=64, prefill_chunk=8))
    slow, fast = _gen(2, tag="compiling"), _gen(2)
    sched.add(slow)
    sched.add(fast)
    plan = sched.schedule(is_ready=lambda tag: tag != "compiling")
    assert [s for s, _ in plan.prefill] == [fast] and slow.status is SeqStatus.WAITING
    plan = sched.schedule()
    assert slow in [s for s, _ in plan.prefill]


def test_abort_removes_a_waiting_row_and_finishes_a_running_one() -> None:
    sched = Scheduler(SchedulerConfig(max_running=1, max_batch_tokens=64, prefill_chunk=8))
    a, b = _gen(2, max_new=9), _gen(2)
    sched.add(a)
    sched.add(b)
    _run_step(sched, sched.schedule())
    sched.abort(b)
    assert b.finished and b not in sched.waiting
    sched.abort(a)
    plan = sched.schedule()
    assert a in plan.retired and not sched.has_work


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        SchedulerConfig(max_running=8, max_batch_tokens=8)
    with pytest.raises(ValueError, match="max_running"):
        SchedulerConfig(max_running=0)


def test_queued_prefixes_keep_room_for_their_rows() -> None:
    """Many multiple-choice contexts queued at once: prefixes never take the slots their own rows need."""
    sched = Scheduler(SchedulerConfig(max_running=8, max_batch_tokens=4096, prefill_chunk=512))
    donors = []
    for q in range(6):
        donor = Sequence(list(range(100 * q + 1, 100 * q + 21)), is_prefix=True)
        donors.append(donor)
        sched.add(donor)
        for c in range(2):
            sched.add(Sequence(donor.inputs + [7 + c, 9], targets=[9], score_from=21, prefix=donor))
    steps = 0
    while sched.has_work:
        plan = sched.schedule()
        assert not plan.empty or plan.retired, "no progress"
        _run_step(sched, plan)
        _check_slots(sched)
        steps += 1
        assert steps < 20
    assert all(d.finished for d in donors)
    assert steps <= 8  # 6 contexts x 2 rows through 8 slots: a few steps, not one row at a time
