"""Data-free spectral diagnostics of one matrix (no validation data needed).

Formulas (see REFERENCES.md, laserRMT / Spectrum):
- sigma_hat = IQR(S) / 1.349; tau_MP = sigma_hat * (1 + sqrt(beta)), beta = min(m, n) / max(m, n)
- MP rank = #{S > tau_MP}; SNR = sum(S[S > tau]) / sum(S[S <= tau]) (Spectrum also divides by S[0])
- effective rank (Roy & Vetterli 2007) = exp(H(p)), p_i = S_i / sum(S)
- stable rank = ||W||_F^2 / ||W||_2^2
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


def mp_threshold(S: torch.Tensor, shape: tuple[int, int]) -> float:
    s = S.double()
    q75, q25 = torch.quantile(s, 0.75).item(), torch.quantile(s, 0.25).item()
    sigma_hat = (q75 - q25) / 1.349
    beta = min(shape) / max(shape)
    return sigma_hat * (1.0 + math.sqrt(beta))


def mp_rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    """Number of singular values above the Marchenko-Pastur threshold."""
    return int((S.double() > mp_threshold(S, shape)).sum().item())


@dataclass(frozen=True)
class SpectrumReport:
    shape: tuple[int, int]
    sigma_max: float
    sigma_min: float
    sigma_mean: float
    sigma_median: float
    effective_rank: float
    stable_rank: float
    mp_threshold: float
    mp_rank: int
    snr: float
    snr_normalized: float  # Spectrum's variant: SNR / S[0]
    k: int | None = None
    retained_energy: float | None = None  # sum(S[:k]^2) / sum(S^2)
    frobenius_error: float | None = None  # ||W - W_k||_F = sqrt(sum(S[k:]^2))
    relative_frobenius_error: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def spectrum_report(S: torch.Tensor, shape: tuple[int, int], k: int | None = None) -> SpectrumReport:
    """Diagnostics from the singular values of an (m, n) matrix; ``k`` adds the rank-k figures."""
    s = S.double()
    total = s.sum().item()
    p = s / total if total > 0 else s
    nz = p[p > 0]
    eff = math.exp(float(-(nz * nz.log()).sum().item())) if nz.numel() else 0.0
    s2 = s**2
    fro2 = s2.sum().item()
    tau = mp_threshold(s, shape)
    signal, noise = s[s > tau].sum().item(), s[s <= tau].sum().item()
    snr = signal / noise if noise > 0 else math.inf
    report = dict(
        shape=tuple(shape), sigma_max=s.max().item(), sigma_min=s.min().item(), sigma_mean=s.mean().item(),
        sigma_median=s.median().item(), effective_rank=eff,
        stable_rank=fro2 / s[0].item() ** 2 if s[0] > 0 else 0.0,
        mp_threshold=tau, mp_rank=int((s > tau).sum().item()), snr=snr,
        snr_normalized=snr / s[0].item() if s[0] > 0 else 0.0,
    )
    if k is not None:
        if not 0 <= k <= s.numel():
            raise ValueError(f"k {k} out of range 0..{s.numel()}")
        kept = s2[:k].sum().item()
        err2 = s2[k:].sum().item()
        report.update(k=k, retained_energy=kept / fro2 if fro2 > 0 else 1.0, frobenius_error=math.sqrt(err2),
                      relative_frobenius_error=math.sqrt(err2 / fro2) if fro2 > 0 else 0.0)
    return SpectrumReport(**report)
