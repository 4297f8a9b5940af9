"""Export an edit profile as a folder that plain ``transformers`` loads, with or without laser-serve.

Two forms:

* :func:`export_dense` writes the edited model as a standard Hugging Face folder (safetensors,
  config, generation config, tokenizer). ``AutoModelForCausalLM.from_pretrained(folder)`` gives
  the same logits as the profile served live.
* :func:`export_factored` stores every low-rank edited matrix as its two rank-k factors
  ``A = U_k * S_k`` (m x k) and ``B = Vh_k`` (k x n) in ``laser_factors.safetensors``, the rest of
  the weights in ``model.safetensors`` (factored matrices omitted there), and writes a small
  self-contained ``laser_loader.py`` (torch, safetensors, transformers only) whose
  ``load(folder)`` rebuilds the dense weights. Factors are always of the logical (out x in)
  matrix; for GPT-2 ``Conv1D`` (stored in x out) the loader writes the transposed product.

Both write ``laser_profile.json`` beside the weights: the profile (interventions JSON), the base
model fingerprint, the laser-serve version and per-matrix figures (the :class:`ExportReport`).

An export has two phases. :func:`snapshot_dense` / :func:`snapshot_factored` run on the swapper's
owner thread (the server's engine thread, see :mod:`laser_ops.swap`): they build the edited tensors
(``swapper.materialize``: nothing is written into the model) and the factors, and reference the
unedited parameters. :func:`write_export` then writes the files from any thread, so a server holds
its model thread for the snapshot only; the caller keeps the base weights unchanged until the write
ends (the server holds back weight-writing tasks meanwhile). :func:`export_dense` and
:func:`export_factored` do both in one call.

Files are written into a temporary sibling folder and moved into place at the end, so a failed
export leaves no half-written folder behind. A non-empty target folder is refused unless
``overwrite=True``.
"""

from laser_ops.export.report import ExportMode, ExportReport, MatrixRow
from laser_ops.export.writer import (
    FACTORABLE_KINDS,
    FACTORS_FILE,
    FORMAT,
    FORMAT_VERSION,
    LOADER_FILE,
    LOADER_SOURCE,
    PROFILE_FILE,
    ExportSnapshot,
    export_dense,
    export_factored,
    snapshot_dense,
    snapshot_factored,
    write_export,
)

__all__ = [
    "FACTORABLE_KINDS", "FACTORS_FILE", "FORMAT", "FORMAT_VERSION", "LOADER_FILE", "LOADER_SOURCE", "PROFILE_FILE",
    "ExportMode", "ExportReport", "ExportSnapshot", "MatrixRow", "export_dense", "export_factored", "snapshot_dense",
    "snapshot_factored", "write_export",
]
