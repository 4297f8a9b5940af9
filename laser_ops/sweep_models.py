"""Sweep data: the config (what to search), candidates, rows (what each step found), test reports, plans.

Everything here is plain data (pydantic models and frozen dataclasses): a job stores it as JSON, a
remote worker receives a :class:`StepPlan` and answers :class:`SweepRow` objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, Tag, WithJsonSchema, field_validator

from laser_ops.evaluation import EvalReport, LabelMetrics
from laser_ops.interventions import MAX_SEED, EditKindName
from laser_ops.targets import TYPES, ModelTargets, TargetError
from laser_ops.validation import REQUEST_CONFIG, Int, IntRange

PAPER_RHOS: tuple[float, ...] = (0.9, 0.8, 0.6, 0.2, 0.1, 0.05, 0.01)
PAPER_TYPES: tuple[str, ...] = ("fc_in", "fc_out")
NO_KNOB = ("laser_mp", "zero")

Strategy = Literal["grid", "greedy_compose", "spectral_prior", "successive_halving"]
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
        "accuracy strictly rises; the winner is the composed profile), spectral_prior (matrices with the "
        "lowest Marchenko-Pastur SNR first; useful with a budget) or successive_halving (the grid scored on a "
        "growing seeded subset of validation; a config is dropped once a one-sided exact McNemar test on the "
        "examples seen says it is less accurate than the leader, or it has surely collapsed)."))
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
    metric: Literal["accuracy", "balanced_accuracy", "log_loss"] = Field("accuracy", description=(
        "Selection metric on validation; ties go to lower log-loss. balanced_accuracy (mean recall per gold "
        "label) is for multiple choice: it does not reward answering the majority label."))
    allow_collapsed: bool = Field(False, description=(
        "Let a collapsed config win (one that gives its most frequent answer on >= 95% of validation "
        "examples); by default such a config only moved the label bias and cannot win."))
    halving_min_examples: Int = Field(32, ge=2, description=(
        "successive_halving: validation examples of the first round (each round doubles the subset)."))
    halving_confidence: float = Field(0.95, gt=0.5, lt=1, description=(
        "successive_halving: confidence of the whole run's eliminations (split evenly over its rounds)."))
    normalize: bool = Field(False, description="Multiple choice: compare per-token log-probs.")
    max_new_tokens: Int = Field(10, ge=1, le=512, description="Generation: greedy tokens decoded.")
    max_configs: IntRange(ge=1) | None = Field(None, description="Budget: configs evaluated (base not counted).")
    time_limit_s: float | None = Field(None, gt=0, description="Budget: wall-clock seconds of search.")
    max_perplexity_ratio: float | None = Field(None, gt=1, description=(
        "Guard: reject configs whose perplexity on the validation texts exceeds base x this ratio."))
    fast: bool = Field(True, description=(
        "Use the layer-cached multiple-choice evaluator (all rho of a matrix in one replicated pass)."))
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
        elif self.kind not in NO_KNOB:
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
    rhos: list[float | None] = [None] if config.kind in NO_KNOB else sorted(config.rhos, reverse=True)
    if config.kind == "prune_magnitude" and any(r == 1.0 for r in config.rhos):
        rhos = [r for r in rhos if r != 1.0] or rhos  # sparsity 0 is the base model; keep it only if alone
    return [Candidate(config.kind, t, layer, rho, config.seed)
            for layer in sorted(layers) for t in config.types for rho in rhos]


# ---------------------------------------------------------------------------------------------- records


class SweepRow(BaseModel):
    """One evaluated profile (or the base, spectrum or test step). Rows are the job's persistent state."""

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
    val_n: int | None = Field(None, description="Validation examples scored (fewer once successive halving drops it).")
    val_n_correct: int | None = None
    val_labels: LabelMetrics | None = Field(None, description="Majority baseline, answer concentration, balanced "
                                                              "accuracy, macro-F1 on the examples scored.")
    collapsed: bool = Field(False, description="Most frequent answer on >= 95% of examples (cannot win by default).")
    delta_accuracy: float | None = None
    delta_log_loss: float | None = None
    val_indices: list[int] | None = Field(None, description=(
        "Positions in the validation split of the outcomes below; None: all, in split order."))
    val_predictions: list[int | str | None] | None = Field(None, description=(
        "Per-example prediction on validation (MC: chosen index)."))
    val_correct: list[bool] | None = Field(None, description="Per-example outcome on validation (paired tests).")
    val_gold_logprobs: list[float | None] | None = Field(None, description="Per-example log P(gold answer).")
    rejected: str | None = Field(None, description="Why the config cannot win (perplexity guard).")
    eliminated: str | None = Field(None, description="successive_halving: why and when the config was dropped.")
    kept: bool | None = Field(None, description="greedy_compose: the edit was added to the profile.")
    snr: dict[str, float] | None = Field(None, description="spectral_prior: SNR per 'type:layer'.")
    test: TestReport | None = None
    seconds: float = 0.0

    EVIDENCE: ClassVar[frozenset[str]] = frozenset({"val_indices", "val_predictions", "val_correct",
                                                    "val_gold_logprobs"})

    def without_evidence(self) -> SweepRow:
        """The row without per-example lists (what tables and progress events need)."""
        return self.model_copy(update={k: None for k in self.EVIDENCE})


class TestReport(BaseModel):
    """Base and winner on the test split: accuracies with Wilson CIs, label metrics, exact McNemar tests
    against base and against the majority-class constant predictor, and the plain-words verdict."""

    __test__ = False  # not a pytest class

    winner_key: str
    interventions: list[dict[str, Any]]
    base: EvalReport
    winner: EvalReport
    delta_accuracy: float
    mcnemar: dict[str, Any]
    majority_label: str | None = None
    majority_accuracy: float | None = None
    mcnemar_majority: dict[str, Any] | None = Field(None, description="Winner vs always answering majority_label.")
    verdict: str = ""


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
    example_evaluations: int = Field(0, description="Validation example-evaluations spent on configs.")
    full_grid_evaluations: int = Field(0, description="What scoring every config on all validation would cost.")


class PlannedConfig(BaseModel):
    """One profile a step evaluates (a row of the result)."""

    key: str
    interventions: list[dict[str, Any]]
    type: str | None = None
    layer: int | None = None
    rho: float | None = None


class StepPlan(BaseModel):
    """What one step computes, as data: a local executor or a remote worker runs it the same way.

    ``configs`` (role config) share one matrix when they come from one (type, layer) of a grid, so the
    executor scores them in one replicated pass; ``block`` restricts them to one successive-halving
    block of validation; ``cost`` (example x layer evaluations) drives the ETA.
    """

    key: str
    role: Literal["base", "config", "spectrum", "test"]
    configs: list[PlannedConfig] = Field(default_factory=list)
    block: int | None = None
    cost: float = 0.0
    independent: bool = Field(False, description=(
        "The steps after this one do not read its rows: a pool may start them before it finishes."))
