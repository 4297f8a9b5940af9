"""Latency of a small /v1/generate while an uncached all-layer dry run computes its SVDs, against its solo latency.

A real ``python -m server`` process with a fresh data dir (no SVD cache on disk): (a) ``--requests`` 2-token
generates one after another, alone; (b) the dry run of ``{"target": TARGET, "layer": "all", "rank_fraction":
0.1}`` (one SVD per layer, none cached), and the same generates sent one after another while it runs. The SVDs
run off the engine's owner thread (server/decompositions.py), so inference goes on: target ratio <= 2.

    python bench/decompose_latency.py                       # SmolLM2, fc_up, all 30 layers
    python bench/decompose_latency.py --target mlp          # 90 matrices
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import server_process  # noqa: E402  (bench/server_process.py)

PROMPT = "The capital of France is"


def generate_latency(client: httpx.Client) -> float:
    t0 = time.perf_counter()
    r = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2})
    r.raise_for_status()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--target", default="fc_up", help="LASER type or group decomposed in every layer")
    parser.add_argument("--requests", type=int, default=20, help="solo generates measured")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        port = server_process.free_port()
        proc = server_process.start_server(["--model", args.model, "--data-dir", tmp, "--device", args.device], port)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=3600) as client:
                for _ in range(3):
                    generate_latency(client)  # warm-up
                solo = [generate_latency(client) for _ in range(args.requests)]

                done = threading.Event()
                dry: dict[str, float] = {}

                def dry_run() -> None:
                    t0 = time.perf_counter()
                    with httpx.Client(base_url=client.base_url, timeout=3600) as c:
                        r = c.post("/v1/profiles?dry_run=true", json={"name": "bench", "interventions": [
                            {"target": args.target, "layer": "all", "rank_fraction": 0.1}]})
                    r.raise_for_status()
                    dry["seconds"], dry["matrices"] = time.perf_counter() - t0, len(r.json()["matrices"])
                    done.set()

                thread = threading.Thread(target=dry_run)
                thread.start()
                during = []
                while not done.is_set():
                    during.append(generate_latency(client))
                thread.join()
        finally:
            proc.terminate()
            proc.wait(30)

    solo_p50, during_p50 = statistics.median(solo), statistics.median(during)
    print(f"dry run: {dry['matrices']} matrices of {args.target}, all layers, uncached: {dry['seconds']:.1f} s")
    print(f"2-token generate alone:           p50 {solo_p50 * 1000:7.1f} ms  max {max(solo) * 1000:7.1f} ms "
          f"({len(solo)} requests)")
    print(f"2-token generate during dry run:  p50 {during_p50 * 1000:7.1f} ms  max {max(during) * 1000:7.1f} ms "
          f"({len(during)} requests)")
    print(f"ratio during / alone (p50): {during_p50 / solo_p50:.2f}  (target <= 2)")
    print(f"ratio during / alone (max): {max(during) / solo_p50:.2f}")


if __name__ == "__main__":
    main()
