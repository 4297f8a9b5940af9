"""Decompose each matrix once, reconstruct any rank from the cached factors.

A :class:`Decomposition` holds ``U, S, Vh`` of one logical matrix. Every rank-k reconstruction is
a slice and a matmul (``U[:, :k] * S[:k] @ Vh[:k]``), so sweeping seven values of rho costs one
SVD, not seven. :class:`SvdCache` keeps decompositions in memory (LRU, bounded in bytes) and,
optionally, on disk as safetensors keyed by the model fingerprint, the SVD precision and the parameter name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

SvdMethod = Literal["exact", "randomized"]


@dataclass(frozen=True)
class Decomposition:
    """``W ~= U @ diag(S) @ Vh`` with singular values in descending order.

    ``complete`` is True when all min(m, n) components are present (exact SVD); a randomized
    decomposition only holds the leading ``len(S)`` components.
    """

    U: torch.Tensor  # (m, r)
    S: torch.Tensor  # (r,)
    Vh: torch.Tensor  # (r, n)
    shape: tuple[int, int]
    complete: bool

    @property
    def rank_available(self) -> int:
        return int(self.S.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.U, self.S, self.Vh))

    def top(self, k: int) -> torch.Tensor:
        """Best rank-k approximation (Eckart-Young)."""
        self._check(k)
        return (self.U[:, :k] * self.S[:k]) @ self.Vh[:k]

    def bottom(self, k: int) -> torch.Tensor:
        """The components a rank-k LASER edit discards: ``W - W_k``."""
        if not self.complete:
            raise ValueError("keep_bottom needs a complete (exact) decomposition")
        self._check(k, allow_zero=True)
        return (self.U[:, k:] * self.S[k:]) @ self.Vh[k:]

    def _check(self, k: int, allow_zero: bool = False) -> None:
        lo = 0 if allow_zero else 1
        if not lo <= k <= self.rank_available:
            raise ValueError(f"rank {k} out of range {lo}..{self.rank_available}")


def decompose(
    matrix: torch.Tensor,
    *,
    method: SvdMethod = "exact",
    precision: torch.dtype = torch.float32,
    rank: int | None = None,
    niter: int = 2,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Decomposition:
    """SVD of a logical matrix, computed on the matrix's device in ``precision``, kept on ``device``.

    ``randomized`` uses :func:`torch.svd_lowrank` for the top ``rank`` components (plus
    oversampling) and is only valid for reconstructions of rank <= ``rank``.
    """
    m, n = matrix.shape
    a = matrix.detach().to(precision)
    if method == "exact" or rank is None or rank >= min(m, n) // 2:
        U, S, Vh = torch.linalg.svd(a, full_matrices=False)
        complete = True
    else:
        q = min(min(m, n), rank + 10)
        # Seeded for reproducibility without disturbing the caller's RNG streams (CPU and this device).
        with torch.random.fork_rng(devices=[a.device] if a.device.type == "cuda" else []):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(a, q=q, niter=niter)
        U, S, Vh = U[:, :rank], S[:rank], V[:, :rank].t()
        complete = False
    return Decomposition(*(t.to(device).contiguous() for t in (U, S, Vh)), (m, n), complete)


class SvdCache:
    """Decompositions keyed by (model fingerprint, precision, matrix key), LRU-bounded in bytes.

    On disk, factors live under ``disk_dir/<fingerprint>-<precision>/``: the exact fingerprint (see
    :mod:`laser_ops.fingerprint`) keeps one model's factors from ever serving another, and the precision
    keeps float32 factors apart from float64 (or bf16) ones. ``max_disk_bytes`` bounds the whole
    ``disk_dir`` (every model and precision), oldest-used files first.

    Thread-safe for concurrent ``get`` calls (a lock guards the maps; a decomposition is computed
    outside the lock, so two threads asking for the same new matrix may both compute it once).
    """

    def __init__(
        self,
        fingerprint: str,
        *,
        max_bytes: int = 2 << 30,
        disk_dir: str | os.PathLike[str] | None = None,
        max_disk_bytes: int = 8 << 30,
        precision: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self.precision = precision
        self.device = torch.device(device)  # where factors live: the model's GPU makes reconstructions cheap
        self.disk_root = Path(disk_dir) if disk_dir else None
        precision_name = str(precision).removeprefix("torch.")
        self.disk_dir = self.disk_root / f"{fingerprint}-{precision_name}" if self.disk_root else None
        self.max_disk_bytes = max_disk_bytes
        self._mem: OrderedDict[str, Decomposition] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.computed = 0  # SVDs actually run (tests and benchmarks read it)
        self.disk_hits = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __contains__(self, key: str) -> bool:
        return key in self._mem

    def has(self, key: str, *, complete: bool = True) -> bool:
        """Whether ``get(key, complete=...)`` would be answered without computing (memory, or a file on disk)."""
        with self._lock:
            dec = self._mem.get(key)
        if dec is not None and self._fits(dec, None, complete):
            return True
        path = self._path(key)
        return path is not None and path.exists()

    def get(self, key: str, matrix: torch.Tensor, *, min_rank: int | None = None, complete: bool = True) -> Decomposition:
        """The decomposition of ``matrix`` (stored under ``key``), computing it if needed.

        ``complete=False`` with ``min_rank`` allows a randomized decomposition of that many
        components; a cached one that is too small is replaced by a fresh computation.
        """
        with self._lock:
            dec = self._mem.get(key)
            if dec is not None and self._fits(dec, min_rank, complete):
                self._mem.move_to_end(key)
                return dec
        dec = self._load(key)
        if dec is None or not self._fits(dec, min_rank, complete):
            method: SvdMethod = "exact" if complete or min_rank is None else "randomized"
            dec = decompose(matrix, method=method, precision=self.precision, rank=min_rank, device=self.device)
            self.computed += 1
            self._store(key, dec)
        else:
            self.disk_hits += 1
        with self._lock:
            old = self._mem.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._mem[key] = dec
            self._bytes += dec.nbytes
            while self._bytes > self.max_bytes and len(self._mem) > 1:
                _, evicted = self._mem.popitem(last=False)
                self._bytes -= evicted.nbytes
        return dec

    @staticmethod
    def _fits(dec: Decomposition, min_rank: int | None, complete: bool) -> bool:
        if complete:
            return dec.complete
        return dec.complete or min_rank is None or dec.rank_available >= min_rank

    def _path(self, key: str) -> Path | None:
        if self.disk_dir is None:
            return None
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.disk_dir / f"{digest}.safetensors"

    def _load(self, key: str) -> Decomposition | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        try:
            t = load_file(str(path))
            shape = (int(t["shape"][0]), int(t["shape"][1]))
            U, S, Vh = (t[k].to(self.device) for k in ("U", "S", "Vh"))
            return Decomposition(U, S, Vh, shape, bool(t["complete"].item()))
        except Exception:  # a torn or foreign file is a cache miss, never an error
            logger.warning("ignoring unreadable SVD cache file %s", path, exc_info=True)
            return None

    def _store(self, key: str, dec: Decomposition) -> None:
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        save_file(
            {"U": dec.U.cpu(), "S": dec.S.cpu(), "Vh": dec.Vh.cpu(), "shape": torch.tensor(dec.shape),
             "complete": torch.tensor(dec.complete)},
            str(tmp), metadata={"key": key, "fingerprint": self.fingerprint, "precision": str(self.precision)},
        )
        os.replace(tmp, path)
        self._prune_disk()

    def _prune_disk(self) -> None:
        """Keep the whole disk cache (all models and precisions) under ``max_disk_bytes``."""
        assert self.disk_root is not None
        stats = []
        for p in self.disk_root.glob("*/*.safetensors"):
            try:
                stats.append((p.stat(), p))
            except FileNotFoundError:  # another process pruned it meanwhile
                continue
        stats.sort(key=lambda sp: sp[0].st_atime)
        total = sum(st.st_size for st, _ in stats)
        for st, victim in stats:
            if total <= self.max_disk_bytes:
                break
            total -= st.st_size
            victim.unlink(missing_ok=True)

    def clear(self) -> None:
        with self._lock:
            self._mem.clear()
            self._bytes = 0
