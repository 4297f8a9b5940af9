"""Sweep data: candidates, rows (what each step found), test reports, plans; the config (what to search) is
:class:`laser_protocol.sweeps.SweepConfig`, re-exported here.

Everything here is plain data (pydantic models and frozen dataclasses): a job stores it as JSON, a
remote worker receives a :class:`StepPlan` and answers :class:`SweepRow` objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from laser_ops.evaluation import EvalReport, LabelMetrics
from laser_ops.targets import ModelTargets, TargetError
from laser_protocol.sweeps import NO_KNOB, PAPER_RHOS, PAPER_TYPES, StopReason, Strategy, SweepConfig

__all__ = ["NO_KNOB", "PAPER_RHOS", "PAPER_TYPES", "Candidate", "PlannedConfig", "StepPlan", "StopReason",
           "Strategy", "SweepConfig", "SweepConfigError", "SweepProgress", "SweepResult", "SweepRow", "TestReport",
           "grid_candidates", "profile_key"]


class SweepConfigError(ValueError):
    """A sweep config that does not fit the model; ``field`` names the offending config field."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


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
