"""Validation sweeps: search LASER configs on a validation split, report the winner on the test split.

Protocol (the paper's, with its reporting weakness fixed): split the dataset with a seed (default 20%
validation / 80% test, stratified by gold label), evaluate the base model and every candidate on
validation only, choose the winner by validation accuracy (ties: lower validation log-loss), then
evaluate base and winner once on test with 95% Wilson intervals and an exact McNemar test.

Strategies:

- ``grid``: types x layers x rho (defaults: fc_in, fc_out; all layers; the paper's seven rho).
  Every edit kind is sweepable. rho is the rank fraction for ``laser``, ``keep_bottom`` and
  ``random_basis``; for ``prune_magnitude`` it is the kept fraction of entries, so
  ``sparsity = 1 - rho`` (rho = 0.01 keeps 1% of the weights, the same budget as a rank-1% edit
  in spirit); ``laser_mp`` and ``zero`` have no knob and give one config per matrix.
- ``greedy_compose``: from the largest layer and smallest rho, add an edit to the profile only if
  validation accuracy strictly rises; a matrix holds at most one edit. The winner is the composed profile.
- ``spectral_prior``: order matrices by their data-free Marchenko-Pastur SNR, lowest first (a matrix
  whose spectrum is mostly below the noise threshold is the one where discarding the tail should
  cost least and help most), and try them first; useful with a budget.
- ``successive_halving``: the grid on a growing seeded subset of validation (blocks whose running
  totals double); after each round a config is dropped when a one-sided exact McNemar test on the
  examples seen says it is less accurate than the leader, or it surely collapsed (the run's confidence
  split over its rounds). The winner is chosen among the configs scored on all of validation; the result says how
  many example-evaluations that saved against the full grid.

Honest selection: a ``collapsed`` config (one answer on >= 95% of validation) cannot win unless
``allow_collapsed``; ``metric: balanced_accuracy`` selects on mean per-label recall. The test report
compares the winner with base and with always answering the majority label (exact McNemar tests).

The runner is an iterator of steps. A grid step holds every rho of one (type, layer), which the
executor scores in one replicated pass; a server runs each step on its model-owner thread
(``step.run(swapper, scorer) -> [SweepRow]``, or chunk by chunk through ``step.work``), records the
rows, persists them, and can later resume: rows passed back in are not recomputed (their keys are
``done``). Budgets (``max_configs``, ``time_limit_s``) and the cancellation check apply between steps.

Over 400 lines because :class:`SweepRunner` is one state machine (plan, record, resume, select, report) whose
bookkeeping the four strategies share; its data models live in :mod:`laser_ops.sweep_models`, the execution of
its steps in :mod:`laser_ops.sweep_steps`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from scipy.stats import beta

from laser_ops.datasets import Dataset, builtin_dataset
from laser_ops.evaluation import COLLAPSE_SHARE, answer_text, mcnemar_worse_p
from laser_ops.scoring import Scorer
from laser_ops.sweep_models import (
    NO_KNOB,
    PAPER_RHOS,
    PAPER_TYPES,
    Candidate,
    PlannedConfig,
    StepPlan,
    StopReason,
    Strategy,
    SweepConfig,
    SweepConfigError,
    SweepProgress,
    SweepResult,
    SweepRow,
    TestReport,
    grid_candidates,
    profile_key,
)
from laser_ops.sweep_steps import StepExecutor, evaluations_of, merge_rows, plan_split
from laser_ops.swap import WeightSwapper
from laser_ops.targets import ModelTargets

__all__ = [
    "NO_KNOB", "PAPER_RHOS", "PAPER_TYPES", "Candidate", "PlannedConfig", "StepPlan", "StopReason", "Strategy",
    "SweepConfig", "SweepConfigError", "SweepProgress", "SweepResult", "SweepRow", "SweepRunner", "SweepStep",
    "TestReport", "grid_candidates", "planned_total", "profile_key", "rows_to_jsonl", "run_steps", "run_sweep",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepStep:
    """One unit of work: ``run`` (or ``work``, chunk by chunk) must be called on the thread that owns the model."""

    plan: StepPlan
    executor: StepExecutor

    @property
    def key(self) -> str:
        return self.plan.key

    @property
    def role(self) -> str:
        return self.plan.role

    def work(self, swapper: WeightSwapper, scorer: Scorer) -> Generator[None, None, list[SweepRow]]:
        """The step as a generator: yields between chunks (weights restored), returns the rows."""
        return self.executor.work(self.plan, swapper, scorer)

    def run(self, swapper: WeightSwapper, scorer: Scorer) -> list[SweepRow]:
        return self.executor.run(self.plan, swapper, scorer)


def _planned(cands: Sequence[Candidate], key: str | None = None) -> PlannedConfig:
    last = cands[-1]
    return PlannedConfig(key=key or profile_key(cands), interventions=[c.spec() for c in cands], type=last.type,
                         layer=last.layer, rho=last.rho)


class SweepRunner:
    """Plans and records a sweep; :meth:`steps` yields the work, :meth:`record` takes each result.

    Usage (what :meth:`run` does; a server does the same with ``step.run`` on its model thread)::

        runner = SweepRunner(config, dataset, completed=saved_rows, on_progress=cb, should_cancel=flag)
        for step in runner.steps(swapper.targets):
            runner.record(step.run(swapper, scorer))
        result = runner.result()

    Adaptive strategies read recorded rows when the iterator resumes, so record each step's rows
    before asking for the next step. ``time_limit_s`` counts from this runner's creation (a resumed
    job gets a fresh clock); the final test step runs even after a budget stops the search.
    """

    def __init__(
        self,
        config: SweepConfig,
        dataset: Dataset | None = None,
        *,
        completed: Iterable[SweepRow | dict[str, Any]] = (),
        on_progress: Callable[[SweepProgress], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        executor: StepExecutor | None = None,
    ) -> None:
        if dataset is None:
            if config.dataset is None:
                raise SweepConfigError("give a dataset or a built-in dataset name", "dataset")
            dataset = builtin_dataset(config.dataset)
        if config.metric == "balanced_accuracy" and dataset.kind != "multiple_choice":
            raise SweepConfigError(f"balanced_accuracy needs a multiple-choice dataset; {dataset.name!r} is "
                                   f"{dataset.kind}: use accuracy or log_loss", "metric")
        self.config = config
        self.dataset = dataset
        self.split = plan_split(config, dataset)
        self.executor = executor or StepExecutor(config, self.split)
        self.rows: dict[str, SweepRow] = {}
        for r in completed:
            row = r if isinstance(r, SweepRow) else SweepRow.model_validate(r)
            self.rows[row.key] = row
        self.on_progress = on_progress
        self.should_cancel = should_cancel
        self._clock = clock
        self._t0 = clock()
        self._ran: list[tuple[float, float]] = []  # (seconds, cost) of steps run in this session (for the ETA)
        self._step_no = max((r.step for r in self.rows.values()), default=-1) + 1
        self.stopped: StopReason = "running"
        self._targets: ModelTargets | None = None

    # ---- state

    @property
    def done(self) -> set[str]:
        """Keys of recorded rows (skipped on resume; successive halving may extend a config's row)."""
        return set(self.rows)

    @property
    def base(self) -> SweepRow | None:
        return self.rows.get("base")

    @property
    def n_validation(self) -> int:
        return len(self.split.validation)

    def config_rows(self) -> list[SweepRow]:
        return sorted((r for r in self.rows.values() if r.role == "config"), key=lambda r: r.step)

    def score(self, row: SweepRow) -> float:
        """The selection metric as a number to maximise."""
        if self.config.metric == "log_loss":
            return -row.val_log_loss if row.val_log_loss is not None else float("-inf")
        if self.config.metric == "balanced_accuracy" and row.val_labels is not None and \
                row.val_labels.balanced_accuracy is not None:
            return row.val_labels.balanced_accuracy
        return row.val_accuracy if row.val_accuracy is not None else float("-inf")

    def eligible(self, row: SweepRow) -> bool:
        """May this config win? Not when rejected, eliminated, or collapsed (unless allowed)."""
        return (row.val_accuracy is not None and row.rejected is None and row.eliminated is None
                and (self.config.allow_collapsed or not row.collapsed))

    def best(self) -> SweepRow | None:
        """The validation winner: best metric, ties to lower log-loss, then the earlier step."""
        rows = [r for r in self.config_rows() if self.eligible(r)]
        if self.config.strategy == "greedy_compose":
            kept = [r for r in rows if r.kept]
            return kept[-1] if kept else None
        if self.config.strategy == "successive_halving" and rows:
            most = max(r.val_n or 0 for r in rows)
            rows = [r for r in rows if (r.val_n or 0) == most]
        if not rows:
            return None
        inf = float("inf")
        return min(rows, key=lambda r: (-self.score(r), r.val_log_loss if r.val_log_loss is not None else inf,
                                        r.step))

    def finished(self, row: SweepRow) -> bool:
        """A row no later step will extend."""
        return (row.role != "config" or self.config.strategy != "successive_halving" or row.eliminated is not None
                or (row.val_n or 0) >= self.n_validation)

    # ---- driving

    def run(self, swapper: WeightSwapper, scorer: Scorer) -> SweepResult:
        """Run every remaining step inline (single-threaded use, tests, the benchmark)."""
        for step in self.steps(swapper.targets):
            self.record(step.run(swapper, scorer))
        return self.result()

    def steps(self, targets: ModelTargets) -> Iterator[SweepStep]:
        """Base, then the strategy's configs (skipping ``done``), then the test step."""
        self._targets = targets
        if "base" not in self.rows:
            yield self._step(StepPlan(key="base", role="base", cost=self._cost(None, self.n_validation)))
        if self.base is None:
            raise RuntimeError("the base step was not recorded; call record(step.run(...)) before continuing")
        searched = yield from self._search()
        if self.stopped == "running":
            self.stopped = "completed"
        if self.stopped != "cancelled" and searched and "test" not in self.rows:
            yield self._step(self._test_plan())
        self._emit(None)

    def record(self, rows: SweepRow | Sequence[SweepRow]) -> None:
        """Store finished rows (deltas against base, guards and merges are applied here) and report progress."""
        batch = [rows] if isinstance(rows, SweepRow) else list(rows)
        seconds = sum(r.seconds for r in batch)
        stored = []
        for row in batch:
            old = self.rows.get(row.key)
            if (row.role == "config" and old is not None and old.val_indices is not None
                    and row.val_indices is not None):
                row = merge_rows(old, row, self.split.validation)
            self._against_base(row)
            row.step = old.step if old is not None else self._step_no
            if old is None:
                self._step_no += 1
            self.rows[row.key] = row
            stored.append(row)
            logger.info("sweep step %s: acc=%s n=%s logloss=%s%s", row.key, row.val_accuracy, row.val_n,
                        row.val_log_loss, " (collapsed)" if row.collapsed else "")
        self._ran.append((seconds, self._cost_of(batch)))
        for row in stored:  # one progress event per row, so a live table or heatmap fills every cell
            self._emit(row)

    def _against_base(self, row: SweepRow) -> None:
        base = self.base
        if row.role != "config" or base is None or row.val_accuracy is None or base.val_correct is None:
            return
        idx = row.val_indices if row.val_indices is not None else range(len(base.val_correct))
        b_correct = [base.val_correct[i] for i in idx]
        row.delta_accuracy = row.val_accuracy - (sum(b_correct) / len(b_correct) if b_correct else 0.0)
        gold = [base.val_gold_logprobs[i] for i in idx] if base.val_gold_logprobs else []
        if row.val_log_loss is not None and gold and all(g is not None for g in gold):
            row.delta_log_loss = row.val_log_loss + sum(gold) / len(gold)  # type: ignore[arg-type]
        ratio = self.config.max_perplexity_ratio
        if (ratio is not None and row.val_perplexity is not None and base.val_perplexity is not None
                and row.val_perplexity > base.val_perplexity * ratio):
            row.rejected = f"perplexity {row.val_perplexity:.3g} > {ratio:g} x base {base.val_perplexity:.3g}"

    def result(self) -> SweepResult:
        base, winner = self.base, self.best()
        beats = bool(winner and base and self.score(winner) > self.score(base))
        test_row = self.rows.get("test")
        configs = self.config_rows()
        return SweepResult(
            config=self.config, dataset=self.dataset.summary(), n_validation=self.n_validation,
            n_test=len(self.split.test), stopped=self.stopped, base=base, winner=winner,
            beats_base_on_validation=beats,
            rows=sorted(self.rows.values(), key=lambda r: r.step), test=test_row.test if test_row else None,
            elapsed_s=self._clock() - self._t0, example_evaluations=evaluations_of(configs),
            full_grid_evaluations=len(configs) * self.n_validation)

    # ---- strategies

    def _step(self, plan: StepPlan) -> SweepStep:
        return SweepStep(plan, self.executor)

    def _budget_left(self, *, new_configs: bool = True) -> bool:
        if self.should_cancel is not None and self.should_cancel():
            self.stopped = "cancelled"
            return False
        if new_configs and self.config.max_configs is not None and len(self.config_rows()) >= self.config.max_configs:
            self.stopped = "max_configs"
            return False
        if self.config.time_limit_s is not None and self._clock() - self._t0 >= self.config.time_limit_s:
            self.stopped = "time_limit"
            return False
        return True

    def _room(self) -> int | None:
        """Configs the max_configs budget still allows (None: unbounded)."""
        if self.config.max_configs is None:
            return None
        return max(0, self.config.max_configs - len(self.config_rows()))

    def _search(self) -> Generator[SweepStep, None, bool]:
        """The strategy's steps; returns whether any config exists."""
        if self.config.strategy == "spectral_prior" and "spectrum" not in self.rows:
            if not self._budget_left():
                return False
            mats = sorted({(c.type, c.layer) for c in grid_candidates(self.config, self._require_targets())})
            yield self._step(StepPlan(key="spectrum", role="spectrum", configs=[
                PlannedConfig(key=f"{t}:{layer}", interventions=[], type=t, layer=layer) for t, layer in mats]))
        candidates = self._candidates()
        if self.config.strategy == "greedy_compose":
            return (yield from self._greedy(candidates))
        if self.config.strategy == "successive_halving":
            return (yield from self._halving(candidates))
        room = self._room()  # counted from what is planned, so steps may be handed out before they are recorded
        planned = False  # a pool may hold every step in flight: none recorded yet, but there will be rows
        for group in self._groups([c for c in candidates if c.key not in self.rows]):
            if not self._budget_left(new_configs=False):
                break
            if room is not None:
                if room <= 0:
                    self.stopped = "max_configs"
                    break
                group, room = group[:room], room - len(group[:room])
            yield self._step(self._group_plan(group, None, independent=True))
            planned = True
        return planned or bool(self.config_rows())

    @staticmethod
    def _groups(cands: Sequence[Candidate]) -> list[list[Candidate]]:
        """Consecutive candidates of one matrix (all rho of one (type, layer)) form one step."""
        groups: list[list[Candidate]] = []
        for c in cands:
            if groups and (groups[-1][-1].type, groups[-1][-1].layer) == (c.type, c.layer):
                groups[-1].append(c)
            else:
                groups.append([c])
        return groups

    def _group_plan(self, group: Sequence[Candidate], block: int | None, *, independent: bool) -> StepPlan:
        n = self.n_validation if block is None else len(self.executor.blocks[block])  # type: ignore[index]
        return StepPlan(key=group[0].key if len(group) == 1 else f"{group[0].type}:{group[0].layer}",
                        role="config", configs=[_planned([c]) for c in group], block=block,
                        cost=self._cost(group[0].layer, n) * len(group), independent=independent)

    def _require_targets(self) -> ModelTargets:
        if self._targets is None:
            raise RuntimeError("model targets unknown: pass them to steps()")
        return self._targets

    def _candidates(self) -> list[Candidate]:
        grid = grid_candidates(self.config, self._require_targets())
        if self.config.strategy == "greedy_compose":
            rho_order = sorted({c.rho for c in grid}, key=lambda r: (r is not None, r or 0.0))
            types = list(self.config.types)
            return sorted(grid, key=lambda c: (-c.layer, types.index(c.type), rho_order.index(c.rho)))
        if self.config.strategy == "spectral_prior":
            snr = (self.rows["spectrum"].snr or {})
            return sorted(grid, key=lambda c: (snr.get(f"{c.type}:{c.layer}", float("inf")), c.layer,
                                               c.type, -(c.rho if c.rho is not None else 0.0)))
        return grid

    def _greedy(self, candidates: list[Candidate]) -> Generator[SweepStep, None, bool]:
        profile: list[Candidate] = []
        best = self.base
        assert best is not None
        edited: set[tuple[str, int]] = set()
        for c in candidates:
            if (c.type, c.layer) in edited:
                continue
            trial = [*profile, c]
            key = profile_key(trial)
            if key not in self.rows:
                if not self._budget_left():
                    break
                yield self._step(StepPlan(key=key, role="config", configs=[_planned(trial)],
                                          cost=self._cost(min(x.layer for x in trial), self.n_validation)))
                if key not in self.rows:
                    raise RuntimeError(f"step {key} was not recorded; record each row before the next step")
            row = self.rows[key]
            rises = (row.rejected is None and (self.config.allow_collapsed or not row.collapsed)
                     and self.score(row) > self.score(best))
            row.kept = rises
            if rises:
                profile, best = trial, row
                edited.add((c.type, c.layer))
        return bool(self.config_rows())

    def _halving(self, candidates: list[Candidate]) -> Generator[SweepStep, None, bool]:
        blocks = self.executor.blocks
        assert blocks is not None
        room = self._room()
        alive = candidates if room is None else candidates[:room]
        scored = 0
        for r, block in enumerate(blocks):
            need = [c for c in alive if self._needs_block(c.key, scored)]
            groups = self._groups(need)
            for g, group in enumerate(groups):
                if not self._budget_left(new_configs=False):  # alive is already within max_configs
                    return bool(self.config_rows())
                # eliminations read every row of the round: only its last step is a barrier
                yield self._step(self._group_plan(group, r, independent=g < len(groups) - 1))
            scored += len(block)
            if r < len(blocks) - 1:  # after the last block every survivor is scored on all of validation
                alive = self._eliminate(alive, r + 1)
        return bool(self.config_rows())

    def _needs_block(self, key: str, scored: int) -> bool:
        row = self.rows.get(key)
        if row is None:
            return scored == 0
        return row.eliminated is None and (row.val_n or 0) == scored

    def _eliminate(self, alive: list[Candidate], round_no: int) -> list[Candidate]:
        """Drop configs that cannot win, at the run's confidence ``halving_confidence`` split over its elimination
        rounds (Bonferroni: a config that should survive is dropped in some round with probability at most
        ``1 - halving_confidence``):

        - **surely worse than the leader** (``metric: accuracy``): the leader is the eligible config most
          accurate on the examples seen so far; a config is dropped when the one-sided exact McNemar test on
          those same examples says it is less accurate (:func:`~laser_ops.evaluation.mcnemar_worse_p`).
          Configs share their examples, so the test pairs them: only the examples where the two differ count;
        - **surely collapsed** (unless ``allow_collapsed``): the one-sided exact (Clopper-Pearson) lower bound
          of its top-answer share is at the collapse threshold.

        Only the outcomes on the first ``round_no`` blocks count, so a resumed job (whose rows may already hold
        later blocks) takes the same decisions as an uninterrupted one.
        """
        blocks = self.executor.blocks or []
        alpha = (1 - self.config.halving_confidence) / max(1, len(blocks) - 1)
        seen = {i for b in blocks[:round_no] for i in b}
        val = self.split.validation
        rows = [self.rows[c.key] for c in alive if c.key in self.rows]
        outcomes = {r.key: {i: (ok, p) for i, ok, p in zip(r.val_indices or [], r.val_correct or [],
                                                              r.val_predictions or []) if i in seen} for r in rows}
        if not self.config.allow_collapsed:
            for r in rows:
                answers = Counter(answer_text(val.examples[i], p) for i, (_, p) in outcomes[r.key].items())
                n = sum(answers.values())
                top = max(answers.values(), default=0)
                low = float(beta.ppf(alpha, top, n - top + 1)) if top else 0.0
                if r.eliminated is None and low >= COLLAPSE_SHARE:
                    r.eliminated = (f"round {round_no}: collapsed (one answer on at least {low:.1%} of examples, "
                                    f"one-sided exact bound at {1 - alpha:.2%}, after {n} examples)")
        if self.config.metric != "accuracy":  # accuracy-paired tests say nothing about another metric
            return [c for c in alive if c.key in self.rows and self.rows[c.key].eliminated is None]
        contenders = [r for r in rows if self.eligible(r)]
        if contenders:
            def seen_acc(r: SweepRow) -> float:
                got = outcomes[r.key]
                return sum(ok for ok, _ in got.values()) / max(1, len(got))

            leader = max(contenders, key=lambda r: (seen_acc(r), -r.step))
            mine = outcomes[leader.key]
            for r in rows:
                got = outcomes[r.key]
                common = sorted(set(got) & set(mine))
                if r is leader or r.eliminated is not None or not common:
                    continue
                p = mcnemar_worse_p([got[i][0] for i in common], [mine[i][0] for i in common])
                if p < alpha:
                    r.eliminated = (f"round {round_no}: less accurate than the leader {leader.key} "
                                    f"({seen_acc(r):.1%} vs {seen_acc(leader):.1%} on the same {len(common)} examples; "
                                    f"one-sided exact McNemar p={p:.2g} < {alpha:.2g})")
        return [c for c in alive if c.key in self.rows and self.rows[c.key].eliminated is None]

    def test_step(self) -> SweepStep:
        """The test step for the winner among the rows recorded so far."""
        return self._step(self._test_plan())

    def _test_plan(self) -> StepPlan:
        winner = self.best()
        configs = [PlannedConfig(key=winner.key, interventions=winner.interventions, type=winner.type,
                                 layer=winner.layer, rho=winner.rho)] if winner is not None else []
        return StepPlan(key="test", role="test", configs=configs, cost=2 * self._cost(None, len(self.split.test)))

    # ---- progress

    def _layers(self) -> int:
        return self._targets.num_layers if self._targets is not None else 1

    def _cost(self, layer: int | None, n: int) -> float:
        """Example x layer evaluations: the fast evaluator reruns layers >= the lowest edited one; base, test
        and the plain path run every layer."""
        n_layers = self._layers()
        fast = self.config.fast and self.dataset.kind == "multiple_choice"
        return float(n * (n_layers - layer if fast and layer is not None else n_layers))

    def _cost_of(self, rows: Sequence[SweepRow]) -> float:
        total = 0.0
        for r in rows:
            if r.role == "base":
                total += self._cost(None, self.n_validation)
            elif r.role == "test":
                total += 2 * self._cost(None, len(self.split.test))
            elif r.role == "config" and r.interventions:
                layer = min(int(s.get("layer", 0)) for s in r.interventions)
                total += self._cost(layer, len(r.val_indices) if r.val_indices is not None else (r.val_n or 0))
        return total

    def _remaining_cost(self) -> float:
        if self._targets is None:
            return 0.0
        left = 0.0 if self.base is not None else self._cost(None, self.n_validation)
        if self.stopped in ("running",):
            cands = [c for c in self._candidates() if c.key not in self.rows
                     or not self.finished(self.rows[c.key])]
            room = self._room()
            if room is not None:
                cands = cands[:room]
            for c in cands:
                row = self.rows.get(c.key)
                left += self._cost(c.layer, self.n_validation - ((row.val_n or 0) if row is not None else 0))
        if "test" not in self.rows and self.stopped != "cancelled":
            left += 2 * self._cost(None, len(self.split.test))
        return left

    def _emit(self, last: SweepRow | None) -> None:
        if self.on_progress is None:
            return
        done = sum(1 for r in self.rows.values() if self.finished(r) and r.role != "spectrum")
        total = max(self._planned_total(), done)
        spent = sum(c for _, c in self._ran)
        eta = None
        if spent > 0:
            try:
                eta = sum(s for s, _ in self._ran) / spent * self._remaining_cost()
            except Exception:  # noqa: BLE001 - an estimate must never stop the sweep
                logger.debug("eta failed", exc_info=True)
        try:
            self.on_progress(SweepProgress(done=done, total=total, elapsed_s=self._clock() - self._t0, eta_s=eta,
                                           best=self.best(), last=last))
        except Exception:  # noqa: BLE001 - a broken progress sink must not kill the sweep
            logger.exception("progress callback failed")

    def _planned_total(self) -> int:
        if self._targets is None:
            return len(self.rows)
        return planned_total(self.config, len(grid_candidates(self.config, self._targets)))


def planned_total(config: SweepConfig, n_grid: int) -> int:
    """Rows a sweep will finish: its configs (within max_configs), base and test."""
    n = n_grid if config.max_configs is None else min(n_grid, config.max_configs)
    return n + 2


def run_steps(runner: SweepRunner, targets: ModelTargets,
              submit: Callable[[SweepStep], Future[list[SweepRow]]], *, max_in_flight: int = 1,
              on_record: Callable[[list[SweepRow]], None] | None = None) -> SweepResult:
    """Drive a runner through ``submit`` (e.g. a pool of remote workers), up to ``max_in_flight`` steps at once.

    Steps marked ``independent`` are handed out before earlier ones finish; rows are recorded in the order
    the steps were planned, so the result equals running the steps one by one in process. ``on_record``
    gets each step's rows as recorded by the runner (to persist them).
    """
    pending: deque[Future[list[SweepRow]]] = deque()

    def settle() -> None:
        rows = pending.popleft().result()
        runner.record(rows)
        if on_record is not None:
            on_record([runner.rows[r.key] for r in rows])

    try:
        for step in runner.steps(targets):
            if step.role == "test" and pending:  # the winner is chosen from every config's rows: record them first
                while pending:
                    settle()
                step = runner.test_step()
            pending.append(submit(step))
            while pending and (not step.plan.independent or len(pending) >= max(1, max_in_flight)):
                settle()
        while pending:
            settle()
    finally:
        for f in pending:
            f.cancel()
    return runner.result()


def run_sweep(config: SweepConfig, dataset: Dataset | None, swapper: WeightSwapper, scorer: Scorer, *,
              completed: Iterable[SweepRow | dict[str, Any]] = (),
              on_progress: Callable[[SweepProgress], None] | None = None,
              should_cancel: Callable[[], bool] | None = None) -> SweepResult:
    """Convenience: build a :class:`SweepRunner` and run it inline."""
    runner = SweepRunner(config, dataset, completed=completed, on_progress=on_progress, should_cancel=should_cancel)
    return runner.run(swapper, scorer)


def rows_to_jsonl(rows: Iterable[SweepRow]) -> str:
    """Rows as JSON lines (what a job persists to resume)."""
    return "".join(json.dumps(r.model_dump(mode="json")) + "\n" for r in rows)
