"""The sweep config: what a validation sweep searches and how (JSON in, JSON out; the server stores it with its
job). Plain data (no torch): :mod:`laser_ops.sweeps` runs it on a model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, Tag, WithJsonSchema, field_validator

from laser_protocol.interventions import MAX_SEED, TYPES, EditKindName
from laser_protocol.validation import REQUEST_CONFIG, Int, IntRange

PAPER_RHOS: tuple[float, ...] = (0.9, 0.8, 0.6, 0.2, 0.1, 0.05, 0.01)
PAPER_TYPES: tuple[str, ...] = ("fc_in", "fc_out")
NO_KNOB = ("laser_mp", "zero")

Strategy = Literal["grid", "greedy_compose", "spectral_prior", "successive_halving"]
StopReason = Literal["running", "completed", "max_configs", "time_limit", "cancelled"]


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
