"""The exact identity of a model's weights, and a cache that keeps a second start fast.

Everything derived from the weights is keyed by this fingerprint: SVD factors kept on disk, the model a
sweep job was submitted for, exports. It must therefore differ for *any* two models whose weights differ in
one element, dtype or shape. :func:`model_fingerprint` hashes every byte of every tensor (SHA-256, streamed:
GPU tensors are copied to the host in bounded chunks, CPU tensors are hashed in place), per tensor on a small
thread pool (``hashlib`` releases the GIL on large buffers), and combines the per-tensor digests with the
names, dtypes and shapes in name order.

Hashing costs about one pass over the weights (``bench/load.py`` reports it), so :class:`FingerprintCache`
keeps the result in a small JSON file beside the converted weights it was computed from (laser-serve's own
content-addressed copy of a GGUF model), keyed by the files' names, sizes and modification times, the dtype
and the library versions: a second start reads it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import transformers

logger = logging.getLogger(__name__)

FINGERPRINT_VERSION = 2  # bump when the algorithm changes: cached values of an older version are ignored
_CHUNK_BYTES = 64 << 20


def _tensor_digest(t: torch.Tensor, chunk_bytes: int) -> bytes:
    """SHA-256 of the tensor's bytes in row-major order (device-independent)."""
    h = hashlib.sha256()
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    per_chunk = max(1, chunk_bytes // max(1, flat.element_size()))
    for start in range(0, flat.numel(), per_chunk):
        part = flat[start:start + per_chunk]
        if part.device.type != "cpu":
            part = part.to("cpu")
        h.update(part.view(torch.uint8).numpy())
    return h.digest()


def model_fingerprint(model: torch.nn.Module, *, workers: int | None = None,
                      chunk_bytes: int = _CHUNK_BYTES) -> str:
    """SHA-256 (hex) over every state-dict tensor: name, dtype, shape and all of its bytes.

    Tensors that share storage (tied embeddings) are hashed once and recorded as aliases, so a tied and
    an untied model with equal values still differ.
    """
    state = sorted(model.state_dict().items())
    first_name: dict[tuple[object, ...], str] = {}
    unique: list[tuple[str, torch.Tensor]] = []
    alias_of: dict[str, str] = {}
    for name, t in state:
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.stride()),
                 tuple(t.shape), t.dtype)
        if ident in first_name and t.numel() > 0:
            alias_of[name] = first_name[ident]
        else:
            first_name[ident] = name
            unique.append((name, t))
    n_workers = workers or min(8, os.cpu_count() or 1)
    with torch.no_grad(), ThreadPoolExecutor(n_workers, thread_name_prefix="laser-fingerprint") as pool:
        digests = dict(zip((n for n, _ in unique),
                           pool.map(lambda item: _tensor_digest(item[1], chunk_bytes), unique)))
    h = hashlib.sha256(f"laser-serve fingerprint v{FINGERPRINT_VERSION}\n".encode())
    for name, t in state:
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        h.update(f"alias:{alias_of[name]}".encode() if name in alias_of else digests[name])
        h.update(b"\n")
    return h.hexdigest()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".gguf")


class FingerprintCache:
    """Fingerprints of a folder's weights, in one JSON file, valid while the files are unchanged.

    ``path`` is the JSON file inside ``folder``. An entry's key covers every weight and config file's name,
    size and mtime, the dtype, and the transformers/torch versions (a loader change can change tensors), so
    a file replaced by hand, another dtype or an upgrade computes afresh.
    """

    def __init__(self, path: Path, folder: Path) -> None:
        self.path = Path(path)
        self.folder = Path(folder)

    def key(self, dtype: torch.dtype) -> str:
        h = hashlib.sha256()
        h.update(f"v{FINGERPRINT_VERSION}|{dtype}|{transformers.__version__}|{torch.__version__}".encode())
        for f in sorted(self._files()):
            st = f.stat()
            h.update(f"|{f.relative_to(self.folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def _files(self) -> Iterable[Path]:
        return (f for f in self.folder.rglob("*") if f.is_file() and f.suffix in _WEIGHT_SUFFIXES
                and f != self.path)

    def _entries(self) -> dict[str, str]:
        try:
            raw = json.loads(self.path.read_text())
            return dict(raw.get("entries", {})) if raw.get("version") == FINGERPRINT_VERSION else {}
        except (OSError, ValueError, AttributeError):
            return {}

    def get(self, dtype: torch.dtype) -> str | None:
        return self._entries().get(self.key(dtype))

    def put(self, dtype: torch.dtype, fingerprint: str) -> None:
        """Record a fingerprint (atomically; an unwritable location only costs the next start a rehash)."""
        entries = self._entries()
        entries[self.key(dtype)] = fingerprint
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".fingerprint-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": FINGERPRINT_VERSION, "entries": entries}, f, indent=1)
            os.replace(tmp, self.path)
        except OSError:
            logger.warning("cannot cache the model fingerprint at %s", self.path, exc_info=True)

    def fingerprint(self, model: torch.nn.Module, dtype: torch.dtype) -> tuple[str, bool]:
        """(fingerprint, True if it came from the cache). Computes and stores it on a miss."""
        cached = self.get(dtype)
        if cached is not None:
            return cached, True
        value = model_fingerprint(model)
        self.put(dtype, value)
        return value, False
