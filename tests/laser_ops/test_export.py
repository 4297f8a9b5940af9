"""Tests for laser_ops.export: dense and factored exports load without laser-serve and match the live profile."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from laser_ops.export import (
    FACTORS_FILE,
    LOADER_FILE,
    PROFILE_FILE,
    ExportReport,
    export_dense,
    export_factored,
)
from laser_ops.interventions import InterventionError, parse_profile
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.testing import make_tiny_model, tiny_tokenizer

ARCHS = ("llama", "gpt2", "gpt_neox", "opt", "phi")
# A small-rank top-k edit (factorable), an attention edit (fused on gpt2 / gpt_neox), a dense-only kind.
PROFILE = [
    {"kind": "laser", "target": "fc_in", "layer": -1, "rank_fraction": 0.25},
    {"kind": "laser", "target": "q_proj", "layer": 0, "rank": 2},
    {"kind": "prune_magnitude", "target": "fc_out", "layer": 1, "sparsity": 0.5},
]
OTHER = [{"kind": "laser", "target": "fc_out", "layer": 0, "rank_fraction": 0.5}]
TEXT = "The capital of France is Paris. A quick brown fox"


def _setup(arch: str) -> tuple[torch.nn.Module, WeightSwapper]:
    model = make_tiny_model(arch)
    return model, WeightSwapper(model, svd_cache=SvdCache(f"test-{arch}"))


def _ids() -> torch.Tensor:
    return tiny_tokenizer()(TEXT, return_tensors="pt").input_ids


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(_ids()).logits


@torch.no_grad()
def _live_logits(model: torch.nn.Module, swapper: WeightSwapper, specs: list[dict]) -> torch.Tensor:
    with swapper.applied_profile(specs):
        return _logits(model)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(state[k], v), k


def _import_loader(folder: Path):
    spec = importlib.util.spec_from_file_location(f"laser_loader_{abs(hash(str(folder)))}", folder / LOADER_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_export_loads_with_plain_transformers(arch: str, tmp_path: Path) -> None:
    model, swapper = _setup(arch)
    expected = _live_logits(model, swapper, PROFILE)
    snapshot = _snapshot(model)
    out = tmp_path / "dense"
    report = export_dense(model, tiny_tokenizer(), swapper, PROFILE, out, metadata={"note": "t"})

    _assert_same(model, snapshot)
    assert swapper.is_base
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=1e-5)
    # The base logits differ, so the comparison above is not vacuous.
    assert not torch.allclose(_logits(model), expected, atol=1e-4)

    assert report.mode == "dense" and report.saved_bytes == 0
    assert {"config.json", "model.safetensors", PROFILE_FILE, "tokenizer.json"} <= set(report.files)
    assert report.bytes == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    info = json.loads((out / PROFILE_FILE).read_text())
    assert info["mode"] == "dense" and info["base_model"]["fingerprint"] == f"test-{arch}"
    assert info["metadata"] == {"note": "t"} and len(info["profile"]) == 3
    assert info["laser_serve_version"] and info["profile_signature"] == report.profile_signature
    assert not list(tmp_path.glob(".dense.tmp-*"))


@pytest.mark.parametrize("arch", ARCHS + ("bert",))
def test_factored_export_loader_matches_live(arch: str, tmp_path: Path) -> None:
    model, swapper = _setup(arch)
    expected = _live_logits(model, swapper, PROFILE)
    snapshot = _snapshot(model)
    out = tmp_path / "factored"
    report = export_factored(model, tiny_tokenizer(), swapper, PROFILE, out)

    _assert_same(model, snapshot)
    loader = _import_loader(out)
    loaded = loader.load(out)
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=1e-5)

    by_type = {r.type: r for r in report.rows}
    assert by_type["fc_in"].stored == "factored" and by_type["fc_in"].k == 8  # floor(0.25 * 32)
    m, n = by_type["fc_in"].shape  # 64 x 32 (128 x 32 on gpt2)
    assert by_type["fc_in"].stored_bytes == 8 * (m + n) * 4 and by_type["fc_in"].dense_bytes == m * n * 4
    assert by_type["fc_out"].stored == "dense" and "prune_magnitude" in by_type["fc_out"].note
    fused = arch in ("gpt2", "gpt_neox")
    assert by_type["q_proj"].stored == ("dense" if fused else "factored")
    if fused:
        assert "fused" in by_type["q_proj"].note
    assert report.saved_bytes > 0
    assert report.saved_bytes == report.dense_bytes - report.factored_bytes
    assert report.saved_bytes == sum(r.saved_bytes for r in report.rows)
    assert {FACTORS_FILE, LOADER_FILE, "model.safetensors", PROFILE_FILE} <= set(report.files)

    # The factored matrices are absent from model.safetensors (that is where the bytes are saved).
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert by_type["fc_in"].param_name not in keys
    assert by_type["fc_out"].param_name in keys
    entries = loader.factors(out)
    assert {e["type"] for e in entries} == ({"fc_in"} if fused else {"fc_in", "q_proj"})
    assert all(e["transposed"] == (arch == "gpt2") for e in entries)


def test_factored_gpt2_conv1d_orientation(tmp_path: Path) -> None:
    """Factors are of the logical out x in matrix; the loader writes the transposed product for Conv1D."""
    model, swapper = _setup("gpt2")
    specs = [{"target": "fc_in", "layer": 0, "rank": 3}]
    report = export_factored(model, tiny_tokenizer(), swapper, specs, tmp_path / "x")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "x" / FACTORS_FILE))
    a, b = tensors["0.A"], tensors["0.B"]
    assert a.shape == (128, 3) and b.shape == (3, 32)  # c_fc: logical 128 x 32, stored 32 x 128
    with swapper.applied_profile(specs):
        live = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    assert live.shape == (32, 128)
    torch.testing.assert_close((a @ b).t(), live, atol=1e-6, rtol=1e-6)
    assert report.rows[0].stored == "factored" and report.rows[0].shape == (128, 32)


def test_export_restores_previous_profile(tmp_path: Path) -> None:
    model, swapper = _setup("llama")
    swapper.apply(OTHER)
    snapshot = _snapshot(model)
    applied = dict(swapper.applied)
    export_dense(model, tiny_tokenizer(), swapper, PROFILE, tmp_path / "a")
    export_factored(model, tiny_tokenizer(), swapper, PROFILE, tmp_path / "b")
    _assert_same(model, snapshot)
    assert swapper.applied == applied
    swapper.revert()
    # The exports hold PROFILE on the base, not PROFILE on top of OTHER.
    expected = _live_logits(model, swapper, PROFILE)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(_import_loader(tmp_path / "b").load(tmp_path / "b")), expected,
                               atol=1e-5, rtol=1e-5)


def test_tied_embeddings_kept(tmp_path: Path) -> None:
    model, swapper = _setup("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    export_factored(model, tiny_tokenizer(), swapper, PROFILE, tmp_path / "f")
    loaded = _import_loader(tmp_path / "f").load(tmp_path / "f")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)


def test_refuses_non_empty_dir_and_bad_profiles(tmp_path: Path) -> None:
    model, swapper = _setup("gpt2")
    snapshot = _snapshot(model)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for export in (export_dense, export_factored):
        with pytest.raises(FileExistsError, match="not empty"):
            export(model, tiny_tokenizer(), swapper, PROFILE, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(InterventionError):
        export_dense(model, tiny_tokenizer(), swapper, [{"target": "fc_in", "layer": 99, "rank": 1}],
                     tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    _assert_same(model, snapshot)

    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    export_dense(model, tiny_tokenizer(), swapper, PROFILE, tmp_path / "empty")
    report = export_factored(model, tiny_tokenizer(), swapper, PROFILE, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / LOADER_FILE).exists()
    assert report.path == str(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_report_is_json_and_large_ranks_stay_dense(tmp_path: Path) -> None:
    model, swapper = _setup("opt")
    specs = [{"target": "fc_in", "layer": 0, "rank_fraction": 0.9},  # factors bigger than dense
             {"kind": "laser_mp", "target": "fc_out", "layer": 2}]
    report = export_factored(model, tiny_tokenizer(), swapper, specs, tmp_path / "r")
    data = json.loads(report.to_json())
    assert data["mode"] == "factored" and isinstance(data["rows"][0]["shape"], list)
    assert ExportReport(**{**data, "rows": []}).mode == "factored"
    rows = {r.type: r for r in report.rows}
    assert rows["fc_in"].stored == "dense" and "not smaller" in rows["fc_in"].note
    assert rows["fc_in"].k == 28  # floor(0.9 * 32)
    assert rows["fc_out"].kind == "laser_mp" and rows["fc_out"].k is not None
    expected = _live_logits(model, swapper, specs)
    loaded = _import_loader(tmp_path / "r").load(tmp_path / "r")
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=1e-5)


def test_loader_is_self_contained(tmp_path: Path) -> None:
    model, swapper = _setup("llama")
    export_factored(model, tiny_tokenizer(), swapper, PROFILE, tmp_path / "s")
    tree = ast.parse((tmp_path / "s" / LOADER_FILE).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    third_party = roots - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"torch", "transformers", "safetensors"}


@pytest.mark.parametrize("export", [export_dense, export_factored])
def test_failure_mid_export_restores_model_and_leaves_no_folder(export, tmp_path: Path) -> None:
    """A failure while the profile is applied (here: a tokenizer that cannot be saved) restores the model."""
    model, swapper = _setup("gpt2")
    swapper.apply(OTHER)
    snapshot = _snapshot(model)
    with pytest.raises(AttributeError):
        export(model, object(), swapper, PROFILE, tmp_path / "out")
    _assert_same(model, snapshot)
    assert swapper.current == parse_profile(OTHER)
    assert list(tmp_path.iterdir()) == []
