"""The loader: local folders, fingerprints, error messages; integration on the embedded SmolLM2."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from laser_ops.loading import (
    LoadedModel,
    ModelLoadError,
    convert_gguf,
    default_cache_dir,
    load_model,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.targets import describe
from laser_ops.testing import make_tiny_model, save_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("tiny") / "llama-a"))


def test_load_a_tiny_hf_folder(tiny_folder):
    lm = load_model(tiny_folder, device="cpu")
    assert isinstance(lm, LoadedModel)
    assert lm.model_id == "llama-a" and lm.source == tiny_folder and not lm.converted_from_gguf
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert describe(lm.model).num_layers == 3
    expected = make_tiny_model("llama").state_dict()
    for name, value in lm.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert lm.tokenizer("Paris").input_ids == lm.tokenizer("Paris").input_ids and len(lm.tokenizer) > 256


def test_load_with_explicit_dtype(tiny_folder):
    lm = load_model(tiny_folder, device="cpu", dtype="bf16")
    assert lm.dtype == torch.bfloat16
    assert lm.fingerprint != load_model(tiny_folder, device="cpu").fingerprint  # dtype is part of identity


def test_masked_lm_folder_loads_as_masked_lm(tmp_path):
    lm = load_model(save_tiny_model("bert", str(tmp_path / "bert")), device="cpu")
    assert type(lm.model).__name__ == "BertForMaskedLM"
    assert describe(lm.model).architecture == "bert"


def test_fingerprint_ignores_the_path_and_sees_the_weights(tiny_folder, tmp_path):
    copy = shutil.copytree(tiny_folder, tmp_path / "somewhere" / "else")
    a = load_model(tiny_folder, device="cpu")
    b = load_model(str(copy), device="cpu")
    assert a.fingerprint == b.fingerprint
    assert a.model_id != b.model_id
    other = load_model(save_tiny_model("llama", str(tmp_path / "seed1"), seed=1), device="cpu")
    assert other.fingerprint != a.fingerprint
    assert model_fingerprint(make_tiny_model("llama")) == a.fingerprint


def test_fingerprint_changes_when_one_weight_changes():
    model = make_tiny_model("gpt2")
    before = model_fingerprint(model)
    with torch.no_grad():
        model.get_parameter("transformer.h.1.mlp.c_fc.weight")[3, 7] += 1.0
    assert model_fingerprint(model) != before


def test_fingerprint_of_a_tensor_larger_than_float32_counts():
    """Regression: a float32 linspace over 2**24 + 4 elements rounds the last index past the end."""
    module = nn.Module()
    module.register_buffer("big", torch.zeros(2**24 + 4, dtype=torch.int8))
    first = model_fingerprint(module)
    module.big[-1] = 1  # the last element is always sampled
    assert model_fingerprint(module) != first


@pytest.mark.parametrize("spec", ["/nonexistent/model", "not-an-alias", "model.safetensors"])
def test_bad_spec_names_what_is_accepted(spec):
    with pytest.raises(ModelLoadError) as exc:
        load_model(spec, device="cpu")
    msg = str(exc.value)
    assert repr(spec) in msg and "smollm2-135m" in msg and "config.json" in msg and ".gguf" in msg


def test_folder_without_config_or_with_two_ggufs_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not an alias"):
        resolve_source(str(tmp_path))
    (tmp_path / "a.gguf").write_bytes(b"x")
    assert resolve_source(str(tmp_path)) == (tmp_path, "a.gguf", "a")
    assert resolve_source(str(tmp_path / "a.gguf")) == (tmp_path, "a.gguf", "a")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(ModelLoadError):
        resolve_source(str(tmp_path))


def test_missing_alias_package_says_how_to_install(monkeypatch):
    import laser_ops.loading as loading

    monkeypatch.setitem(loading._ALIASES, "ghost-1m", ("no_such_package_xyz", "ghost.gguf"))
    with pytest.raises(ModelLoadError, match="pip install"):
        resolve_source("ghost-1m")


@pytest.mark.parametrize(("dtype", "expected"), [
    (None, torch.float32), ("auto", torch.float32), ("float32", torch.float32), ("fp32", torch.float32),
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16), (torch.float16, torch.float16),
])
def test_dtype_resolution_on_cpu(dtype, expected):
    assert resolve_dtype(dtype, torch.device("cpu")) == expected


@pytest.mark.parametrize("dtype", ["int8", "float64", "half-ish"])
def test_unknown_dtype_lists_the_allowed_ones(dtype):
    with pytest.raises(ModelLoadError) as exc:
        resolve_dtype(dtype, torch.device("cpu"))
    msg = str(exc.value)
    assert repr(dtype) in msg and "auto" in msg and "bfloat16" in msg and "float32" in msg


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None)
    with pytest.raises(ModelLoadError, match="'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tiny_folder):
    with pytest.raises(ModelLoadError, match="CUDA is not available; use 'cpu' or 'auto'"):
        load_model(tiny_folder, device="cuda")


# --- integration: the embedded SmolLM2-135M ---------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def smollm2_swapper(smollm2) -> WeightSwapper:
    return WeightSwapper(smollm2.model, svd_cache=SvdCache(smollm2.fingerprint))


def _hashes(model: nn.Module) -> dict[str, bytes]:
    import hashlib

    return {n: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).digest()
            for n, t in model.state_dict().items()}


def _logits(lm: LoadedModel, text: str = "The capital of France is") -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return lm.model(ids).logits[0, -1]


def _greedy(lm: LoadedModel, text: str) -> str:
    enc = lm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=lm.tokenizer.eos_token_id)
    return lm.tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.integration
def test_smollm2_is_described_as_llama(smollm2):
    d = describe(smollm2.model)
    assert (d.architecture, d.model_type, d.num_layers) == ("llama", "llama", 30)
    assert d.types["fc_in"].shape == (1536, 576) and d.types["fc_out"].shape == (576, 1536)
    assert d.types["k_proj"].shape == (192, 576)  # GQA: 3 kv heads of 64
    assert smollm2.converted_from_gguf and smollm2.dtype == torch.float32


@pytest.mark.integration
def test_smollm2_greedy_answer_is_paris(smollm2, smollm2_swapper):
    assert smollm2_swapper.is_base
    assert "Paris" in _greedy(smollm2, "The capital of France is")


@pytest.mark.integration
def test_smollm2_laser_edit_changes_logits_reverts_exactly_and_reapplies_without_svd(smollm2, smollm2_swapper):
    model, swapper = smollm2.model, smollm2_swapper
    base_hashes, base_logits = _hashes(model), _logits(smollm2)
    profile = [{"target": "fc_in", "layer": 27, "rank_fraction": 0.01}]
    (report,) = swapper.dry_run(profile)
    assert report.k == 5 and report.shape == (1536, 576)
    assert _hashes(model) == base_hashes

    try:
        stats = swapper.apply(profile)
        assert stats.written == 1 and stats.materialized == 1
        assert (_logits(smollm2) - base_logits).abs().max() > 1e-3
        edited = _hashes(model)
        assert [n for n in base_hashes if base_hashes[n] != edited[n]] == ["model.layers.27.mlp.gate_proj.weight"]

        swapper.revert()
        assert _hashes(model) == base_hashes
        assert torch.equal(_logits(smollm2), base_logits)

        svds_before = swapper.svd_cache.computed
        again = swapper.apply(profile)
        assert again.svds == 0 and again.materialized == 0 and again.written == 1
        assert swapper.svd_cache.computed == svds_before
        assert _hashes(model) == edited
        other_rank = swapper.apply([{"target": "fc_in", "layer": 27, "rank_fraction": 0.1}])
        assert other_rank.svds == 0 and other_rank.materialized == 1
    finally:
        swapper.revert()
    assert _hashes(model) == base_hashes
    assert "Paris" in _greedy(smollm2, "The capital of France is")


@pytest.mark.integration
def test_smollm2_second_load_reuses_the_conversion(smollm2):
    folder, gguf_file, _ = resolve_source("smollm2-135m")
    converted = convert_gguf(folder, gguf_file, default_cache_dir())  # the fixture already converted: a lookup
    stamp = (converted / "config.json").stat().st_mtime_ns
    again = load_model("smollm2-135m", device="cpu")
    assert again.fingerprint == smollm2.fingerprint and again.converted_from_gguf
    assert again.fingerprint_cached  # read from beside the converted weights: no second pass over them
    assert (converted / "laser-fingerprint.json").is_file()
    assert (converted / "config.json").stat().st_mtime_ns == stamp  # not written again
