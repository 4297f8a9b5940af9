"""Benchmark: LASER sweeps, measured side by side in one run, ratios printed.

(1) speed, per config, on the same grid and the same validation examples of epistemic_reasoning:
    (a) the paper's loop: per config a fresh exact ``torch.linalg.svd``, the dense rank-k matrix written
        back, then one unbatched full forward (all logits) per example and candidate; on an evenly spaced
        sample of the grid's configs, with predictions asserted identical to the engine's;
    (b) the engine: ``SweepRunner`` with the layer-cached evaluator (packed candidates, the model's own
        decoder layers from the cached state entering the edited layer, all rho of a matrix in one
        replicated pass through the SVD factors);
    (c) the floor: one forward of layers >= l over the same packed examples (base weights, states
        cached), averaged over the grid's configs: what a config cannot cost less than.
(2) successive halving vs the full grid: example-evaluations spent, and the same winner.
(3) Ray: the same (smaller) sweep on 2 actors x 1 thread vs 1 actor x 1 thread, identical rows.

Full size: ``python bench/sweep.py`` (SmolLM2, 10 layers x 2 types x 7 rho, 200 validation examples);
quick: ``--examples 40 --layers 3 --naive-configs 1 --parts speed,halving``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from laser_ops.datasets import Dataset, builtin_dataset, stratified_split
from laser_ops.fast_choice import FastChoiceEvaluator
from laser_ops.loading import load_model
from laser_ops.scoring import HFScorer
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.sweeps import PAPER_RHOS, Candidate, SweepConfig, SweepRunner, grid_candidates, rows_to_jsonl, run_steps

logger = logging.getLogger("bench.sweep")


def naive_predictions(model: torch.nn.Module, scorer: HFScorer, items: list[tuple[str, list[str]]],
                      swapper: WeightSwapper, cand: Candidate) -> list[int]:
    """The paper's loop: fresh exact SVD, dense write-back, one forward per example and candidate."""
    ref = swapper.targets.ref(cand.type, cand.layer)
    param = dict(model.named_parameters())[ref.param_name]
    original = param.detach().clone()
    try:
        with torch.no_grad():
            U, S, Vh = torch.linalg.svd(original.float(), full_matrices=False)
            k = max(1, int(float(cand.rho or 1.0) * min(original.shape) + 1e-9))
            param.copy_((U[:, :k] * S[:k]) @ Vh[:k])
        preds = []
        with torch.inference_mode():
            for context, choices in items:
                scores = []
                for choice in choices:
                    ctx, cont = scorer.encode_pair(context, choice)
                    ids = torch.tensor([(ctx + cont)[:-1]], device=model.device)
                    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                    rows = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont), device=logp.device)
                    scores.append(logp[rows, torch.tensor(cont, device=logp.device)].sum().item())
                preds.append(max(range(len(scores)), key=lambda i: (scores[i], -i)))
        return preds
    finally:
        with torch.no_grad():
            param.copy_(original)


def pool_of(examples: int) -> Dataset:
    """A slice of epistemic_reasoning whose 20% validation split holds exactly ``examples`` examples."""
    full = builtin_dataset("epistemic_reasoning")
    return stratified_split(full, min(0.999, 5 * examples / len(full)), seed=0).validation


def run_grid(config: SweepConfig, data: Dataset, swapper: WeightSwapper, scorer: HFScorer) -> tuple[SweepRunner, float]:
    """Every step up to (not including) the test step; wall seconds of the configs."""
    runner = SweepRunner(config, data)
    configs_s = 0.0
    for step in runner.steps(swapper.targets):
        if step.role == "test":
            break
        t0 = time.perf_counter()
        runner.record(step.run(swapper, scorer))
        if step.role == "config":
            configs_s += time.perf_counter() - t0
    return runner, configs_s


def floor_per_config(scorer: HFScorer, runner: SweepRunner, swapper: WeightSwapper, batch_size: int) -> float:
    """Mean over the grid's configs of one base forward of layers >= l over the packed validation rows."""
    ev = FastChoiceEvaluator(scorer, runner.split.validation.choice_items(), batch_size=batch_size)
    ev.predict(ev.num_layers - 1)  # one full forward that caches the state entering every layer; not timed
    per_layer: dict[int, float] = {}
    for layer in sorted({r.layer for r in runner.config_rows() if r.layer is not None}):
        t0 = time.perf_counter()
        ev.predict(layer)
        per_layer[layer] = time.perf_counter() - t0
    rows = [r for r in runner.config_rows() if r.layer is not None]
    return sum(per_layer[r.layer] for r in rows) / len(rows)


def swept_layers(args: argparse.Namespace, n_layers: int) -> list[int]:
    """``--layer-list`` (negative counts from the end) or the last ``--layers`` layers."""
    if args.layer_list:
        return sorted({int(x) % n_layers for x in args.layer_list.split(",")})
    return list(range(n_layers - args.layers, n_layers))


def speed(args: argparse.Namespace, lm, scorer: HFScorer, swapper: WeightSwapper, console: Console) -> dict:
    layers = swept_layers(args, swapper.targets.num_layers)
    config = SweepConfig(types=args.types, layers=layers, rhos=args.rhos, validation_fraction=0.2,
                         batch_size=args.batch_size)
    data = pool_of(args.examples)
    runner, configs_s = run_grid(config, data, swapper, scorer)
    rows = {r.key: r for r in runner.config_rows()}
    engine = configs_s / len(rows)
    floor = floor_per_config(scorer, runner, swapper, args.batch_size)
    grid = grid_candidates(config, swapper.targets)
    n = max(1, min(args.naive_configs, len(grid)))
    sample = [grid[round(i * (len(grid) - 1) / max(1, n - 1))] for i in range(n)] if n > 1 else [grid[len(grid) // 2]]
    items = runner.split.validation.choice_items()
    naive_times = []
    for cand in sample:
        t0 = time.perf_counter()
        preds = naive_predictions(lm.model, scorer, items, swapper, cand)
        naive_times.append(time.perf_counter() - t0)
        mine = rows[cand.key].val_predictions
        if preds != mine:
            diff = sum(a != b for a, b in zip(preds, mine or []))
            raise AssertionError(f"{cand.key}: {diff} predictions differ between the paper's loop and the engine")
        logger.info("naive %s: %.1fs, predictions identical", cand.key, naive_times[-1])
    naive = sum(naive_times) / len(naive_times)
    if args.rows_out:
        args.rows_out.parent.mkdir(parents=True, exist_ok=True)
        args.rows_out.write_text(rows_to_jsonl(runner.rows.values()))
    t = Table(title=f"(1) per config: {len(rows)} configs ({len(args.types)} types x layers {layers} x "
                    f"{len(args.rhos)} rho), {len(runner.split.validation)} validation examples")
    for col in ("path", "configs timed", "s / config", "vs paper's loop", "vs floor"):
        t.add_column(col, justify="right" if col != "path" else "left")
    t.add_row("(a) paper's loop", str(len(sample)), f"{naive:.2f}", "1.0x", f"{naive / floor:.1f}x")
    t.add_row("(b) engine, whole grid", str(len(rows)), f"{engine:.3f}", f"{naive / engine:.1f}x", f"{engine / floor:.2f}x")
    t.add_row("(c) floor: layers >= l", str(len(rows)), f"{floor:.3f}", f"{naive / floor:.1f}x", "1.00x")
    console.print(t)
    best = runner.best()
    return {"examples": len(runner.split.validation), "configs": len(rows), "naive_s_per_config": naive,
            "engine_s_per_config": engine, "floor_s_per_config": floor, "speedup": naive / engine,
            "engine_over_floor": engine / floor, "winner": best.key if best else None, "config": config,
            "data": data}


def halving(args: argparse.Namespace, scorer: HFScorer, swapper: WeightSwapper, grid_result: dict,
            console: Console) -> dict:
    config: SweepConfig = grid_result["config"]
    sh_config = config.model_copy(update={"strategy": "successive_halving",
                                          "halving_min_examples": args.halving_min_examples})
    t0 = time.perf_counter()
    runner, _ = run_grid(sh_config, grid_result["data"], swapper, scorer)
    seconds = time.perf_counter() - t0
    res = runner.result()
    best = runner.best()
    saved = res.full_grid_evaluations / max(1, res.example_evaluations)
    same = (best.key if best else None) == grid_result["winner"]
    t = Table(title="(2) successive halving vs the full grid (same configs, same validation examples)")
    for col in ("strategy", "example-evaluations", "configs scored on all", "winner", "saved"):
        t.add_column(col)
    t.add_row("grid", str(res.full_grid_evaluations), str(grid_result["configs"]), str(grid_result["winner"]), "1.0x")
    survivors = sum(1 for r in runner.config_rows() if r.eliminated is None)
    t.add_row("successive_halving", str(res.example_evaluations), str(survivors), str(best.key if best else None),
              f"{saved:.1f}x")
    console.print(t)
    console.print(f"same winner: {same}; halving took {seconds:.0f}s")
    if not same:
        raise AssertionError(f"successive halving chose {best.key if best else None}, the grid {grid_result['winner']}")
    return {"evaluations": res.example_evaluations, "full_grid": res.full_grid_evaluations, "saved": saved,
            "same_winner": same}


def ray_part(args: argparse.Namespace, lm, swapper: WeightSwapper, console: Console) -> dict:
    from laser_ops.ray_sweeps import ModelSource, RaySweepPool

    n_layers = swapper.targets.num_layers
    # the test step is one sequential step (base and winner on test): capped so the search dominates, as in a
    # real grid where hundreds of configs share one test step
    config = SweepConfig(types=args.types, layers=list(range(n_layers - args.ray_layers, n_layers)), rhos=args.rhos,
                         validation_fraction=0.2, batch_size=args.batch_size, max_test_examples=args.ray_examples)
    data = pool_of(args.ray_examples)
    source = ModelSource(args.model, lm.fingerprint, device=args.device, dtype=args.dtype)
    timings, results = {}, {}
    for actors in (1, 2):
        with RaySweepPool("local", source, config, data, actors=actors, threads=1) as pool:
            runner = SweepRunner(config, data)
            warm = runner.steps(swapper.targets)
            base = next(warm)  # the base step warms every actor's caches equally: run it on each, then time the rest
            for f in [pool.submit(base) for _ in range(actors)]:
                rows = f.result()
            runner.record(rows)
            t0 = time.perf_counter()
            rest = SweepRunner(config, data, completed=[r.model_dump() for r in runner.rows.values()])
            results[actors] = run_steps(rest, swapper.targets, pool.submit, max_in_flight=pool.size)
            timings[actors] = time.perf_counter() - t0
    strip = [[r.model_dump(exclude={"seconds", "test"}) for r in results[a].rows] for a in (1, 2)]
    if strip[0] != strip[1]:
        raise AssertionError("rows differ between 1 and 2 Ray actors")
    t = Table(title=f"(3) Ray: {len(grid_candidates(config, swapper.targets))} configs, "
                    f"{len(SweepRunner(config, data).split.validation)} validation examples, identical rows")
    for col in ("actors x threads", "seconds", "speed-up"):
        t.add_column(col)
    t.add_row("1 x 1", f"{timings[1]:.1f}", "1.0x")
    t.add_row("2 x 1", f"{timings[2]:.1f}", f"{timings[1] / timings[2]:.2f}x")
    console.print(t)
    return {"one_actor_s": timings[1], "two_actors_s": timings[2], "speedup": timings[1] / timings[2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=200, help="validation examples")
    ap.add_argument("--layers", type=int, default=10, help="the last N layers are swept")
    ap.add_argument("--layer-list", default=None,
                    help="explicit layers instead of --layers, e.g. -10,-7,-4,-1 (the same mean depth as the last 10)")
    ap.add_argument("--rows-out", type=Path, default=None, help="write the full grid's rows (JSONL) here")
    ap.add_argument("--types", nargs="+", default=["fc_in", "fc_out"])
    ap.add_argument("--rhos", nargs="+", type=float, default=list(PAPER_RHOS))
    ap.add_argument("--naive-configs", type=int, default=2, help="configs run the paper's way (>= 1)")
    ap.add_argument("--halving-min-examples", type=int, default=25)
    ap.add_argument("--ray-layers", type=int, default=4, help="(3): the last N layers")
    ap.add_argument("--ray-examples", type=int, default=100, help="(3): validation examples")
    ap.add_argument("--parts", default="speed,halving,ray", help="comma-separated: speed, halving, ray")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    ap.add_argument("--dtype", default=None, help="auto (default: float32 on CPU, bfloat16 on CUDA), float32, ...")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="write a JSON summary here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    console = Console()
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    scorer = HFScorer(lm.model, lm.tokenizer, batch_size=args.batch_size)
    swapper = WeightSwapper(lm.model, svd_cache=SvdCache(lm.fingerprint))
    summary: dict = {"threads": torch.get_num_threads(), "model": args.model}
    grid = None
    if parts & {"speed", "halving"}:
        grid = speed(args, lm, scorer, swapper, console)
        summary["speed"] = {k: v for k, v in grid.items() if k not in ("config", "data")}
    if "halving" in parts and grid is not None:
        summary["halving"] = halving(args, scorer, swapper, grid, console)
    if "ray" in parts:
        summary["ray"] = ray_part(args, lm, swapper, console)
    console.print(json.dumps(summary, indent=2, default=str))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
