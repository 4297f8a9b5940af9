"""Tests for laser_ops.sweeps (protocol, strategies, resume, budgets) and laser_ops.plots."""

from __future__ import annotations

import functools
import random
from concurrent.futures import Future

import pytest
from pydantic import ValidationError

from laser_ops.datasets import Dataset, Example, PromptFormat
from laser_ops.evaluation import (
    EvalReport,
    LabelMetrics,
    evaluate_multiple_choice,
    majority_label,
    mcnemar_exact,
    mcnemar_vs_constant,
    mcnemar_worse_p,
    wilson_interval,
)
from laser_ops.sweep_steps import StepExecutor, plain_verdict, row_from_report
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
    run_steps,
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
        rows = step.run(sw, scorer)
        assert not {r.key for r in rows} & {r["key"] for r in saved}
        ran.extend(r.key for r in rows)
        runner.record(rows)
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
    # one step holds both rho of fc_in@1 (one replicated pass); the budget stops before the next matrix
    assert res.stopped == "time_limit" and len([r for r in res.rows if r.role == "config"]) == 2
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


# ---- honest selection, verdicts, successive halving, ETA


def _row(key: str, acc: float, *, collapsed: bool = False, balanced: float | None = None, step: int = 1,
         log_loss: float = 1.0) -> SweepRow:
    labels = LabelMetrics(majority_label="yes", majority_accuracy=0.6, top_answer="yes",
                          top_answer_share=0.97 if collapsed else 0.6, collapsed=collapsed,
                          balanced_accuracy=balanced if balanced is not None else acc, macro_f1=acc)
    return SweepRow(key=key, step=step, role="config" if key != "base" else "base", type="fc_in", layer=1, rho=0.1,
                    interventions=[{"target": "fc_in", "layer": 1, "rank_fraction": 0.1}] if key != "base" else [],
                    val_accuracy=acc, val_log_loss=log_loss, val_labels=labels, collapsed=collapsed)


def test_collapsed_configs_cannot_win_unless_allowed() -> None:
    ds = toy_mc(12)
    rows = [_row("base", 0.5, step=0), _row("a", 0.62, collapsed=True, step=1), _row("b", 0.55, step=2)]
    assert SweepRunner(_cfg(), ds, completed=rows).best().key == "b"
    assert SweepRunner(_cfg(allow_collapsed=True), ds, completed=rows).best().key == "a"
    only = [rows[0], rows[1]]
    assert SweepRunner(_cfg(), ds, completed=only).best() is None  # the test step then reports base


def test_balanced_accuracy_metric_selects_on_it() -> None:
    ds = toy_mc(12)
    rows = [_row("base", 0.5, step=0), _row("a", 0.70, balanced=0.52, step=1), _row("b", 0.60, balanced=0.58, step=2)]
    assert SweepRunner(_cfg(), ds, completed=rows).best().key == "a"
    assert SweepRunner(_cfg(metric="balanced_accuracy"), ds, completed=rows).best().key == "b"
    gen = Dataset(name="g", kind="generation", examples=[Example(id=i, input="q", targets=["x"]) for i in range(4)])
    with pytest.raises(SweepConfigError) as info:
        SweepRunner(_cfg(metric="balanced_accuracy"), gen)
    assert info.value.field == "metric"


def _report(correct: list[bool], preds: list[int], ds: Dataset) -> EvalReport:
    from laser_ops.evaluation import ExampleOutcome, report_from_outcomes
    return report_from_outcomes(ds, [ExampleOutcome(id=e.id, correct=c, prediction=p)
                                     for e, c, p in zip(ds.examples, correct, preds)])


def test_verdict_says_when_a_gain_over_base_is_only_label_bias() -> None:
    """Base leans 'true', the winner answers 'false' almost always: beats base, not always-'false'."""
    n_false, n_true = 70, 30
    ds = Dataset(name="fever", kind="multiple_choice", examples=[
        Example(id=i, input=f"c{i}", choices=["false", "true"], correct=[0 if i < n_false else 1])
        for i in range(n_false + n_true)])
    base_preds = [1] * 100  # always 'true': 30%
    win_preds = [0] * 97 + [1] * 3  # 'false' on 97%: 70 + 3 right... minus
    base_c = [p == e.gold for p, e in zip(base_preds, ds.examples)]
    win_c = [p == e.gold for p, e in zip(win_preds, ds.examples)]
    base, win = _report(base_c, base_preds, ds), _report(win_c, win_preds, ds)
    label, maj = majority_label(ds)
    text = plain_verdict("laser:fc_in:1:0.01", base, win, mcnemar_exact(base_c, win_c), label, maj,
                        mcnemar_vs_constant(ds, win_c, label))
    assert text.startswith("the winner beats base by +43.0 points on test (significant")
    assert "but it does not beat always-'false' (73.0% vs 70.0%" in text
    assert "answers 'false' on 97% of test examples: the edit moved the label bias" in text
    honest = plain_verdict("base", base, base, mcnemar_exact(base_c, base_c), label, maj,
                          mcnemar_vs_constant(ds, base_c, label))
    assert "base model itself" in honest and "base does not beat always-'false'" in honest


BUILTIN_HALVING = [
    ("epistemic_reasoning", dict(types=["fc_in"], layers=[1, 2], rhos=[0.5, 0.05], max_validation_examples=24,
                                 max_test_examples=4, halving_min_examples=6, allow_collapsed=True)),
    ("qa_wikidata", dict(types=["fc_in"], layers=[1, 2], rhos=[0.5, 0.05], max_validation_examples=12,
                         max_test_examples=4, halving_min_examples=4, max_new_tokens=3)),
]


@pytest.mark.parametrize(("name", "grid"), BUILTIN_HALVING)
def test_successive_halving_picks_the_full_grid_winner_on_builtin_tasks(name: str, grid: dict) -> None:
    from laser_ops.datasets import builtin_dataset

    scorer, sw = _setup()
    ds = builtin_dataset(name)
    full = run_sweep(SweepConfig(**grid), ds, sw, scorer)
    fast = run_sweep(SweepConfig(strategy="successive_halving", **grid), ds, sw, scorer)
    assert (fast.winner and fast.winner.key) == (full.winner and full.winner.key)
    assert fast.full_grid_evaluations == full.example_evaluations == full.full_grid_evaluations
    assert fast.example_evaluations <= fast.full_grid_evaluations
    full_rows = {r.key: r for r in full.rows}
    for r in fast.rows:
        if r.role != "config":
            continue
        ref = full_rows[r.key]
        assert r.val_correct == [ref.val_correct[i] for i in r.val_indices]  # same outcomes on the same examples
        if r.eliminated is None:  # a survivor is scored on all of validation, like the full grid
            assert (r.val_n, r.val_accuracy, r.val_indices) == (ref.val_n, ref.val_accuracy, list(range(ref.val_n)))


class ScriptedExecutor(StepExecutor):
    """Scheduler test double: each config's per-example outcomes are drawn once from its true accuracy
    (no model; what is under test is which plans the runner hands out and what it concludes)."""

    def __init__(self, config: SweepConfig, split, truth: dict[str, float]) -> None:
        super().__init__(config, split)
        self.truth = truth
        self.constant: set[str] = set()
        self.outcomes: dict[str, list[bool]] = {}  # given per validation position instead of drawn
        self.evaluations = 0

    def work(self, plan, swapper, scorer):
        val = self.split.validation
        idx = None if plan.block is None or self.blocks is None else self.blocks[plan.block]
        positions = list(range(len(val))) if idx is None else idx
        rows = []
        for c in plan.configs or [None]:
            key = c.key if c else "base"
            acc = self.truth.get(key, 0.5)
            rng = random.Random(key)
            outcome = self.outcomes.get(key) or [rng.random() < acc for _ in range(len(val))]
            if key in self.constant:  # always answers choice 0 ('a')
                preds = [0 for _ in positions]
                correct = [0 in val.examples[i].correct for i in positions]
            else:
                correct = [outcome[i] for i in positions]
                preds = [val.examples[i].gold if ok else 1 - val.examples[i].gold for i, ok in zip(positions, correct)]
            from laser_ops.evaluation import ExampleOutcome, report_from_outcomes
            report = report_from_outcomes(val.subset(positions), [
                ExampleOutcome(id=val.examples[i].id, correct=ok, prediction=p, gold_logprob=-1.0)
                for i, ok, p in zip(positions, correct, preds)])
            self.evaluations += len(positions) if plan.role == "config" else 0
            rows.append(row_from_report(c, plan.role, report, idx, 0.0))
        if plan.role == "test":
            return [SweepRow(key="test", step=0, role="test")]
        yield
        return rows


def test_successive_halving_drops_clear_losers_and_saves_evaluations() -> None:
    ds = Dataset(name="bin", kind="multiple_choice", examples=[
        Example(id=i, input=f"q{i}", choices=["a", "b"], correct=[i % 2]) for i in range(640)])
    cfg = SweepConfig(strategy="successive_halving", types=["fc_in", "fc_out"], layers=[0, 1, 2],
                      rhos=[0.9, 0.5, 0.2, 0.1], validation_fraction=0.5, halving_min_examples=20)
    split_runner = SweepRunner(cfg, ds)
    keys = [c.key for c in grid_candidates(cfg, _setup()[1].targets)]
    truth = {k: 0.3 + 0.02 * (i % 5) for i, k in enumerate(keys)}
    truth[keys[7]] = 0.8  # one clear winner among 24 configs
    executor = ScriptedExecutor(cfg, split_runner.split, truth)
    runner = SweepRunner(cfg, ds, executor=executor)
    result = runner.run(*_setup()[::-1])
    n_val = result.n_validation
    assert result.winner.key == keys[7] and result.winner.val_n == n_val
    assert result.full_grid_evaluations == 24 * n_val and result.example_evaluations == executor.evaluations
    assert result.full_grid_evaluations / result.example_evaluations >= 3
    dropped = [r for r in result.rows if r.eliminated]
    assert len(dropped) == 23 and all(r.val_n < n_val for r in dropped)
    assert all("one-sided exact McNemar" in r.eliminated for r in dropped)
    # interrupted after 9 steps (mid round 2), rows persisted without the in-memory elimination flags:
    # the resumed job extends them and takes the same decisions as the uninterrupted one
    first = SweepRunner(cfg, ds, executor=ScriptedExecutor(cfg, split_runner.split, truth))
    for i, step in enumerate(first.steps(_setup()[1].targets)):
        if i == 9:
            break
        first.record(step.run(*_setup()[::-1]))
    saved = [r.model_dump(exclude={"eliminated"}) for r in first.rows.values()]
    assert 0 < sum(r["val_n"] > 20 for r in saved if r["role"] == "config") < 24
    again = ScriptedExecutor(cfg, split_runner.split, truth)
    resumed = SweepRunner(cfg, ds, completed=saved, executor=again).run(*_setup()[::-1])
    assert resumed.winner.key == keys[7]
    assert {r.key: (r.val_n, r.eliminated) for r in resumed.rows} == \
        {r.key: (r.val_n, r.eliminated) for r in result.rows}
    assert again.evaluations < executor.evaluations  # finished blocks were not scored again


def test_eta_counts_the_test_step_from_the_examples_it_scores() -> None:
    scorer, sw = _setup()
    ds = toy_mc(40, seed=3)
    seen: list[tuple[SweepProgress, float]] = []
    runner = SweepRunner(_cfg(validation_fraction=0.25), ds,
                         on_progress=lambda p: seen.append((p, runner._remaining_cost())))
    layers = sw.targets.num_layers
    for step in runner.steps(sw.targets):
        if step.role == "test":
            left = runner._remaining_cost()
            assert left == 2 * len(runner.split.test) * layers == step.plan.cost  # base + winner, every layer
            assert seen[-1][0].eta_s is not None and seen[-1][0].eta_s > 0  # the last config's event still waits
        runner.record(step.run(sw, scorer))
    before_configs = seen[0][1]  # after base: every config (layers >= l) plus the test step
    n_val = len(runner.split.validation)
    configs = sum(n_val * (layers - c.layer) for c in runner.config_rows())
    assert before_configs == configs + 2 * len(runner.split.test) * layers
    assert seen[-1][0].eta_s == 0.0


def test_successive_halving_drops_configs_that_surely_collapsed() -> None:
    """A config answering one label everywhere cannot win: it is dropped once that is clear at the confidence."""
    ds = Dataset(name="bin", kind="multiple_choice", examples=[
        Example(id=i, input=f"q{i}", choices=["a", "b"], correct=[int(i % 3 == 0)]) for i in range(640)])
    cfg = SweepConfig(strategy="successive_halving", types=["fc_in"], layers=[1, 2], rhos=[0.5, 0.1],
                      validation_fraction=0.5, halving_min_examples=20)
    keys = [c.key for c in grid_candidates(cfg, _setup()[1].targets)]
    split = SweepRunner(cfg, ds).split
    truth = dict.fromkeys(keys, 0.55)
    scripted = ScriptedExecutor(cfg, split, truth)
    scripted.constant = {keys[0]}  # scores the majority baseline (about 67%) by always answering 'a'
    result = SweepRunner(cfg, ds, executor=scripted).run(*_setup()[::-1])
    rows = {r.key: r for r in result.rows}
    assert rows[keys[0]].collapsed and "collapsed" in rows[keys[0]].eliminated
    assert rows[keys[0]].val_n < result.n_validation  # dropped before the last round
    assert result.winner.key != keys[0]
    kept = ScriptedExecutor(cfg.model_copy(update={"allow_collapsed": True}), split, truth)
    kept.constant = {keys[0]}
    allowed = SweepRunner(cfg.model_copy(update={"allow_collapsed": True}), ds, executor=kept).run(*_setup()[::-1])
    assert allowed.winner.key == keys[0]  # asked for: the constant predictor wins on accuracy


class _Deferred(Future):
    """A future computed only when its result is asked for: every step stays in flight until then."""

    def __init__(self, compute) -> None:
        super().__init__()
        self._compute = compute

    def result(self, timeout=None):
        if not self.done():
            self.set_result(self._compute())
        return super().result(timeout)


def test_run_steps_plans_the_test_step_after_every_config_is_recorded() -> None:
    """With many independent steps in flight, the winner sent to the test step is still the best of all rows."""
    ds = Dataset(name="bin", kind="multiple_choice", examples=[
        Example(id=i, input=f"q{i}", choices=["a", "b"], correct=[i % 2]) for i in range(80)])
    cfg = SweepConfig(types=["fc_in", "fc_out"], layers=[0, 1, 2], rhos=[0.9, 0.1], validation_fraction=0.5)
    keys = [c.key for c in grid_candidates(cfg, _setup()[1].targets)]
    truth = {k: 0.4 for k in keys}
    truth[keys[-1]] = 0.9  # the winner is in the last step
    runner = SweepRunner(cfg, ds, executor=ScriptedExecutor(cfg, SweepRunner(cfg, ds).split, truth))
    sent: list = []

    def submit(step):
        sent.append(step.plan)
        return _Deferred(lambda: step.run(*_setup()[::-1]))

    result = run_steps(runner, _setup()[1].targets, submit, max_in_flight=len(keys))
    assert result.winner.key == keys[-1]
    assert sent[-1].role == "test" and [c.key for c in sent[-1].configs] == [keys[-1]]


def test_mcnemar_worse_p_pairs_the_outcomes() -> None:
    leader = [True] * 30 + [False] * 30
    close = [True] * 29 + [False] * 31  # the same examples but one: no evidence either way
    assert mcnemar_worse_p(close, leader) == pytest.approx(0.5)
    assert mcnemar_worse_p(leader, close) == 1.0
    worse = [True] * 20 + [False] * 40  # 10 examples only the leader gets right, none the other way
    assert mcnemar_worse_p(worse, leader) == pytest.approx(0.5 ** 10)
    # unpaired, 20/60 vs 30/60 do not separate at 95% (overlapping Wilson intervals); paired they do
    assert wilson_interval(20, 60)[1] > wilson_interval(30, 60)[0]
    with pytest.raises(ValueError, match="length"):
        mcnemar_worse_p([True], [True, False])


def test_successive_halving_pairs_configs_on_the_same_examples() -> None:
    """Configs that differ from the leader on few examples are told apart by those examples: one always wrong
    where it differs is dropped while its unpaired Wilson interval still overlaps the leader's; one that
    differs on two examples only (a close second) survives to the end. The winner is the full grid's."""
    ds = Dataset(name="bin", kind="multiple_choice", examples=[
        Example(id=i, input=f"q{i}", choices=["a", "b"], correct=[i % 2]) for i in range(400)])
    cfg = SweepConfig(strategy="successive_halving", types=["fc_in"], layers=[1, 2], rhos=[0.5, 0.1],
                      validation_fraction=0.5, halving_min_examples=25)
    keys = [c.key for c in grid_candidates(cfg, _setup()[1].targets)]
    split = SweepRunner(cfg, ds).split
    rng = random.Random(7)
    leader = [rng.random() < 0.7 for _ in range(len(split.validation))]
    right = [i for i, ok in enumerate(leader) if ok]
    outcomes = {keys[0]: leader, keys[1]: [ok and i not in right[:2] for i, ok in enumerate(leader)]}
    for k in keys[2:]:  # wrong on every fourth example the leader gets right: about 52% against 70%
        outcomes[k] = [ok and i not in right[::4] for i, ok in enumerate(leader)]

    def run(config: SweepConfig):
        scripted = ScriptedExecutor(config, split, {})
        scripted.outcomes = outcomes
        return SweepRunner(config, ds, executor=scripted).run(*_setup()[::-1])

    full = run(cfg.model_copy(update={"strategy": "grid"}))
    result = run(cfg)
    assert result.winner.key == full.winner.key == keys[0]
    rows = {r.key: r for r in result.rows}
    assert rows[keys[1]].eliminated is None and rows[keys[1]].val_n == result.n_validation
    for k in keys[2:]:
        r = rows[k]
        assert r.eliminated and "less accurate than the leader" in r.eliminated and r.val_n < result.n_validation
        mine = [leader[i] for i in r.val_indices]
        assert wilson_interval(sum(r.val_correct), r.val_n)[1] > wilson_interval(sum(mine), len(mine))[0]
    assert result.example_evaluations < full.example_evaluations
