"""Scoring and generation: the narrow :class:`Scorer` interface and its Hugging Face backend.

``api`` holds the requests, results and the abstract :class:`Scorer`; ``hf`` the :class:`HFScorer`
that runs them on :mod:`laser_ops.batching`. ``HFScorer`` is imported on first use, because the
batching core itself builds on ``api`` (importing it eagerly here would make the two packages
import each other).
"""

from typing import TYPE_CHECKING, Any

from laser_ops.scoring.api import (
    DEFAULT_MAX_LENGTH_CAP,
    ChoicePrediction,
    GenerationDelta,
    GenerationRequest,
    GenerationResult,
    LoglikelihoodResult,
    PromptLogprobs,
    RollingResult,
    Scorer,
    rolling_windows,
)

if TYPE_CHECKING:
    from laser_ops.scoring.hf import HFScorer


def __getattr__(name: str) -> Any:
    if name == "HFScorer":
        from laser_ops.scoring.hf import HFScorer

        return HFScorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DEFAULT_MAX_LENGTH_CAP",
    "ChoicePrediction",
    "GenerationDelta",
    "GenerationRequest",
    "GenerationResult",
    "HFScorer",
    "LoglikelihoodResult",
    "PromptLogprobs",
    "RollingResult",
    "Scorer",
    "rolling_windows",
]
