"""How a sweep step is computed on a model: :class:`StepExecutor` turns a :class:`StepPlan` into rows.

The runner (:mod:`laser_ops.sweeps`) decides *what* to evaluate; the executor evaluates it on the
model it is given, locally or inside a remote worker (:mod:`laser_ops.ray_sweeps`) that built the
same executor from the same config and dataset. The split and the successive-halving blocks are
seeded, so every executor sees the same examples.

Work is a generator (:meth:`StepExecutor.work`): it yields after each chunk (one batch of rows of the
fast evaluator, or one profile on the plain path), with the model's weights restored, so an engine
can run other requests between chunks; its return value is the step's rows.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Generator, Sequence
from typing import Any, Literal

from laser_ops.datasets import Dataset, Split, stratified_split
from laser_ops.evaluation import (
    EvalReport,
    ExampleOutcome,
    McNemarResult,
    evaluate_generation,
    evaluate_multiple_choice,
    majority_label,
    mcnemar_exact,
    mcnemar_vs_constant,
    perplexity,
    report_from_outcomes,
    report_from_predictions,
)
from laser_ops.fast_choice import FastChoiceEvaluator, drive
from laser_ops.scoring import HFScorer, Scorer
from laser_ops.sweep_models import PlannedConfig, StepPlan, SweepConfig, SweepRow, TestReport
from laser_ops.swap import WeightSwapper

logger = logging.getLogger(__name__)

TestSide = Literal["base", "winner"]


# ---------------------------------------------------------------------------------------------- split


def _cap(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(dataset):
        return dataset
    return stratified_split(dataset, n / len(dataset), seed).validation.model_copy(update={"name": dataset.name})


def plan_split(config: SweepConfig, dataset: Dataset) -> Split:
    """The seeded validation/test split of a sweep (capped as the config says)."""
    split = stratified_split(dataset, config.validation_fraction, config.seed)
    return Split(validation=_cap(split.validation, config.max_validation_examples, config.seed),
                 test=_cap(split.test, config.max_test_examples, config.seed),
                 seed=split.seed, validation_fraction=split.validation_fraction)


def halving_blocks(config: SweepConfig, n: int) -> list[list[int]] | None:
    """successive_halving: a seeded permutation of the validation positions cut into blocks whose running
    totals double (n0, 2 n0, 4 n0, ..., n); round r scores survivors on block r. ``None`` for other strategies."""
    if config.strategy != "successive_halving":
        return None
    order = list(range(n))
    random.Random(config.seed).shuffle(order)
    blocks, start, size = [], 0, min(config.halving_min_examples, n)
    while start < n:
        end = n if n - size < config.halving_min_examples // 2 else min(n, size)
        blocks.append(sorted(order[start:end]))
        start, size = end, 2 * end
    return blocks


# ---------------------------------------------------------------------------------------------- verdict


def plain_verdict(winner_key: str, base: EvalReport, winner: EvalReport, vs_base: McNemarResult,
                 label: str | None, majority_accuracy: float | None, vs_majority: McNemarResult | None) -> str:
    """The test report in plain words: against base, against always answering the majority label, and
    whether the winner's answers collapsed onto one label."""
    def p(m: McNemarResult) -> str:
        return f"exact McNemar p={m.p_value:.2g}"

    wa, ba = winner.accuracy, base.accuracy
    d = 100 * (wa - ba)
    if winner_key == "base":
        text = "no config beat the base model on validation; the winner is the base model itself"
        gain = False
    elif vs_base.significant and d > 0:
        text, gain = f"the winner beats base by {d:+.1f} points on test (significant, {p(vs_base)})", True
    elif vs_base.significant:
        text, gain = f"the winner is significantly worse than base on test ({d:+.1f} points, {p(vs_base)})", False
    elif d > 0:
        text, gain = f"the gain of {d:+.1f} points over base on test is not significant ({p(vs_base)})", False
    else:
        text, gain = f"the winner does not beat base on test ({d:+.1f} points, {p(vs_base)})", False
    if label is not None and majority_accuracy is not None and vs_majority is not None:
        versus = f"always-{label!r} ({wa:.1%} vs {majority_accuracy:.1%}, {p(vs_majority)})"
        beats = vs_majority.significant and wa > majority_accuracy
        if winner_key == "base":
            text += f"; base {'beats' if beats else 'does not beat'} {versus}"
        elif gain:
            text += f"; it also beats {versus}" if beats else f"; but it does not beat {versus}"
        else:
            text += f"; it does beat {versus}" if beats else f"; nor does it beat {versus}"
    labels = winner.labels
    if labels is not None and labels.collapsed and labels.top_answer is not None:
        text += (f"; {'base' if winner_key == 'base' else 'the winner'} answers {labels.top_answer!r} on "
                 f"{labels.top_answer_share:.0%} of test examples: "
                 f"{'its accuracy is label bias' if winner_key == 'base' else 'the edit moved the label bias'}")
    return text


# ---------------------------------------------------------------------------------------------- executor


def row_from_report(planned: PlannedConfig | None, role: str, report: EvalReport, indices: list[int] | None,
                    seconds: float, perplexity_value: float | None = None) -> SweepRow:
    """A row with the report's metrics and per-example evidence."""
    p = planned
    return SweepRow(
        key=p.key if p else "base", step=0, role=role,  # type: ignore[arg-type]
        interventions=p.interventions if p else [], type=p.type if p else None, layer=p.layer if p else None,
        rho=p.rho if p else None, val_accuracy=report.accuracy, val_log_loss=report.log_loss,
        val_perplexity=perplexity_value, val_n=report.n, val_n_correct=report.n_correct, val_labels=report.labels,
        collapsed=bool(report.labels and report.labels.collapsed), val_indices=indices,
        val_predictions=[o.prediction for o in report.outcomes], val_correct=[o.correct for o in report.outcomes],
        val_gold_logprobs=[o.gold_logprob for o in report.outcomes], seconds=seconds)


class StepExecutor:
    """Evaluates step plans of one sweep on a model (one per model holder: it caches hidden states)."""

    def __init__(self, config: SweepConfig, split: Split, *, max_cache_bytes: int = 1 << 30) -> None:
        self.config = config
        self.split = split
        self.blocks = halving_blocks(config, len(split.validation))
        self.max_cache_bytes = max_cache_bytes
        self._fast: dict[tuple[int, str], FastChoiceEvaluator] = {}
        self._guard_texts = [split.validation.prompt(e) + e.gold_text for e in split.validation.examples]

    @classmethod
    def for_dataset(cls, config: SweepConfig, dataset: Dataset, **kwargs: Any) -> StepExecutor:
        return cls(config, plan_split(config, dataset), **kwargs)

    def run(self, plan: StepPlan, swapper: WeightSwapper, scorer: Scorer) -> list[SweepRow]:
        """The plan's rows, computed inline."""
        return drive(self.work(plan, swapper, scorer))

    def work(self, plan: StepPlan, swapper: WeightSwapper, scorer: Scorer
             ) -> Generator[None, None, list[SweepRow]]:
        """The plan's rows, one chunk per ``next()`` (see the module docstring)."""
        t0 = time.perf_counter()
        if plan.role == "spectrum":
            snr = {f"{c.type}:{c.layer}": swapper.spectrum(str(c.type), int(c.layer)).snr for c in plan.configs}
            return [SweepRow(key="spectrum", step=0, role="spectrum", snr=snr, seconds=time.perf_counter() - t0)]
        if plan.role == "test":
            return [(yield from self._test(plan, swapper, scorer, t0))]
        val = self.split.validation
        indices = None if plan.block is None or self.blocks is None else self.blocks[plan.block]
        data = val if indices is None else val.subset(indices, val.name)
        configs: list[PlannedConfig | None] = [None] if plan.role == "base" else list(plan.configs)
        profiles = [c.interventions if c else [] for c in configs]
        reports = yield from self._evaluate(swapper, scorer, data, profiles, plan.block, cache=True)
        seconds = (time.perf_counter() - t0) / len(configs)
        rows = []
        for c, specs, report in zip(configs, profiles, reports):
            ppl = None
            if self.config.max_perplexity_ratio is not None and (plan.block is None or plan.block == 0):
                with swapper.applied_profile(specs):
                    ppl = perplexity(scorer, self._guard_texts)
                yield
            rows.append(row_from_report(c, plan.role, report, indices, seconds, ppl))
        return rows

    def _evaluate(self, swapper: WeightSwapper, scorer: Scorer, data: Dataset, profiles: list[list[dict[str, Any]]],
                  block: int | None, *, cache: bool) -> Generator[None, None, list[EvalReport]]:
        """Each profile on ``data`` (a block of validation, all of it, or test), fast where it applies."""
        if data.kind == "multiple_choice" and self.config.fast and isinstance(scorer, HFScorer):
            split = self.split.validation if cache else self.split.test
            ev = self._evaluator(scorer, split, cache)
            preds = yield from ev.iter_group(swapper, profiles, block=block if cache else None)
            return [report_from_predictions(data, p) for p in preds]
        out = []
        for specs in profiles:
            with swapper.applied_profile(specs):
                if data.kind == "multiple_choice":
                    out.append(evaluate_multiple_choice(scorer, data, normalize=self.config.normalize))
                else:
                    out.append(evaluate_generation(scorer, data, max_new_tokens=self.config.max_new_tokens))
            yield
        return out

    def _evaluator(self, scorer: HFScorer, data: Dataset, cache: bool) -> FastChoiceEvaluator:
        key = (id(scorer), data.name)
        ev = self._fast.get(key)
        if ev is None:
            ev = FastChoiceEvaluator(scorer, data.choice_items(), batch_size=self.config.batch_size,
                                     normalize=self.config.normalize,
                                     max_cache_bytes=self.max_cache_bytes if cache else 0,
                                     blocks=self.blocks if cache else None)
            self._fast[key] = ev
        return ev

    def test_side(self, plan: StepPlan, side: TestSide, swapper: WeightSwapper, scorer: Scorer
                  ) -> Generator[None, None, EvalReport]:
        """One side of a test step (base, or the winner) on the test split, chunk by chunk: a pool runs the two
        sides on two workers at once and joins them with :meth:`test_row`, which gives the same row as
        :meth:`work` (each side is the same evaluation either way)."""
        specs = plan.configs[0].interventions if side == "winner" and plan.configs else []
        (report,) = yield from self._evaluate(swapper, scorer, self.split.test, [specs], None, cache=False)
        return report

    def _test(self, plan: StepPlan, swapper: WeightSwapper, scorer: Scorer, t0: float
              ) -> Generator[None, None, SweepRow]:
        base_report = yield from self.test_side(plan, "base", swapper, scorer)
        win_report = yield from self.test_side(plan, "winner", swapper, scorer)
        return self.test_row(plan, base_report, win_report, time.perf_counter() - t0)

    def test_row(self, plan: StepPlan, base_report: EvalReport, win_report: EvalReport, seconds: float) -> SweepRow:
        """The test step's row from its two sides: the comparisons with base and the majority label, the verdict."""
        winner = plan.configs[0] if plan.configs else None
        specs = winner.interventions if winner else []
        test = self.split.test
        vs_base = mcnemar_exact(base_report.correct, win_report.correct)
        label, maj_acc = majority_label(test)
        vs_majority = mcnemar_vs_constant(test, win_report.correct, label) if label is not None else None
        key = winner.key if winner else "base"
        verdict = plain_verdict(key, base_report, win_report, vs_base, label, maj_acc, vs_majority)
        report = TestReport(
            winner_key=key, interventions=specs, base=base_report, winner=win_report,
            delta_accuracy=win_report.accuracy - base_report.accuracy, mcnemar=vs_base.to_dict(),
            majority_label=label, majority_accuracy=maj_acc,
            mcnemar_majority=vs_majority.to_dict() if vs_majority else None, verdict=verdict)
        logger.info("test: base %.4f -> winner %.4f; %s", base_report.accuracy, win_report.accuracy, verdict)
        return SweepRow(key="test", step=0, role="test", interventions=specs, test=report, seconds=seconds)


def merge_rows(old: SweepRow, new: SweepRow, dataset: Dataset) -> SweepRow:
    """A config scored on one more block: outcomes concatenated, metrics recomputed over all of them."""
    indices = (old.val_indices or []) + (new.val_indices or [])
    preds = (old.val_predictions or []) + (new.val_predictions or [])
    correct = (old.val_correct or []) + (new.val_correct or [])
    gold = (old.val_gold_logprobs or []) + (new.val_gold_logprobs or [])
    order = sorted(range(len(indices)), key=indices.__getitem__)
    sub = dataset.subset([indices[i] for i in order], dataset.name)
    outcomes = [ExampleOutcome(id=ex.id, correct=correct[i], prediction=preds[i], gold_logprob=gold[i])
                for ex, i in zip(sub.examples, order)]
    report = report_from_outcomes(sub, outcomes)
    planned = PlannedConfig(key=old.key, interventions=old.interventions, type=old.type, layer=old.layer, rho=old.rho)
    row = row_from_report(planned, old.role, report, [indices[i] for i in order], old.seconds + new.seconds,
                          old.val_perplexity)
    return row.model_copy(update={"rejected": old.rejected, "step": old.step})


def evaluations_of(rows: Sequence[SweepRow]) -> int:
    """Validation example-evaluations the config rows used."""
    return sum(r.val_n or 0 for r in rows if r.role == "config")
