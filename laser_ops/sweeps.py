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

The runner is an iterator of steps, one config per step, so a server can run each step on its
model-owner thread (``step.run(swapper, scorer) -> SweepRow``), record it, persist the rows, and
later resume: rows passed back in are not recomputed (their keys are ``done``). Budgets
(``max_configs``, ``time_limit_s``) and the cancellation check apply between steps.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, Tag, WithJsonSchema, field_validator

from laser_ops.datasets import Dataset, Split, builtin_dataset, stratified_split
from laser_ops.evaluation import (
    EvalReport,
    FastChoiceEvaluator,
    evaluate_generation,
    evaluate_multiple_choice,
    mcnemar_exact,
    perplexity,
    report_from_predictions,
)
from laser_ops.interventions import MAX_SEED, EditKindName
from laser_ops.scoring import HFScorer, Scorer
from laser_ops.swap import WeightSwapper
from laser_ops.targets import TYPES, ModelTargets, TargetError
from laser_ops.validation import REQUEST_CONFIG, Int, IntRange

logger = logging.getLogger(__name__)

PAPER_RHOS: tuple[float, ...] = (0.9, 0.8, 0.6, 0.2, 0.1, 0.05, 0.01)
PAPER_TYPES: tuple[str, ...] = ("fc_in", "fc_out")
_NO_KNOB = ("laser_mp", "zero")

Strategy = Literal["grid", "greedy_compose", "spectral_prior"]
StopReason = Literal["running", "completed", "max_configs", "time_limit", "cancelled"]


class SweepConfigError(ValueError):
    """A sweep config that does not fit the model; ``field`` names the offending config field."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class SweepConfig(BaseModel):
    """What to search and how; JSON in, JSON out (the server stores it with the job)."""

    model_config = REQUEST_CONFIG

    dataset: str | None = Field(None, description="Built-in dataset name (or an id the caller resolves).")
    strategy: Strategy = Field("grid", description=(
        "Search order: grid (every type x layer x rho), greedy_compose (add an edit only if validation "
        "accuracy strictly rises; the winner is the composed profile) or spectral_prior (matrices with the "
        "lowest Marchenko-Pastur SNR first; useful with a budget)."))
    kind: EditKindName = Field("laser", description="Edit kind swept (controls: random_basis, keep_bottom, "
                                                    "prune_magnitude with sparsity = 1 - rho).")
    types: list[Annotated[str, WithJsonSchema({"type": "string", "enum": list(TYPES)})]] = Field(
        default_factory=lambda: list(PAPER_TYPES), min_length=1, description=f"LASER types, from {TYPES}.")
    layers: Annotated[list[Int], Field(min_length=1, max_length=4096), Tag("list[int]")] | Literal["all"] = Field(
        "all", description="0-based layers (negative from the end) or 'all'.")
    rhos: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: list(PAPER_RHOS), min_length=1, max_length=1024,
        description="Rank fractions in (0, 1].")
    seed: Int = Field(0, ge=0, le=MAX_SEED, description="Seeds the split (and random_basis).")
    validation_fraction: float = Field(0.2, gt=0, lt=1, description=(
        "Share of the dataset held out for validation (seeded, stratified by gold label); the rest is test."))
    max_validation_examples: IntRange(ge=2) | None = Field(None, description=(
        "Cap on validation examples (a seeded stratified subsample); unset: the whole split."))
    max_test_examples: IntRange(ge=2) | None = Field(None, description=(
        "Cap on test examples (a seeded stratified subsample); unset: the whole split."))
    metric: Literal["accuracy", "log_loss"] = Field("accuracy", description=(
        "Selection metric on validation; accuracy ties go to lower log-loss."))
    normalize: bool = Field(False, description="Multiple choice: compare per-token log-probs.")
    max_new_tokens: Int = Field(10, ge=1, le=512, description="Generation: greedy tokens decoded.")
    max_configs: IntRange(ge=1) | None = Field(None, description="Budget: configs evaluated (base not counted).")
    time_limit_s: float | None = Field(None, gt=0, description="Budget: wall-clock seconds of search.")
    max_perplexity_ratio: float | None = Field(None, gt=1, description=(
        "Guard: reject configs whose perplexity on the validation texts exceeds base x this ratio."))
    fast: bool = Field(True, description="Use the layer-cached multiple-choice evaluator where supported.")
    batch_size: Int = Field(16, ge=1, le=1024, description=(
        "Sequences per forward pass of the fast multiple-choice evaluator."))

    @field_validator("types")
    @classmethod
    def _check_types(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"types must not be empty; allowed: {list(TYPES)}")
        bad = [t for t in v if t not in TYPES]
        if bad:
            raise ValueError(f"unknown type(s) {bad}; allowed: {list(TYPES)}")
        return list(dict.fromkeys(v))

    @field_validator("rhos")
    @classmethod
    def _check_rhos(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("rhos must not be empty; allowed range (0, 1]")
        bad = [r for r in v if not 0 < r <= 1]
        if bad:
            raise ValueError(f"rho value(s) {bad} out of range: allowed (0, 1]")
        return list(dict.fromkeys(float(r) for r in v))

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v: list[int] | str) -> list[int] | str:
        if isinstance(v, list) and not v:
            raise ValueError("layers must not be empty; give 0-based ints or 'all'")
        return list(dict.fromkeys(v)) if isinstance(v, list) else v


# ---------------------------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    """One edit (tau, l, rho) of the swept kind; ``key`` identifies it across restarts."""

    kind: str
    type: str
    layer: int
    rho: float | None
    seed: int = 0

    @property
    def key(self) -> str:
        rho = "" if self.rho is None else f":{_rho_text(self.rho)}"
        seed = f":seed={self.seed}" if self.kind == "random_basis" else ""
        return f"{self.kind}:{self.type}:{self.layer}{rho}{seed}"

    def spec(self) -> dict[str, Any]:
        """The intervention JSON (prune_magnitude: sparsity = 1 - rho)."""
        out: dict[str, Any] = {"kind": self.kind, "target": self.type, "layer": self.layer}
        if self.kind == "prune_magnitude":
            out["sparsity"] = round(1.0 - float(self.rho or 0.0), 12)
        elif self.kind not in _NO_KNOB:
            out["rank_fraction"] = self.rho
        if self.kind == "random_basis":
            out["seed"] = self.seed
        return out


def _rho_text(rho: float) -> str:
    """``rho`` short (``0.01``, ``1``) but exact: ``:g`` alone rounds to 6 digits, so 0.1 and 0.1000001 collide."""
    text = f"{rho:g}"
    return text if float(text) == rho else repr(float(rho))


def profile_key(candidates: Sequence[Candidate]) -> str:
    return "+".join(c.key for c in candidates) or "base"


def grid_candidates(config: SweepConfig, targets: ModelTargets) -> list[Candidate]:
    """Every (type, layer, rho) of the config on this model, in (layer, type, rho descending) order.

    Layer-major order lets the fast evaluator reuse the cached hidden states of each layer for
    all its configs and the SVD cache reuse one decomposition for all rho.
    """
    for t in config.types:
        if t not in targets.spec.types:
            raise SweepConfigError(f"architecture {targets.spec.name!r} has no {t!r}; "
                                   f"allowed: {list(targets.types)}", "types")
    try:
        layers = targets.normalize_layers(range(targets.num_layers) if config.layers == "all" else config.layers)
    except TargetError as e:
        raise SweepConfigError(str(e), "layers") from None
    rhos: list[float | None] = [None] if config.kind in _NO_KNOB else sorted(config.rhos, reverse=True)
    if config.kind == "prune_magnitude" and any(r == 1.0 for r in config.rhos):
        rhos = [r for r in rhos if r != 1.0] or rhos  # sparsity 0 is the base model; keep it only if alone
    return [Candidate(config.kind, t, layer, rho, config.seed)
            for layer in sorted(layers) for t in config.types for rho in rhos]


# ---------------------------------------------------------------------------------------------- records


class SweepRow(BaseModel):
    """One finished step. Rows are the job's persistent state: pass them back to resume."""

    key: str
    step: int
    role: Literal["base", "config", "spectrum", "test"]
    interventions: list[dict[str, Any]] = Field(default_factory=list)
    type: str | None = None
    layer: int | None = None
    rho: float | None = None
    val_accuracy: float | None = None
    val_log_loss: float | None = None
    val_perplexity: float | None = None
    delta_accuracy: float | None = None
    delta_log_loss: float | None = None
    val_predictions: list[int | str | None] | None = Field(None, description=(
        "Per-example prediction on validation (MC: chosen index), in split order."))
    val_correct: list[bool] | None = Field(None, description="Per-example outcome on validation (paired tests).")
    rejected: str | None = Field(None, description="Why the config cannot win (perplexity guard).")
    kept: bool | None = Field(None, description="greedy_compose: the edit was added to the profile.")
    snr: dict[str, float] | None = Field(None, description="spectral_prior: SNR per 'type:layer'.")
    test: TestReport | None = None
    seconds: float = 0.0


class TestReport(BaseModel):
    """Base and winner on the test split: accuracy with Wilson CIs, log-loss, exact McNemar."""

    __test__ = False  # not a pytest class

    winner_key: str
    interventions: list[dict[str, Any]]
    base: EvalReport
    winner: EvalReport
    delta_accuracy: float
    mcnemar: dict[str, Any]


SweepRow.model_rebuild()


class SweepProgress(BaseModel):
    done: int
    total: int
    elapsed_s: float
    eta_s: float | None
    best: SweepRow | None
    last: SweepRow | None


class SweepResult(BaseModel):
    config: SweepConfig
    dataset: dict[str, Any]
    n_validation: int
    n_test: int
    stopped: StopReason
    base: SweepRow | None
    winner: SweepRow | None
    beats_base_on_validation: bool
    rows: list[SweepRow]
    test: TestReport | None
    elapsed_s: float


@dataclass(frozen=True)
class SweepStep:
    """One unit of work; ``run`` must be called on the thread that owns the model."""

    key: str
    role: str
    run: Callable[[WeightSwapper, Scorer], SweepRow]


# ---------------------------------------------------------------------------------------------- runner


def _outcomes(report: EvalReport) -> dict[str, Any]:
    return {"val_predictions": [o.prediction for o in report.outcomes],
            "val_correct": [o.correct for o in report.outcomes]}


def _cap(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(dataset):
        return dataset
    return stratified_split(dataset, n / len(dataset), seed).validation.model_copy(update={"name": dataset.name})


class SweepRunner:
    """Plans and records a sweep; :meth:`steps` yields the work, :meth:`record` takes each result.

    Usage (what :meth:`run` does; a server does the same with ``step.run`` on its model thread)::

        runner = SweepRunner(config, dataset, completed=saved_rows, on_progress=cb, should_cancel=flag)
        for step in runner.steps():
            runner.record(step.run(swapper, scorer))
        result = runner.result()

    Adaptive strategies read recorded rows when the iterator resumes, so record each step's row
    before asking for the next one. ``time_limit_s`` counts from this runner's creation (a resumed
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
    ) -> None:
        if dataset is None:
            if config.dataset is None:
                raise SweepConfigError("give a dataset or a built-in dataset name", "dataset")
            dataset = builtin_dataset(config.dataset)
        self.config = config
        self.dataset = dataset
        split = stratified_split(dataset, config.validation_fraction, config.seed)
        self.split = Split(validation=_cap(split.validation, config.max_validation_examples, config.seed),
                           test=_cap(split.test, config.max_test_examples, config.seed),
                           seed=split.seed, validation_fraction=split.validation_fraction)
        self.rows: dict[str, SweepRow] = {}
        for r in completed:
            row = r if isinstance(r, SweepRow) else SweepRow.model_validate(r)
            self.rows[row.key] = row
        self.on_progress = on_progress
        self.should_cancel = should_cancel
        self._clock = clock
        self._t0 = clock()
        self._ran: list[float] = []  # seconds of steps run in this session (for the ETA)
        self._total = 0
        self._step_no = max((r.step for r in self.rows.values()), default=-1) + 1
        self.stopped: StopReason = "running"
        self._fast: dict[tuple[int, str], FastChoiceEvaluator] = {}
        self._targets: ModelTargets | None = None
        self._lazy_targets: ModelTargets | None = None
        self._guard_texts = [self.split.validation.prompt(e) + e.gold_text for e in self.split.validation.examples]

    # ---- state

    @property
    def done(self) -> set[str]:
        """Keys of finished steps (skipped on resume)."""
        return set(self.rows)

    @property
    def base(self) -> SweepRow | None:
        return self.rows.get("base")

    def config_rows(self) -> list[SweepRow]:
        return sorted((r for r in self.rows.values() if r.role == "config"), key=lambda r: r.step)

    def best(self) -> SweepRow | None:
        """The validation winner: highest accuracy, ties to lower log-loss, then the earlier step."""
        rows = [r for r in self.config_rows() if r.rejected is None and r.val_accuracy is not None]
        if self.config.strategy == "greedy_compose":
            kept = [r for r in rows if r.kept]
            return kept[-1] if kept else None
        if not rows:
            return None
        inf = float("inf")
        if self.config.metric == "log_loss":
            return min(rows, key=lambda r: (r.val_log_loss if r.val_log_loss is not None else inf, r.step))
        return min(rows, key=lambda r: (-(r.val_accuracy or 0.0),
                                        r.val_log_loss if r.val_log_loss is not None else inf, r.step))

    # ---- driving

    def run(self, swapper: WeightSwapper, scorer: Scorer) -> SweepResult:
        """Run every remaining step inline (single-threaded use, tests, the benchmark)."""
        for step in self.steps(swapper.targets):
            self.record(step.run(swapper, scorer))
        return self.result()

    def steps(self, targets: ModelTargets | None = None) -> Iterator[SweepStep]:
        """Base, then the strategy's configs (skipping ``done``), then the test step.

        ``targets`` (the swapper's) lets the grid be validated before any work; without it the grid
        is resolved inside the first step that has the model.
        """
        self._targets = targets
        if targets is not None:
            self._total = self._planned_total(grid_candidates(self.config, targets))
        if "base" not in self.rows:
            yield SweepStep("base", "base", self._base_step)
        if self.base is None:
            raise RuntimeError("the base step was not recorded; call record(step.run(...)) before continuing")
        searched = yield from self._search()
        if self.stopped == "running":
            self.stopped = "completed"
        if self.stopped != "cancelled" and searched and "test" not in self.rows:
            yield SweepStep("test", "test", self._test_step)
        self._emit(None)

    def record(self, row: SweepRow) -> None:
        """Store a finished step (deltas against base are filled in here) and report progress."""
        base = self.base
        if row.role == "config" and base is not None and row.val_accuracy is not None:
            row.delta_accuracy = row.val_accuracy - (base.val_accuracy or 0.0)
            if row.val_log_loss is not None and base.val_log_loss is not None:
                row.delta_log_loss = row.val_log_loss - base.val_log_loss
            if (self.config.max_perplexity_ratio is not None and row.val_perplexity is not None
                    and base.val_perplexity is not None
                    and row.val_perplexity > base.val_perplexity * self.config.max_perplexity_ratio):
                row.rejected = (f"perplexity {row.val_perplexity:.3g} > {self.config.max_perplexity_ratio:g} x "
                                f"base {base.val_perplexity:.3g}")
        row.step = self._step_no
        self._step_no += 1
        self.rows[row.key] = row
        self._ran.append(row.seconds)
        logger.info("sweep step %s: acc=%s logloss=%s (%.1fs)", row.key, row.val_accuracy, row.val_log_loss,
                    row.seconds)
        self._emit(row)

    def result(self) -> SweepResult:
        base, winner = self.base, self.best()
        beats = bool(winner and base and (winner.val_accuracy or 0) > (base.val_accuracy or 0))
        test_row = self.rows.get("test")
        return SweepResult(
            config=self.config, dataset=self.dataset.summary(), n_validation=len(self.split.validation),
            n_test=len(self.split.test), stopped=self.stopped, base=base, winner=winner,
            beats_base_on_validation=beats,
            rows=sorted(self.rows.values(), key=lambda r: r.step), test=test_row.test if test_row else None,
            elapsed_s=self._clock() - self._t0)

    # ---- strategies

    def _budget_left(self) -> bool:
        if self.should_cancel is not None and self.should_cancel():
            self.stopped = "cancelled"
            return False
        if self.config.max_configs is not None and len(self.config_rows()) >= self.config.max_configs:
            self.stopped = "max_configs"
            return False
        if self.config.time_limit_s is not None and self._clock() - self._t0 >= self.config.time_limit_s:
            self.stopped = "time_limit"
            return False
        return True

    def _search(self) -> Iterator[SweepStep]:  # returns whether any config exists (generator return value)
        if self.config.strategy == "spectral_prior" and "spectrum" not in self.rows:
            if not self._budget_left():
                return False
            yield SweepStep("spectrum", "spectrum", self._spectrum_step)
        candidates = self._candidates()
        if self._total == 0:
            self._total = self._planned_total(candidates)
        if self.config.strategy == "greedy_compose":
            return (yield from self._greedy(candidates))
        for c in candidates:
            if c.key in self.rows:
                continue
            if not self._budget_left():
                break
            yield SweepStep(c.key, "config", self._config_step([c]))
        return bool(self.config_rows())

    def _candidates(self) -> list[Candidate]:
        targets = self._targets
        if targets is None:  # resolved lazily by the base step, which has the model
            targets = self._lazy_targets
        if targets is None:
            raise RuntimeError("model targets unknown: pass them to steps() or run the base step first")
        grid = grid_candidates(self.config, targets)
        if self.config.strategy == "greedy_compose":
            rho_order = sorted({c.rho for c in grid}, key=lambda r: (r is not None, r or 0.0))
            types = list(self.config.types)
            return sorted(grid, key=lambda c: (-c.layer, types.index(c.type), rho_order.index(c.rho)))
        if self.config.strategy == "spectral_prior":
            snr = (self.rows["spectrum"].snr or {})
            return sorted(grid, key=lambda c: (snr.get(f"{c.type}:{c.layer}", float("inf")), c.layer,
                                               c.type, c.rho if c.rho is not None else 0.0))
        return grid

    def _greedy(self, candidates: list[Candidate]) -> Iterator[SweepStep]:
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
                yield SweepStep(key, "config", self._config_step(trial))
                if key not in self.rows:
                    raise RuntimeError(f"step {key} was not recorded; record each row before the next step")
            row = self.rows[key]
            rises = (row.rejected is None and row.val_accuracy is not None
                     and row.val_accuracy > (best.val_accuracy or 0.0))
            row.kept = rises
            if rises:
                profile, best = trial, row
                edited.add((c.type, c.layer))
        return bool(self.config_rows())

    def _planned_total(self, grid: list[Candidate]) -> int:
        n = len(grid)
        if self.config.max_configs is not None:
            n = min(n, self.config.max_configs)
        return n + 2 + (self.config.strategy == "spectral_prior")  # base, test (, spectrum)

    # ---- step bodies (run on the model-owner thread)

    def _base_step(self, swapper: WeightSwapper, scorer: Scorer) -> SweepRow:
        self._lazy_targets = swapper.targets
        if self._total == 0:
            self._total = self._planned_total(grid_candidates(self.config, swapper.targets))
        t0 = time.perf_counter()
        report, ppl = self._validate(swapper, scorer, [])
        return SweepRow(key="base", step=0, role="base", val_accuracy=report.accuracy, val_log_loss=report.log_loss,
                        val_perplexity=ppl, seconds=time.perf_counter() - t0, **_outcomes(report))

    def _spectrum_step(self, swapper: WeightSwapper, scorer: Scorer) -> SweepRow:
        t0 = time.perf_counter()
        self._lazy_targets = swapper.targets
        mats = {(c.type, c.layer) for c in grid_candidates(self.config, swapper.targets)}
        snr = {f"{t}:{layer}": swapper.spectrum(t, layer).snr for t, layer in sorted(mats)}
        return SweepRow(key="spectrum", step=0, role="spectrum", snr=snr, seconds=time.perf_counter() - t0)

    def _config_step(self, profile: list[Candidate]) -> Callable[[WeightSwapper, Scorer], SweepRow]:
        def run(swapper: WeightSwapper, scorer: Scorer) -> SweepRow:
            t0 = time.perf_counter()
            specs = [c.spec() for c in profile]
            report, ppl = self._validate(swapper, scorer, specs)
            last = profile[-1]
            return SweepRow(key=profile_key(profile), step=0, role="config", interventions=specs, type=last.type,
                            layer=last.layer, rho=last.rho, val_accuracy=report.accuracy,
                            val_log_loss=report.log_loss, val_perplexity=ppl, seconds=time.perf_counter() - t0,
                            **_outcomes(report))
        return run

    def _test_step(self, swapper: WeightSwapper, scorer: Scorer) -> SweepRow:
        t0 = time.perf_counter()
        winner = self.best()
        specs = winner.interventions if winner is not None else []
        base_report = self._evaluate(swapper, scorer, self.split.test, [], cache=False)
        win_report = self._evaluate(swapper, scorer, self.split.test, specs, cache=False)
        test = TestReport(
            winner_key=winner.key if winner else "base", interventions=specs, base=base_report, winner=win_report,
            delta_accuracy=win_report.accuracy - base_report.accuracy,
            mcnemar=mcnemar_exact(base_report.correct, win_report.correct).to_dict())
        logger.info("test: base %.4f -> winner %.4f; %s", base_report.accuracy, win_report.accuracy,
                    test.mcnemar["verdict"])
        return SweepRow(key="test", step=0, role="test", interventions=specs, val_accuracy=None, test=test,
                        seconds=time.perf_counter() - t0)

    def _validate(self, swapper: WeightSwapper, scorer: Scorer, specs: list[dict[str, Any]]
                  ) -> tuple[EvalReport, float | None]:
        report = self._evaluate(swapper, scorer, self.split.validation, specs, cache=True)
        ppl = None
        if self.config.max_perplexity_ratio is not None:
            with swapper.applied_profile(specs):
                ppl = perplexity(scorer, self._guard_texts)
        return report, ppl

    def _evaluate(self, swapper: WeightSwapper, scorer: Scorer, data: Dataset, specs: list[dict[str, Any]],
                  *, cache: bool) -> EvalReport:
        """One profile on one split, through the fast evaluator where it applies."""
        if data.kind == "multiple_choice" and self.config.fast and isinstance(scorer, HFScorer):
            key = (id(scorer), data.name)
            ev = self._fast.get(key)
            if ev is None:
                ev = FastChoiceEvaluator(scorer, data.choice_items(), batch_size=self.config.batch_size,
                                         normalize=self.config.normalize,
                                         max_cache_bytes=(1 << 30) if cache else 0)
                self._fast[key] = ev
            return report_from_predictions(data, ev.evaluate_profile(swapper, specs))
        with swapper.applied_profile(specs):
            if data.kind == "multiple_choice":
                return evaluate_multiple_choice(scorer, data, normalize=self.config.normalize)
            return evaluate_generation(scorer, data, max_new_tokens=self.config.max_new_tokens)

    # ---- progress

    def _emit(self, last: SweepRow | None) -> None:
        if self.on_progress is None:
            return
        done = len(self.rows)
        total = max(self._total, done)
        mean = sum(self._ran) / len(self._ran) if self._ran else None
        eta = mean * (total - done) if mean is not None else None
        try:
            self.on_progress(SweepProgress(done=done, total=total, elapsed_s=self._clock() - self._t0, eta_s=eta,
                                           best=self.best(), last=last))
        except Exception:  # noqa: BLE001 - a broken progress sink must not kill the sweep
            logger.exception("progress callback failed")


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
