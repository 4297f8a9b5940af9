"""Benchmark: the same LASER grid on the same validation examples, the paper's way vs laser-serve's engine.

(a) naive, as the paper's public code does it: per config an exact ``torch.linalg.svd`` of the matrix,
    the dense rank-k matrix written back into the model, then one unbatched full forward pass (all
    logits) per example and candidate; run on an evenly spaced sample of the grid's configs.
(b) engine: ``SweepRunner`` with the layer-cached :class:`FastChoiceEvaluator` (one SVD per matrix,
    packed candidates, shared prefix, cached hidden states below the edited layer).

Asserts per-example predictions are identical on the sampled configs and prints seconds per config
and the ratio. Full size: ``python bench/sweep.py`` (SmolLM2, 10 layers x 2 types x 7 rho, 200
validation examples of epistemic_reasoning); quick: ``--examples 40 --layers 3 --naive-configs 3``.
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

from laser_ops.datasets import builtin_dataset, stratified_split
from laser_ops.loading import load_model
from laser_ops.scoring import HFScorer
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.sweeps import PAPER_RHOS, Candidate, SweepConfig, SweepRunner, grid_candidates

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
            k = max(1, int(float(cand.rho or 1.0) * min(original.shape)))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=200, help="validation examples")
    ap.add_argument("--layers", type=int, default=10, help="the last N layers are swept")
    ap.add_argument("--types", nargs="+", default=["fc_in", "fc_out"])
    ap.add_argument("--rhos", nargs="+", type=float, default=list(PAPER_RHOS))
    ap.add_argument("--naive-configs", type=int, default=5, help="configs run the naive way (>= 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    ap.add_argument("--dtype", default=None, help="auto (default: float32 on CPU, bfloat16 on CUDA), float32, ...")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="write a JSON summary here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    scorer = HFScorer(lm.model, lm.tokenizer, batch_size=args.batch_size)
    swapper = WeightSwapper(lm.model, svd_cache=SvdCache(lm.fingerprint))
    n_layers = swapper.targets.num_layers
    layers = list(range(n_layers - args.layers, n_layers))
    # Take a dataset slice whose 20% validation split holds exactly --examples examples.
    full = builtin_dataset("epistemic_reasoning")
    pool = stratified_split(full, min(0.999, 5 * args.examples / len(full)), seed=0).validation
    config = SweepConfig(types=args.types, layers=layers, rhos=args.rhos, validation_fraction=0.2,
                         batch_size=args.batch_size)
    runner = SweepRunner(config, pool)
    val = runner.split.validation
    items = val.choice_items()
    logger.info("grid: %d types x %d layers x %d rho on %d validation examples", len(args.types), len(layers),
                len(args.rhos), len(val))

    # (b) engine: every step up to (not including) the test step.
    t_start = time.perf_counter()
    for step in runner.steps(swapper.targets):
        if step.role == "test":
            break
        runner.record(step.run(swapper, scorer))
    engine_total = time.perf_counter() - t_start
    rows = {r.key: r for r in runner.config_rows()}
    base_row = runner.base
    assert base_row is not None
    engine_per_config = sum(r.seconds for r in rows.values()) / len(rows)

    # (a) naive on an evenly spaced sample of the same grid.
    grid = grid_candidates(config, swapper.targets)
    n = max(1, min(args.naive_configs, len(grid)))
    sample = [grid[round(i * (len(grid) - 1) / max(1, n - 1))] for i in range(n)] if n > 1 else [grid[-1]]
    naive_times = []
    for cand in sample:
        t0 = time.perf_counter()
        preds = naive_predictions(lm.model, scorer, items, swapper, cand)
        naive_times.append(time.perf_counter() - t0)
        engine_preds = rows[cand.key].val_predictions
        if preds != engine_preds:
            diff = sum(a != b for a, b in zip(preds, engine_preds or []))
            raise AssertionError(f"{cand.key}: {diff} predictions differ between naive and engine")
        logger.info("naive %s: %.1fs, predictions identical", cand.key, naive_times[-1])
    naive_per_config = sum(naive_times) / len(naive_times)
    engine_same = sum(rows[c.key].seconds for c in sample) / len(sample)

    table = Table(title=f"LASER sweep on {args.model}: {len(rows)} configs, {len(val)} validation examples")
    table.add_column("path")
    table.add_column("configs timed", justify="right")
    table.add_column("s / config", justify="right")
    table.add_column("speed-up", justify="right")
    table.add_row("(a) naive (paper's loop)", str(len(sample)), f"{naive_per_config:.2f}", "1.0x")
    table.add_row("(b) engine, same configs", str(len(sample)), f"{engine_same:.2f}",
                  f"{naive_per_config / engine_same:.1f}x")
    table.add_row("(b) engine, whole grid", str(len(rows)), f"{engine_per_config:.2f}",
                  f"{naive_per_config / engine_per_config:.1f}x")
    table.add_row("(b) incl. base + set-up", str(len(rows)), f"{engine_total / len(rows):.2f}",
                  f"{naive_per_config / (engine_total / len(rows)):.1f}x")
    console = Console()
    console.print(table)
    best = runner.best()
    console.print(f"base val acc {base_row.val_accuracy:.4f}; best {best.key if best else '-'} "
                  f"{best.val_accuracy if best else float('nan'):.4f}; threads={torch.get_num_threads()}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "examples": len(val), "configs": len(rows), "naive_configs": [c.key for c in sample],
            "naive_s_per_config": naive_per_config, "engine_s_per_config": engine_per_config,
            "engine_s_per_config_same_sample": engine_same, "engine_total_s": engine_total,
            "speedup_grid": naive_per_config / engine_per_config, "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
