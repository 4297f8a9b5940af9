"""Serving throughput over loopback, as ratios measured in one run.

(a) base only, (b) one edited profile, (c) alternating base/edited requests, all through a real
``python -m server`` process and HTTP; (d) the same generations in-process (HFScorer.generate in
batches of the same concurrency), without the server. Targets at 32 new tokens on SmolLM2:
b/a >= 0.95, c/a >= 0.85, a/d >= 0.85.

    python bench/serve.py                       # SmolLM2, 64 requests per phase, concurrency 16
    python bench/serve.py --requests 128 --concurrency 16 --max-new-tokens 32 --device cpu

Throughput is generated tokens per second (greedy; requests that hit EOS early count what they made).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import server_process  # noqa: E402  (bench/server_process.py)

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator works, step by step.",
    "List ten facts about the planet Mars.",
    "Describe the history of the printing press in detail.",
    "What are the main differences between cats and dogs? Explain at length.",
    "Give a recipe for a chocolate cake with all the steps.",
    "Tell me about the Roman Empire and its most famous emperors.",
    "Explain photosynthesis to a ten year old child.",
]


def start_server(args: argparse.Namespace, data_dir: Path, port: int) -> subprocess.Popen:
    return server_process.start_server(["--model", args.model, "--data-dir", str(data_dir), "--device", args.device,
                         "--max-batch-size", str(args.max_batch_size), "--max-queue", str(max(256, 4 * args.concurrency))], port)


def chat_prompts(tokenizer) -> list[str]:
    """Instruction prompts in the model's chat format (long answers, so most requests run to max_new_tokens)."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in PROMPTS]
    return list(PROMPTS)


def bodies(prompts: list[str], n: int, profiles: list[str], max_new: int) -> list[dict]:
    return [{"profile": profiles[i % len(profiles)], "prompt": prompts[i % len(prompts)], "max_new_tokens": max_new}
            for i in range(n)]


async def drive(url: str, reqs: list[dict], concurrency: int) -> tuple[float, int, list[float]]:
    """Closed loop: ``concurrency`` clients send requests back to back; (seconds, generated tokens, latencies)."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    tokens = [0]
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                t0 = time.perf_counter()
                r = await client.post("/v1/generate", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                tokens[0] += r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, tokens[0], latencies


def in_process(args: argparse.Namespace, loaded, prompts: list[str], n: int) -> tuple[float, int]:
    """(d): the same greedy generations without the server, batches of ``concurrency`` prompts."""
    from laser_ops.scoring import GenerationRequest, HFScorer

    scorer = HFScorer(loaded.model, loaded.tokenizer, batch_size=args.max_batch_size)
    reqs = [GenerationRequest(prompt=b["prompt"], max_new_tokens=args.max_new_tokens)
            for b in bodies(prompts, n, ["base"], args.max_new_tokens)]
    scorer.generate(reqs[: args.concurrency])  # warm-up
    start = time.perf_counter()
    tokens = 0
    for i in range(0, n, args.concurrency):
        tokens += sum(len(r.token_ids) for r in scorer.generate(reqs[i : i + args.concurrency]))
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--requests", type=int, default=64, help="requests per phase")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="repeat (a), (b), (c) interleaved; best round counts")
    ap.add_argument("--layer", type=int, default=-2, help="layer of the edited profile's fc_in (rho 0.01)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
                    help="torch threads for the server and the in-process run (OMP_NUM_THREADS); "
                         "default: torch's choice")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server process
    import torch

    from laser_ops.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    prompts = chat_prompts(loaded.tokenizer)

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="laser-bench-") as tmp:
        port = server_process.free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(args, Path(tmp) / "data", port)
        try:
            spec = [{"target": "fc_in", "layer": args.layer, "rank_fraction": 0.01}]
            r = httpx.post(f"{url}/v1/profiles", json={"name": "edited", "interventions": spec}, timeout=120)
            r.raise_for_status()
            n = args.requests
            # Keep prompts both profiles answer at full length, so throughput compares serving, not text length.
            full = []
            for prompt in prompts:
                r = httpx.post(f"{url}/v1/compare", timeout=600, json={
                    "profiles": ["base", "edited"], "generate": {"prompt": prompt, "max_new_tokens": args.max_new_tokens}})
                r.raise_for_status()
                if all(g["usage"]["completion_tokens"] == args.max_new_tokens for g in r.json()["generate"]):
                    full.append(prompt)
            print(f"{len(full)}/{len(prompts)} prompts run to max_new_tokens on both profiles", flush=True)
            prompts = full or prompts
            phases = {"a_base": ["base"], "b_edited": ["edited"], "c_alternating": ["base", "edited"]}
            asyncio.run(drive(url, bodies(prompts, 2 * args.concurrency, ["base", "edited"], args.max_new_tokens),
                              args.concurrency))  # warm-up: caches, allocator, both profiles
            best: dict[str, float] = {}
            for rnd in range(args.rounds):
                for name, profiles in phases.items():
                    secs, toks, lat = asyncio.run(drive(url, bodies(prompts, n, profiles, args.max_new_tokens),
                                                        args.concurrency))
                    tps = toks / secs
                    best[name] = max(best.get(name, 0.0), tps)
                    lat.sort()
                    print(f"round {rnd} {name:14s} {toks:5d} tokens in {secs:6.2f} s = {tps:7.1f} tok/s  "
                          f"p50 {lat[len(lat) // 2]:.3f} s  p95 {lat[int(len(lat) * 0.95)]:.3f} s", flush=True)
                secs, toks = in_process(args, loaded, prompts, n)  # the server is idle meanwhile
                best["d_in_process"] = max(best.get("d_in_process", 0.0), toks / secs)
                print(f"round {rnd} d_in_process   {toks:5d} tokens in {secs:6.2f} s = {toks / secs:7.1f} tok/s",
                      flush=True)
            metrics = httpx.get(f"{url}/metrics", timeout=30).text
            swaps = sum(float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("laser_profile_swaps_total"))
            bsum = sum(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("laser_batch_size_sum"))
            bcount = sum(float(line.split()[-1]) for line in metrics.splitlines()
                         if line.startswith("laser_batch_size_count"))
            print(f"server: {swaps:.0f} profile swaps, mean batch size {bsum / max(bcount, 1):.1f}")
        finally:
            proc.terminate()
            proc.wait(30)
    a, b, c, d = best["a_base"], best["b_edited"], best["c_alternating"], best["d_in_process"]
    results = {**{k: round(v, 2) for k, v in best.items()}, "b/a": round(b / a, 3), "c/a": round(c / a, 3),
               "a/d": round(a / d, 3)}
    targets = {"b/a": 0.95, "c/a": 0.85, "a/d": 0.85}
    for k, t in targets.items():
        print(f"{k} = {results[k]:.3f}  (target >= {t}: {'ok' if results[k] >= t else 'MISSED'})")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
