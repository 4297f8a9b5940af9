"""Spectrum of one base matrix: decomposed on the engine's owner thread (it reads the live weights)."""

from __future__ import annotations

import math

from laser_ops.scoring import Scorer
from laser_ops.spectral import SpectrumReport
from laser_ops.swap import WeightSwapper
from laser_ops.targets import TargetError
from server.errors import ApiError
from laser_protocol.spectra import MatrixSpectrum
from server.state import Services


async def spectrum(services: Services, type_: str, layer: int, k: int | None) -> MatrixSpectrum:
    """Singular values and diagnostics; 422 naming the path or query field that does not fit the model."""
    targets = services.engine.info.targets
    try:
        ref = targets.ref(type_, layer)
    except TargetError as e:
        raise ApiError(422, str(e), ("path", "layer" if e.field == "layer" else "type")) from None
    n = min(ref.shape)
    if k is not None and not 1 <= k <= n:
        raise ApiError(422, f"k {k} out of range: allowed 1..{n} for this {ref.shape[0]}x{ref.shape[1]} matrix",
                       ("query", "k"))

    def compute(swapper: WeightSwapper, _scorer: Scorer) -> tuple[list[float], SpectrumReport]:
        return swapper.singular_values(ref.type, ref.layer).tolist(), swapper.spectrum(ref.type, ref.layer, k)

    values, report = await services.engine.run_task(compute)
    return MatrixSpectrum(
        type=ref.type, layer=ref.layer, param_name=ref.param_name, shape=list(ref.shape), singular_values=values,
        sigma_max=report.sigma_max, sigma_min=report.sigma_min, effective_rank=report.effective_rank,
        stable_rank=report.stable_rank, mp_threshold=report.mp_threshold, mp_rank=report.mp_rank,
        snr=report.snr if math.isfinite(report.snr) else None, k=report.k, retained_energy=report.retained_energy,
        frobenius_error=report.frobenius_error, relative_frobenius_error=report.relative_frobenius_error)
