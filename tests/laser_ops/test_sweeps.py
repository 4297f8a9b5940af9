"""Tests for laser_ops.sweeps (protocol, strategies, resume, budgets) and laser_ops.plots."""

from __future__ import annotations

import functools
import random

import pytest
from pydantic import ValidationError

from laser_ops.datasets import Dataset, Example, PromptFormat
from laser_ops.evaluation import evaluate_multiple_choice
from laser_ops.plots import accuracy_heatmap_png
from laser_ops.scoring import HFScorer
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.sweeps import (
    Candidate,
    SweepConfig,
    SweepConfigError,
    SweepProgress,
    SweepRow,
    SweepRunner,
    grid_candidates,
    rows_to_jsonl,
    run_sweep,
)
from laser_ops.testing import make_tiny_model, tiny_tokenizer

WORDS = ["Paris", "Rome", "France", "Italy", "city", "capital", "fox", "dog", "yes", "no", "blue", "red"]


def toy_mc(n: int = 24, seed: int = 0) -> Dataset:
    """A small multiple-choice set the tiny models answer differently under different edits."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
        choices = rng.sample(["Paris", "Rome is a city", "no", "the lazy dog", "blue"], rng.randint(2, 3))
        examples.append(Example(id=i, input=words, choices=choices, correct=[rng.randrange(len(choices))]))
    fmt = PromptFormat(task_prefix="Question: ", example_output_prefix="\nA: ")
    return Dataset(name="toy", kind="multiple_choice", examples=examples, format=fmt)


@functools.cache
def _setup() -> tuple[HFScorer, WeightSwapper]:
    model = make_tiny_model("llama")
    return HFScorer(model, tiny_tokenizer(), batch_size=8), WeightSwapper(model, svd_cache=SvdCache("tiny"))


def _cfg(**kw) -> SweepConfig:
    base = dict(types=["fc_in", "fc_out"], layers=[1, 2], rhos=[0.5, 0.1], validation_fraction=0.5, seed=0)
    return SweepConfig(**{**base, **kw})


# ---- config validation


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("rhos", [0.5, 1.5], "less than or equal to 1"),
    ("rhos", [0.0], "greater than 0"),
    ("rhos", [], "at least 1 item"),
    ("rhos", [float("nan")], "finite number"),
    ("seed", 2**64, "less than or equal to 9223372036854775807"),
    ("layers", [True], "not a boolean"),
    ("types", ["fc_in", "bogus"], "allowed: ['fc_in'"),
    ("validation_fraction", 1.0, "less than 1"),
    ("strategy", "random", "grid"),
    ("max_configs", 0, "greater than or equal to 1"),
])
def test_invalid_config_names_field_and_range(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        SweepConfig(**{field: value})
    err = info.value.errors()[0]
    assert err["loc"][0] == field
    assert needle in str(info.value)


def test_grid_checked_against_the_model() -> None:
    _, sw = _setup()
    with pytest.raises(SweepConfigError) as info:
        grid_candidates(_cfg(layers=[1, 7]), sw.targets)
    assert info.value.field == "layers" and "allowed -3..2" in str(info.value)
    gpt2 = WeightSwapper(make_tiny_model("gpt2"), svd_cache=SvdCache("g"))
    with pytest.raises(SweepConfigError, match="fc_up") as info:
        grid_candidates(_cfg(types=["fc_up"]), gpt2.targets)
    assert info.value.field == "types"
    grid = grid_candidates(SweepConfig(), sw.targets)  # paper defaults: 2 types x all layers x 7 rho
    assert len(grid) == 2 * 3 * 7 and grid[0].layer == 0


def test_candidate_specs_for_controls() -> None:
    assert Candidate("prune_magnitude", "fc_in", 2, 0.1).spec() == {
        "kind": "prune_magnitude", "target": "fc_in", "layer": 2, "sparsity": 0.9}
    assert Candidate("random_basis", "fc_in", 2, 0.1, seed=3).spec()["seed"] == 3
    assert "rank_fraction" not in Candidate("laser_mp", "fc_in", 2, None).spec()
    assert len(grid_candidates(_cfg(kind="zero"), _setup()[1].targets)) == 4  # one per matrix


# ---- protocol


def test_grid_rows_match_independent_scoring_and_test_report() -> None:
    scorer, sw = _setup()
    ds = toy_mc(24, seed=5)
    progress: list[SweepProgress] = []
    result = run_sweep(_cfg(), ds, sw, scorer, on_progress=progress.append)
    assert result.stopped == "completed" and sw.is_base
    configs = [r for r in result.rows if r.role == "config"]
    assert len(configs) == 8 and result.n_validation == 12 and result.n_test == 12
    runner_val = SweepRunner(_cfg(), ds).split.validation
    for row in configs[:3] + [result.rows[0]]:
        with sw.applied_profile(row.interventions):
            ref = evaluate_multiple_choice(scorer, runner_val)
        assert row.val_accuracy == ref.accuracy
        assert row.val_log_loss == pytest.approx(ref.log_loss, rel=1e-4)
        assert row.val_correct == ref.correct
    base = result.base
    assert base is not None
    for row in configs:
        assert row.delta_accuracy == pytest.approx(row.val_accuracy - base.val_accuracy)
    best = max(configs, key=lambda r: (r.val_accuracy, -r.val_log_loss))
    assert result.winner is not None and result.winner.key == best.key
    test = result.test
    assert test is not None and test.winner_key == best.key
    assert test.base.n == 12 and test.base.ci_low <= test.base.accuracy <= test.base.ci_high
    assert "verdict" in test.mcnemar and test.delta_accuracy == pytest.approx(
        test.winner.accuracy - test.base.accuracy)
    assert progress[-1].done == progress[-1].total == len(result.rows)
    assert any(p.eta_s is not None for p in progress)
    SweepRow.model_validate_json(result.rows[-1].model_dump_json())  # JSON round trip


def test_fast_and_plain_sweeps_agree() -> None:
    scorer, sw = _setup()
    ds = toy_mc(16, seed=2)
    fast = run_sweep(_cfg(max_configs=4), ds, sw, scorer)
    plain = run_sweep(_cfg(max_configs=4, fast=False), ds, sw, scorer)
    assert [(r.key, r.val_predictions) for r in fast.rows if r.role == "config"] == \
        [(r.key, r.val_predictions) for r in plain.rows if r.role == "config"]


def test_resume_skips_finished_configs() -> None:
    scorer, sw = _setup()
    ds = toy_mc(12, seed=1)
    first = run_sweep(_cfg(max_configs=3), ds, sw, scorer)
    assert first.stopped == "max_configs"
    saved = [r.model_dump(mode="json") for r in first.rows if r.role != "test"]
    runner = SweepRunner(_cfg(), ds, completed=saved)
    assert runner.done == {r["key"] for r in saved}
    ran = []
    for step in runner.steps(sw.targets):
        assert step.key not in {r["key"] for r in saved}
        ran.append(step.key)
        runner.record(step.run(sw, scorer))
    assert len(ran) == 8 - 3 + 1 and ran[-1] == "test"
    full = run_sweep(_cfg(), ds, sw, scorer)
    resumed = {r.key: r.val_accuracy for r in runner.result().rows}
    assert resumed == {r.key: r.val_accuracy for r in full.rows if r.role != "test"} | {"test": None}
    assert rows_to_jsonl(runner.result().rows).count("\n") == len(resumed)


def test_cancel_and_time_limit_stop_between_steps() -> None:
    scorer, sw = _setup()
    ds = toy_mc(12, seed=1)
    runner = SweepRunner(_cfg(), ds, should_cancel=lambda: len(runner.rows) >= 3)
    result = runner.run(sw, scorer)
    assert result.stopped == "cancelled" and len(result.rows) == 3 and result.test is None
    now = [0.0]
    timed = SweepRunner(_cfg(time_limit_s=10), ds, clock=lambda: now[0])
    for step in timed.steps(sw.targets):
        timed.record(step.run(sw, scorer))
        now[0] += 6.0
    res = timed.result()
    assert res.stopped == "time_limit" and len([r for r in res.rows if r.role == "config"]) == 1
    assert res.test is not None  # the winner is still reported on test


def test_greedy_compose_keeps_only_rising_edits() -> None:
    scorer, sw = _setup()
    ds = toy_mc(24, seed=7)
    result = run_sweep(_cfg(strategy="greedy_compose", rhos=[0.9, 0.5, 0.1, 0.02]), ds, sw, scorer)
    configs = [r for r in result.rows if r.role == "config"]
    assert configs[0].layer == 2 and configs[0].rho == 0.02  # largest layer, smallest rho first
    best = result.base.val_accuracy
    for r in configs:
        assert r.kept == (r.val_accuracy > best)
        if r.kept:
            best = r.val_accuracy
    kept = [r for r in configs if r.kept]
    if kept:
        assert result.winner.key == kept[-1].key
        assert len(result.winner.interventions) == len(kept)
        assert result.winner.val_accuracy > result.base.val_accuracy


def test_spectral_prior_orders_by_snr_under_budget() -> None:
    scorer, sw = _setup()
    result = run_sweep(_cfg(strategy="spectral_prior", max_configs=4), toy_mc(12), sw, scorer)
    spectrum = next(r for r in result.rows if r.role == "spectrum")
    configs = [r for r in result.rows if r.role == "config"]
    assert len(configs) == 4 and result.stopped == "max_configs"
    snrs = [spectrum.snr[f"{r.type}:{r.layer}"] for r in configs]
    assert snrs == sorted(snrs) and min(spectrum.snr.values()) == snrs[0]


def test_perplexity_guard_rejects_configs() -> None:
    scorer, sw = _setup()
    result = run_sweep(_cfg(max_perplexity_ratio=1.0001, kind="zero", max_configs=2), toy_mc(8), sw, scorer)
    configs = [r for r in result.rows if r.role == "config"]
    assert all(r.val_perplexity is not None for r in configs)
    assert all(r.rejected for r in configs if r.val_perplexity > result.base.val_perplexity * 1.0001)


def test_heatmap_png() -> None:
    rows = [SweepRow(key=f"{t}{layer}{rho}", step=0, role="config", type=t, layer=layer, rho=rho,
                     interventions=[{}], val_accuracy=0.4 + 0.01 * layer + rho / 10)
            for t in ("fc_in", "fc_out") for layer in range(4) for rho in (0.9, 0.1, 0.01)]
    png = accuracy_heatmap_png(rows, base_accuracy=0.45, title="toy")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    with pytest.raises(ValueError, match="no single-edit rows"):
        accuracy_heatmap_png([], 0.5)


@pytest.mark.integration
def test_sweep_on_smollm2_epistemic() -> None:
    from laser_ops.datasets import builtin_dataset
    from laser_ops.loading import load_model

    lm = load_model("smollm2-135m")
    scorer = HFScorer(lm.model, lm.tokenizer, batch_size=8)
    sw = WeightSwapper(lm.model, svd_cache=SvdCache(lm.fingerprint))
    cfg = SweepConfig(types=["fc_in"], layers=[28, 29], rhos=[0.5, 0.01], max_validation_examples=16,
                      max_test_examples=16)
    runner = SweepRunner(cfg, builtin_dataset("epistemic_reasoning"))
    result = runner.run(sw, scorer)
    row = next(r for r in result.rows if r.key == "laser:fc_in:29:0.01")
    with sw.applied_profile(row.interventions):
        ref = evaluate_multiple_choice(scorer, runner.split.validation)
    assert row.val_correct == ref.correct
    assert result.test is not None and result.test.base.n == 16


def test_candidate_keys_of_close_rhos_do_not_collide() -> None:
    """Keys identify rows across restarts: two rhos that differ past 6 digits are two configs, not one."""
    a, b = Candidate("laser", "fc_in", 0, 0.1), Candidate("laser", "fc_in", 0, 0.1000001)
    assert a.key == "laser:fc_in:0:0.1" and a.key != b.key
    assert Candidate("laser", "fc_in", 0, 1.0).key == "laser:fc_in:0:1"  # persisted keys unchanged
