"""Load a laser-serve factored export: plain transformers plus rank-k factors.

Self-contained: needs only torch, safetensors and transformers (not laser-serve).

    import importlib.util, os
    spec = importlib.util.spec_from_file_location("laser_loader", os.path.join(folder, "laser_loader.py"))
    laser_loader = importlib.util.module_from_spec(spec); spec.loader.exec_module(laser_loader)
    model = laser_loader.load(folder)            # extra keyword arguments go to from_pretrained

``model.safetensors`` holds every weight except the factored matrices; ``laser_factors.safetensors``
holds, per edited matrix, A = U_k * S_k (m x k) and B = Vh_k (k x n) of the logical (out x in)
matrix. ``load`` builds the model from the folder, then writes A @ B into each factored parameter
(transposed where the parameter is stored in x out, as GPT-2 Conv1D does; into every name of a
tied parameter).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import transformers
from safetensors import safe_open

FACTORS_FILE = "laser_factors.safetensors"


def factors(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The factored matrices listed in the folder (names, shapes, ranks, orientation)."""
    with safe_open(os.path.join(folder, FACTORS_FILE), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("laser_factors", "[]"))


def _model_class(config: Any) -> Any:
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def dense_weight(a: torch.Tensor, b: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The stored weight of one factored matrix: A @ B, or its transpose for in x out storage."""
    w = a.to(torch.float32) @ b.to(torch.float32)
    return w.t() if transposed else w


def load(folder: str | os.PathLike, **from_pretrained_kwargs: Any) -> torch.nn.Module:
    """The edited model, in eval mode, with every factored matrix rebuilt dense."""
    folder = os.fspath(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the factored matrices are "missing" on purpose
    try:
        model = _model_class(config).from_pretrained(folder, **from_pretrained_kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    params = dict(model.named_parameters(remove_duplicate=False))
    with safe_open(os.path.join(folder, FACTORS_FILE), framework="pt") as f, torch.no_grad():
        for entry in json.loads((f.metadata() or {}).get("laser_factors", "[]")):
            w = dense_weight(f.get_tensor(entry["a"]), f.get_tensor(entry["b"]), entry["transposed"])
            for name in entry["params"]:
                p = params[name]
                if tuple(p.shape) != tuple(w.shape):
                    raise ValueError(f"{name}: factors give {tuple(w.shape)}, the model has {tuple(p.shape)}")
                p.copy_(w.to(device=p.device, dtype=p.dtype))
    return model.eval()
