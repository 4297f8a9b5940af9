"""Serving benchmarks of the continuous-batching engine, as ratios measured side by side in one run.

Phases (all greedy, on one model; the server is a real ``python -m server`` process over loopback):

* ``mixed``: 32 closed-loop streaming clients over the same requests (``max_new_tokens`` uniform in
  8..256, seeded); server tokens/s and time to first token (TTFT), against
  - ``static``: in-process ``model.generate`` in static batches of 16 over the same requests (a batch runs
    to its longest request), and
  - ``hf_cb``: in-process ``transformers`` continuous batching (``ContinuousBatchingManager``), 32
    requests in flight, each with its own ``max_new_tokens``.
  Targets: server/static tokens/s >= 1.5, server/static p50 TTFT <= 0.25, server/hf_cb tokens/s >= 0.9.
* ``profiles``: the same closed loop at a fixed length, base only vs 8 and 32 LASER profiles mixed
  uniformly (each row served from its own factors). Targets: >= 0.95 and >= 0.9.
* ``dense``: base only vs a dense-kind profile (``prune_magnitude``, no low-rank form: its rows get the
  dense edited matrices per row) - the cost that would justify swapping weights for such a batch.
* ``short_long``: a 4-token request sent while a 512-token request decodes, vs the same request alone.
  Target: <= 2x.

    python bench/serve.py                          # SmolLM2 on this machine (a few minutes on 2 CPU cores)
    python bench/serve.py --requests 64 --clients 32 --parts mixed,profiles --json out.json

Throughput counts generated tokens (EOS ends a request early on both sides alike).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

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
PARTS = ("mixed", "profiles", "dense", "short_long")


def chat_prompts(tokenizer) -> list[str]:
    """Instruction prompts in the model's chat format (long answers, so requests mostly run to their length)."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in PROMPTS]
    return list(PROMPTS)


def workload(prompts: list[str], n: int, seed: int, lo: int, hi: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(prompts[i % len(prompts)], rng.randint(lo, hi)) for i in range(n)]


# ------------------------------------------------------------------------------------------------- server side


async def drive(url: str, reqs: list[dict], clients: int) -> dict:
    """Closed loop of streaming clients; tokens/s, TTFT (first text event) and latencies."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    tokens, ttfts, latencies = [0], [], []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                t0 = time.perf_counter()
                first = None
                async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if first is None and event.get("text"):
                            first = time.perf_counter() - t0
                        if event.get("usage"):
                            tokens[0] += event["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - t0)
                if first is not None:
                    ttfts.append(first)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        secs = time.perf_counter() - start
    return {"seconds": secs, "tokens": tokens[0], "tok_s": tokens[0] / secs, "ttft_p50": median(ttfts),
            "latency_p50": median(latencies)}


async def one(url: str, body: dict) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        t0 = time.perf_counter()
        (await client.post("/v1/generate", json=body)).raise_for_status()
        return time.perf_counter() - t0


async def short_during_long(url: str, prompt: str, short: int, long: int) -> tuple[float, int]:
    """Latency of a ``short``-token request sent once a ``long``-token one streams its first token."""
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        started = asyncio.Event()
        done = {}

        async def long_request() -> None:
            async with client.stream("POST", "/v1/generate", json={
                    "prompt": prompt, "max_new_tokens": long, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and '"text":"' in line and '"text":""' not in line:
                        started.set()
                    if '"usage"' in line:
                        done["long_tokens"] = json.loads(line[6:])["usage"]["completion_tokens"]

        task = asyncio.create_task(long_request())
        await started.wait()
        t0 = time.perf_counter()
        (await client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": short})).raise_for_status()
        latency = time.perf_counter() - t0
        long_running = not task.done()
        await task
        assert long_running, "the long request ended before the short one: make it longer"
        return latency, done.get("long_tokens", 0)


def server_phases(args: argparse.Namespace, prompts: list[str], work: list[tuple[str, int]]) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="laser-bench-") as tmp:
        port = server_process.free_port()
        url = f"http://127.0.0.1:{port}"
        proc = server_process.start_server(["--model", args.model, "--data-dir", str(Path(tmp) / "data"),
                                            "--device", args.device, "--max-running", str(args.clients),
                                            "--max-batch-tokens", str(args.max_batch_tokens),
                                            "--max-queue", str(max(256, 4 * args.clients))], port)
        try:
            n_layers = httpx.get(f"{url}/info", timeout=30).json()["num_layers"]
            warm = [{"prompt": p, "max_new_tokens": 8} for p in prompts]
            asyncio.run(drive(url, warm, len(warm)))
            if "mixed" in args.parts:
                reqs = [{"prompt": p, "max_new_tokens": n} for p, n in work]
                results["server_mixed"] = asyncio.run(drive(url, reqs, args.clients))
                print("server mixed lengths:", fmt(results["server_mixed"]), flush=True)
            if "profiles" in args.parts or "dense" in args.parts:
                names = []
                for i in range(32):  # distinct LASER edits: late layers, fc_in/fc_out, rho 0.01..0.1
                    spec = [{"target": ("fc_in", "fc_out")[i % 2], "layer": n_layers - 1 - (i // 2) % 8,
                             "rank_fraction": (0.01, 0.02, 0.05, 0.1)[(i // 16) % 2 + (i % 2)]}]
                    name = f"p{i}"
                    httpx.post(f"{url}/v1/profiles", json={"name": name, "interventions": spec},
                               timeout=600).raise_for_status()
                    names.append(name)
                dense = [{"kind": "prune_magnitude", "target": "fc_in", "layer": f"{n_layers - 5}:",
                          "sparsity": 0.5}]
                httpx.post(f"{url}/v1/profiles", json={"name": "dense", "interventions": dense},
                           timeout=600).raise_for_status()
                fixed = args.profile_tokens

                def reqs_for(profiles: list[str]) -> list[dict]:
                    return [{"profile": profiles[i % len(profiles)], "prompt": prompts[i % len(prompts)],
                             "max_new_tokens": fixed} for i in range(args.profile_requests)]

                # Compile every profile first (one short request each), so the timed phases serve only.
                asyncio.run(drive(url, [{"profile": p, "prompt": "Hi", "max_new_tokens": 2}
                                        for p in [*names, "dense"]], args.clients))
                for rnd in range(args.rounds):
                    for label, profiles in (("base", ["base"]), ("8_profiles", names[:8]),
                                            ("32_profiles", names), ("dense", ["dense"])):
                        if label == "dense" and "dense" not in args.parts:
                            continue
                        if label != "base" and label != "dense" and "profiles" not in args.parts:
                            continue
                        r = asyncio.run(drive(url, reqs_for(profiles), args.clients))
                        key = f"server_{label}"
                        if key not in results or r["tok_s"] > results[key]["tok_s"]:
                            results[key] = r
                        print(f"round {rnd} {label:12s}", fmt(r), flush=True)
                metrics = httpx.get(f"{url}/metrics", timeout=30).text
                written = sum(float(line.split()[-1]) for line in metrics.splitlines()
                              if line.startswith("laser_weight_bytes_written_total"))
                results["weight_bytes_written_while_serving"] = written
                print(f"weight bytes written while serving profiles: {written:.0f}", flush=True)
            if "short_long" in args.parts:
                prompt = prompts[0]
                asyncio.run(one(url, {"prompt": prompt, "max_new_tokens": args.short}))
                solo = min(asyncio.run(one(url, {"prompt": prompt, "max_new_tokens": args.short})) for _ in range(3))
                during, long_tokens = asyncio.run(short_during_long(url, prompt, args.short, args.long))
                results["short_long"] = {"solo_s": solo, "during_long_s": during, "long_tokens": long_tokens}
                print(f"{args.short}-token request: alone {solo:.3f} s, while a {args.long}-token request decodes "
                      f"{during:.3f} s", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    return results


def fmt(r: dict) -> str:
    text = (f"{r['tokens']:6d} tokens in {r['seconds']:7.2f} s = {r['tok_s']:7.1f} tok/s, TTFT p50 "
            f"{r['ttft_p50']:.3f} s")
    if r.get("latency_p50") is not None:  # the in-process runners do not time whole requests
        text += f", latency p50 {r['latency_p50']:.2f} s"
    return text


# ------------------------------------------------------------------------------------------------- in-process


def static_batches(model, tokenizer, work: list[tuple[str, int]], batch: int, clients: int) -> dict:
    """``model.generate`` in static batches, driven like the server by ``clients`` closed-loop clients: a batch
    takes the (up to ``batch``) oldest waiting requests and runs to its longest one (tokens past a request's
    own length are computed and thrown away); its clients send their next requests when it ends. TTFT: from
    a request's arrival to its batch's first token."""
    from collections import deque

    import torch

    tokenizer.padding_side = "left"

    class FirstToken:  # a streamer: put() is called with the prompt, then with each step's tokens
        def __init__(self) -> None:
            self.calls, self.at = 0, None

        def put(self, value: object) -> None:
            self.calls += 1
            if self.calls == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    eos = {tokenizer.eos_token_id}
    todo = deque(work)
    start = time.perf_counter()
    waiting: deque[tuple[str, int, float]] = deque()
    for _ in range(min(clients, len(todo))):
        waiting.append((*todo.popleft(), start))
    tokens, ttfts = 0, []
    while waiting:
        chunk = [waiting.popleft() for _ in range(min(batch, len(waiting)))]
        enc = tokenizer([p for p, _, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        streamer = FirstToken()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max(n for _, n, _ in chunk), do_sample=False,
                                 streamer=streamer, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        end = time.perf_counter()
        first = streamer.at or end
        ttfts += [first - arrival for _, _, arrival in chunk]
        for row, (_, n, _) in zip(out[:, enc["input_ids"].shape[1]:].tolist(), chunk, strict=True):
            row = row[:n]
            tokens += next((j for j, t in enumerate(row) if t in eos), len(row))
        for _ in chunk:  # these clients send their next requests now
            if todo:
                waiting.append((*todo.popleft(), end))
    secs = time.perf_counter() - start
    return {"seconds": secs, "tokens": tokens, "tok_s": tokens / secs, "ttft_p50": median(ttfts),
            "latency_p50": None}


def hf_continuous(model, tokenizer, work: list[tuple[str, int]], in_flight: int) -> dict:
    """``transformers`` continuous batching: ``in_flight`` requests at a time, each with its own length."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in work),
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p, _ in work]
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        pending = list(range(len(work)))
        sent: dict[str, float] = {}
        ttfts, tokens = [], 0
        start = time.perf_counter()

        def send() -> None:
            i = pending.pop(0)
            rid = manager.add_request(ids[i], request_id=f"r{i}", max_new_tokens=work[i][1], streaming=True)
            sent[rid] = time.perf_counter()

        for _ in range(min(in_flight, len(pending))):
            send()
        firsts: set[str] = set()
        finished = 0
        while finished < len(work):
            out = manager.get_result(timeout=60)
            if out is None:
                continue
            if out.request_id not in firsts and out.generated_tokens:
                firsts.add(out.request_id)
                ttfts.append(time.perf_counter() - sent[out.request_id])
            if out.is_finished():
                finished += 1
                tokens += len([t for t in out.generated_tokens if t != tokenizer.eos_token_id])
                if pending:
                    send()
        secs = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    return {"seconds": secs, "tokens": tokens, "tok_s": tokens / secs, "ttft_p50": median(ttfts),
            "latency_p50": None}


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--requests", type=int, default=64, help="requests of the mixed-length workload")
    ap.add_argument("--clients", type=int, default=32, help="closed-loop clients (and the server's max_running)")
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--static-batch", type=int, default=16)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--profile-requests", type=int, default=64)
    ap.add_argument("--profile-tokens", type=int, default=32)
    ap.add_argument("--short", type=int, default=4)
    ap.add_argument("--long", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2, help="profile phases interleaved this often; best counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
                    help="torch threads (OMP_NUM_THREADS) for the server and the in-process runs")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    args.parts = [p for p in args.parts.split(",") if p]
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from laser_ops.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    prompts = chat_prompts(loaded.tokenizer)
    work = workload(prompts, args.requests, args.seed, args.min_tokens, args.max_tokens)
    results = server_phases(args, prompts, work)  # the server runs alone; the in-process runs after it stops
    if "mixed" in args.parts:
        results["static"] = static_batches(loaded.model, loaded.tokenizer, work, args.static_batch, args.clients)
        print("in-process static batches of", args.static_batch, ":", fmt(results["static"]), flush=True)
        try:
            results["hf_cb"] = hf_continuous(loaded.model, loaded.tokenizer, work, args.clients)
            print("in-process transformers continuous batching:", fmt(results["hf_cb"]), flush=True)
        except Exception as exc:  # noqa: BLE001 - report, keep the other figures
            print(f"transformers continuous batching failed: {type(exc).__name__}: {exc}", flush=True)
    ratios = {}
    if "server_mixed" in results and "static" in results:
        s, st = results["server_mixed"], results["static"]
        ratios["mixed: server/static tok/s"] = (s["tok_s"] / st["tok_s"], ">=", 1.5)
        ratios["mixed: server/static TTFT p50"] = (s["ttft_p50"] / st["ttft_p50"], "<=", 0.25)
    if "server_mixed" in results and "hf_cb" in results:
        ratios["mixed: server/transformers-CB tok/s"] = (results["server_mixed"]["tok_s"] / results["hf_cb"]["tok_s"],
                                                         ">=", 0.9)
    if "server_8_profiles" in results:
        base = results["server_base"]["tok_s"]
        ratios["8 profiles / base tok/s"] = (results["server_8_profiles"]["tok_s"] / base, ">=", 0.95)
        ratios["32 profiles / base tok/s"] = (results["server_32_profiles"]["tok_s"] / base, ">=", 0.9)
    if "server_dense" in results:
        ratios["dense-kind profile / base tok/s"] = (results["server_dense"]["tok_s"] / results["server_base"]["tok_s"],
                                                     "report", None)
    if "short_long" in results:
        sl = results["short_long"]
        ratios[f"{args.short}-token latency during a {args.long}-token decode / alone"] = (
            sl["during_long_s"] / sl["solo_s"], "<=", 2.0)
    print()
    for name, (value, op, target) in ratios.items():
        verdict = "" if target is None else ("ok" if (value >= target if op == ">=" else value <= target)
                                             else "MISSED")
        goal = "" if target is None else f"(target {op} {target}: {verdict})"
        print(f"{name:55s} {value:7.3f}  {goal}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "ratios": {k: v[0] for k, v in ratios.items()}}, indent=2, default=str))


if __name__ == "__main__":
    main()
