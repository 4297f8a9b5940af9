"""Latency of /v1/generate with and without a validation sweep running, over loopback.

A real ``python -m server`` process; phase (a) sends ``--requests`` generate requests one after another
(closed loop, ``--concurrency`` clients) with no job, phase (b) sends the same requests while a sweep job
runs. The engine runs one sweep config per task between inference batches, so a request waits at most
for the step in progress: the p95 increase is bounded by the sweep's step time, which is printed too.

    python bench/sweep_latency.py                                   # SmolLM2, 40 requests, 16 new tokens
    python bench/sweep_latency.py --requests 20 --val-examples 20 --layers 4   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import server_process  # noqa: E402  (bench/server_process.py)

PROMPTS = ["The capital of France is", "Photosynthesis is the process by which",
           "The three primary colours are", "A short poem about the sea:"]


def start_server(args: argparse.Namespace, data_dir: Path, port: int) -> subprocess.Popen:
    return server_process.start_server(["--model", args.model, "--data-dir", str(data_dir), "--device", args.device], port)


async def latencies(url: str, n: int, concurrency: int, max_new: int) -> list[float]:
    out: list[float] = []
    it = iter(range(n))
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def worker() -> None:
            for i in it:
                t0 = time.perf_counter()
                r = await client.post("/v1/generate", json={"prompt": PROMPTS[i % len(PROMPTS)],
                                                             "max_new_tokens": max_new})
                r.raise_for_status()
                out.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--requests", type=int, default=40, help="generate requests per phase")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--dataset", default="epistemic_reasoning")
    ap.add_argument("--val-examples", type=int, default=40, help="max_validation_examples of the sweep")
    ap.add_argument("--layers", type=int, default=10, help="sweep the last N layers")
    ap.add_argument("--types", default="fc_in,fc_out")
    ap.add_argument("--rhos", default="0.9,0.8,0.6,0.2,0.1,0.05,0.01")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        port = server_process.free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(args, Path(tmp), port)
        try:
            c = httpx.Client(base_url=url, timeout=600)
            asyncio.run(latencies(url, args.warmup, 1, args.max_new_tokens))
            idle = asyncio.run(latencies(url, args.requests, args.concurrency, args.max_new_tokens))

            body = {"dataset": args.dataset, "types": args.types.split(","),
                    "layers": list(range(-args.layers, 0)), "rhos": [float(r) for r in args.rhos.split(",")],
                    "max_validation_examples": args.val_examples, "max_test_examples": args.val_examples}
            r = c.post("/v1/jobs/sweeps", json=body)
            r.raise_for_status()
            job_id = r.json()["id"]
            while c.get(f"/v1/jobs/{job_id}").json()["done"] < 2:  # base and one config: caches are warm
                time.sleep(0.1)
            before = c.get(f"/v1/jobs/{job_id}").json()["done"]
            busy = asyncio.run(latencies(url, args.requests, args.concurrency, args.max_new_tokens))
            job = c.get(f"/v1/jobs/{job_id}").json()
            overlapped = job["state"] == "running"
            steps_during = job["done"] - before
            config_s = [row["seconds"] for row in job["rows"] if row["role"] == "config"]
            c.delete(f"/v1/jobs/{job_id}")
        finally:
            proc.terminate()
            proc.wait(60)

    res = {
        "model": args.model, "max_new_tokens": args.max_new_tokens, "requests": args.requests,
        "concurrency": args.concurrency,
        "sweep": {**body, "total_steps": job["total"], "steps_during_phase_b": steps_during,
                  "still_running_after_phase_b": overlapped,
                  "mean_step_s": statistics.fmean(config_s) if config_s else None,
                  "max_step_s": max(config_s) if config_s else None},
        "without_sweep": {"p50_s": pct(idle, 0.5), "p95_s": pct(idle, 0.95), "mean_s": statistics.fmean(idle)},
        "with_sweep": {"p50_s": pct(busy, 0.5), "p95_s": pct(busy, 0.95), "mean_s": statistics.fmean(busy)},
    }
    res["ratio_p50"] = res["with_sweep"]["p50_s"] / res["without_sweep"]["p50_s"]
    res["ratio_p95"] = res["with_sweep"]["p95_s"] / res["without_sweep"]["p95_s"]
    print(f"/v1/generate ({args.max_new_tokens} new tokens, {args.requests} requests, concurrency "
          f"{args.concurrency}) on {args.model}")
    print(f"  without sweep: p50 {res['without_sweep']['p50_s'] * 1e3:8.1f} ms   p95 "
          f"{res['without_sweep']['p95_s'] * 1e3:8.1f} ms")
    print(f"  with sweep   : p50 {res['with_sweep']['p50_s'] * 1e3:8.1f} ms   p95 "
          f"{res['with_sweep']['p95_s'] * 1e3:8.1f} ms")
    print(f"  ratio        : p50 x{res['ratio_p50']:.2f}   p95 x{res['ratio_p95']:.2f}")
    sw = res["sweep"]
    mean_step = f"{sw['mean_step_s'] * 1e3:.0f}" if sw["mean_step_s"] is not None else "?"
    print(f"  sweep: {sw['steps_during_phase_b']} steps ran during phase (b), mean step {mean_step} ms; "
          f"still running afterwards: {sw['still_running_after_phase_b']}")
    if not overlapped:
        print("  warning: the sweep ended before phase (b) did; use a bigger grid (--layers, --val-examples)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
