"""Swap benchmark on the embedded SmolLM2-135M: what a profile switch and a new rank cost.

Measured side by side in one process, so the ratios hold on whatever machine runs it:

1. switching to a cached profile, as a fraction of one 32-token greedy generation
   (one matrix; and every MLP matrix of the last 5 layers). Target: < 2 %.
2. materialising a new rank of a matrix whose decomposition is cached, vs decomposing again.
   Target: >= 20x.

    .venv/bin/python bench/swap.py [--repeats 9] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from laser_ops.loading import LoadedModel, load_model, model_fingerprint, resolve_device, resolve_dtype  # noqa: E402
from laser_ops.svd import SvdCache, decompose  # noqa: E402
from laser_ops.swap import WeightSwapper  # noqa: E402
from laser_ops.targets import ModelTargets, describe, read_matrix  # noqa: E402

PROMPT = "The capital of France is"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device,
          setup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (``setup`` runs untimed before each)."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_model(folder: str, device: str | None, dtype: str | None) -> LoadedModel:
    """A model with the folder's architecture and random weights (timings depend on shapes only)."""
    dev = resolve_device(device)
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, dev)).to(dev).eval()
    return LoadedModel(model, AutoTokenizer.from_pretrained(folder), f"random:{Path(folder).name}", folder,
                       model_fingerprint(model))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="alias, HF folder or .gguf file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed 32-token generations (median)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rho", type=float, default=0.01, help="rank fraction of the cached profiles")
    parser.add_argument("--random-weights", action="store_true",
                        help="build --model (a folder with config.json and a tokenizer) with random weights: "
                             "same shapes, same timings, for machines that lack the weights file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = random_model(args.model, args.device, args.dtype) if args.random_weights else \
        load_model(args.model, device=args.device, dtype=args.dtype)
    model, tok, device = lm.model, lm.tokenizer, lm.device
    d = describe(model)
    last = d.num_layers - 3
    print(f"model {lm.model_id} ({d.architecture}, {d.num_layers} layers) on {device}, {lm.dtype}, "
          f"torch threads {torch.get_num_threads()}")

    enc = tok(PROMPT, return_tensors="pt").to(device)

    def generate() -> None:
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, pad_token_id=tok.eos_token_id)
        assert out.shape[1] - enc.input_ids.shape[1] == args.new_tokens

    generate()  # warm-up
    gen_s = timed(generate, args.gen_repeats, device)
    print(f"\n{args.new_tokens}-token greedy generation: {gen_s * 1e3:8.1f} ms")

    swapper = WeightSwapper(model, svd_cache=SvdCache(lm.fingerprint, device=device), cache_device=device)
    profiles = {
        "one matrix (fc_in, layer %d)" % last: [{"target": "fc_in", "layer": last, "rank_fraction": args.rho}],
        "MLP of the last 5 layers": [{"target": "mlp", "layer": "-5:", "rank_fraction": args.rho}],
    }
    worst_switch, worst_speedup = 0.0, float("inf")
    print("\n1. switch to a cached profile (base -> profile; target < 2% of one generation)")
    for name, profile in profiles.items():
        first = swapper.apply(profile)  # materialise once: SVDs + edited tensors
        swapper.revert()
        stats = []

        def switch(profile=profile) -> None:
            stats.append(swapper.apply(profile))

        switch_s = timed(switch, args.repeats, device, setup=swapper.revert)
        revert_s = timed(swapper.revert, args.repeats, device, setup=lambda p=profile: swapper.apply(p))
        assert all(s.svds == 0 and s.materialized == 0 for s in stats), stats
        n = first.written
        worst_switch = max(worst_switch, switch_s / gen_s)
        print(f"   {name:34s} {n:2d} params  first apply {first.seconds * 1e3:8.1f} ms "
              f"({first.svds} SVDs) | cached switch {switch_s * 1e3:7.2f} ms = {100 * switch_s / gen_s:5.2f}% "
              f"of a generation | revert {revert_s * 1e3:7.2f} ms = {100 * revert_s / gen_s:5.2f}%")

    print("\n2. new rank from the cached decomposition vs decomposing again (target >= 20x)")
    for name, target, layer in (("one matrix (fc_in, layer %d)" % last, "fc_in", last),
                                ("MLP of the last 5 layers", "mlp", "-5:")):
        ranks = iter(range(2, 10_000))  # rank 1 is the warm-up, already materialised
        warm = WeightSwapper(model, svd_cache=SvdCache(lm.fingerprint, device=device), cache_device=device)
        warm.apply([{"target": target, "layer": layer, "rank": 1}])
        warm.revert()
        cached_stats, fresh_stats = [], []

        def new_rank(warm=warm, target=target, layer=layer) -> None:
            cached_stats.append(warm.apply([{"target": target, "layer": layer, "rank": next(ranks)}]))

        def decompose_again(target=target, layer=layer) -> None:
            cold = WeightSwapper(model, svd_cache=SvdCache(lm.fingerprint, device=device), cache_device=device)
            fresh_stats.append(cold.apply([{"target": target, "layer": layer, "rank": 2}]))
            cold.revert()

        for _ in range(args.repeats):  # SwapStats.seconds times the apply itself, nothing around it
            warm.revert()
            new_rank()
            decompose_again()
        warm.revert()
        assert all(s.svds == 0 and s.materialized > 0 for s in cached_stats), cached_stats
        assert all(s.svds > 0 for s in fresh_stats), fresh_stats
        cached_apply = statistics.median(s.seconds for s in cached_stats)
        fresh_apply = statistics.median(s.seconds for s in fresh_stats)
        print(f"   {name:34s} cached decomposition {cached_apply * 1e3:8.1f} ms | decompose again "
              f"{fresh_apply * 1e3:8.1f} ms ({fresh_stats[0].svds} SVDs) | speed-up {fresh_apply / cached_apply:6.1f}x")
        worst_speedup = min(worst_speedup, fresh_apply / cached_apply)

    # the kernels alone, without the copy into the parameter
    ref = ModelTargets.of(model).ref("fc_in", last)
    w = read_matrix(model.get_parameter(ref.param_name), ref).float()
    dec = decompose(w)
    top_s = timed(lambda: dec.top(5), args.repeats, device)
    svd_s = timed(lambda: decompose(w).top(5), args.repeats, device)
    print(f"   kernels only ({ref.shape[0]}x{ref.shape[1]}): Decomposition.top(5) {top_s * 1e3:.2f} ms | "
          f"decompose + top(5) {svd_s * 1e3:.1f} ms | {svd_s / top_s:.0f}x")

    swapper.revert()
    print(f"\nsummary: worst cached switch {100 * worst_switch:.2f}% of a generation (target < 2%: "
          f"{'met' if worst_switch < 0.02 else 'MISSED'}); worst new-rank speed-up {worst_speedup:.1f}x "
          f"(target >= 20x: {'met' if worst_speedup >= 20 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
