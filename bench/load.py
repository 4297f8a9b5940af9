"""Load benchmark: first load of a GGUF model (dequantise + convert) vs a later load of the cached copy,
and the cost of the exact fingerprint (SHA-256 over every weight byte).

Both loads run in one process, into a fresh temporary cache directory, after the model code is
imported (so neither pays Python import time). Target: second load >= 3x faster. The fingerprint is
computed on the first load and cached beside the converted weights; the script times it on its own
and reports what it would add to a second load without the cache.

    .venv/bin/python bench/load.py [--model smollm2-135m] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from laser_ops.fingerprint import FingerprintCache, model_fingerprint  # noqa: E402
from laser_ops.loading import convert_gguf, load_model, resolve_source  # noqa: E402


def _warm_imports() -> None:
    """Import what a load touches, so the first timed load is not charged for imports."""
    import gguf  # noqa: F401
    import transformers.integrations.ggml  # noqa: F401
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="alias or .gguf file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed second loads (median)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary cache directory")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    folder, gguf_file, model_id = resolve_source(args.model)
    if gguf_file is None:
        parser.error(f"{args.model!r} is not a GGUF model: nothing is converted")
    _warm_imports()
    cache_dir = Path(tempfile.mkdtemp(prefix="laser-bench-load-"))
    print(f"model {model_id} ({gguf_file}, {(folder / gguf_file).stat().st_size / 2**20:.0f} MiB) on {args.device}, "
          f"torch threads {torch.get_num_threads()}, fresh cache {cache_dir}")

    t0 = time.perf_counter()
    first = load_model(args.model, device=args.device, cache_dir=cache_dir)
    first_s = time.perf_counter() - t0
    converted = next((cache_dir / "converted").iterdir())
    size = sum(f.stat().st_size for f in converted.rglob("*") if f.is_file())
    del first

    seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        again = load_model(args.model, device=args.device, cache_dir=cache_dir)
        seconds.append(time.perf_counter() - t0)
        assert again.fingerprint_cached
    second_s = statistics.median(seconds)

    storages = {t.untyped_storage().data_ptr(): t.numel() * t.element_size()  # tied weights hashed once
                for t in again.model.state_dict().values()}
    weight_bytes = sum(storages.values())
    hash_seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fingerprint = model_fingerprint(again.model)
        hash_seconds.append(time.perf_counter() - t0)
    assert fingerprint == again.fingerprint  # the cached value is the exact one
    hash_s = statistics.median(hash_seconds)
    t0 = time.perf_counter()
    assert FingerprintCache(converted / "laser-fingerprint.json", converted).get(again.dtype) == fingerprint
    fp_lookup_s = time.perf_counter() - t0
    del again
    t0 = time.perf_counter()
    assert convert_gguf(folder, gguf_file, cache_dir) == converted  # cache lookup only
    lookup_s = time.perf_counter() - t0

    print(f"first load (GGUF dequantise + convert + load): {first_s:7.2f} s "
          f"-> {converted.name} ({size / 2**20:.0f} MiB)")
    print(f"second load (cached safetensors), median of {args.repeats}: {second_s:7.2f} s "
          f"(runs: {', '.join(f'{s:.2f}' for s in seconds)}; cache lookup {lookup_s * 1e3:.1f} ms)")
    print(f"speed-up: {first_s / second_s:.1f}x (target >= 3x)")
    print(f"exact fingerprint (SHA-256 of {weight_bytes / 2**20:.0f} MiB of weights), median of {args.repeats}: "
          f"{hash_s:.2f} s ({weight_bytes / hash_s / 2**30:.2f} GiB/s; runs: "
          f"{', '.join(f'{s:.2f}' for s in hash_seconds)})")
    print(f"  paid on the first load: {100 * hash_s / first_s:.1f}% of it; later loads read it back in "
          f"{fp_lookup_s * 1e3:.1f} ms (without that cache a second load would take {second_s + hash_s:.2f} s, "
          f"+{100 * hash_s / second_s:.0f}%)")
    if args.keep:
        print(f"kept {cache_dir}")
    else:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
