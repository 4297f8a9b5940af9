"""GET /v1/spectrum/{type}/{layer}: singular values of a base matrix with the data-free diagnostics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from laser_ops.spectral import spectrum_report
from laser_ops.testing import make_tiny_model
from tests.server.conftest import LiveServer, start_server, tiny_loaded


def _base_matrix(layer: int) -> torch.Tensor:
    return make_tiny_model("llama", 0).model.layers[layer].mlp.gate_proj.weight.detach().float()


def test_spectrum_is_the_base_matrix_svd_even_while_an_edited_profile_is_live(live: LiveServer) -> None:
    c = live.client
    c.post("/v1/profiles", json={"name": "cut", "interventions": [{"target": "fc_in", "layer": -1, "rank": 1}]})
    assert c.post("/v1/generate", json={"profile": "cut", "prompt": "Paris", "max_new_tokens": 1}).status_code == 200
    r = c.get("/v1/spectrum/fc_in/-1", params={"k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    W = _base_matrix(2)
    S = torch.linalg.svdvals(W.double())
    assert body["type"] == "fc_in" and body["layer"] == 2 and body["shape"] == [64, 32]
    assert body["param_name"] == "model.layers.2.mlp.gate_proj.weight"
    assert body["singular_values"] == pytest.approx(S.tolist(), rel=1e-4)
    expected = spectrum_report(S, (64, 32), k=3)
    assert body["mp_threshold"] == pytest.approx(expected.mp_threshold, rel=1e-4)
    assert body["mp_rank"] == expected.mp_rank
    assert body["k"] == 3
    assert body["retained_energy"] == pytest.approx(float((S[:3] ** 2).sum() / (S**2).sum()), rel=1e-4)
    assert body["frobenius_error"] == pytest.approx(float((S[3:] ** 2).sum().sqrt()), rel=1e-4)
    assert c.get("/v1/spectrum/fc_in/2").json()["k"] is None


@pytest.mark.parametrize(("path", "params", "loc", "words"), [
    ("/v1/spectrum/fc_in/3", {}, ["path", "layer"], "allowed -3..2"),
    ("/v1/spectrum/nope/0", {}, ["path", "type"], "out_proj"),
    ("/v1/spectrum/fc_in/0", {"k": 0}, ["query", "k"], "allowed 1..32"),
    ("/v1/spectrum/fc_in/0", {"k": 33}, ["query", "k"], "allowed 1..32"),
])
def test_bad_spectrum_requests_name_the_field(live: LiveServer, path: str, params: dict, loc: list, words: str) -> None:
    r = live.client.get(path, params=params)
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"] == loc and words in error["msg"]


def test_spectrum_needs_the_inference_key(tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_loaded(), api_key="k")
    try:
        assert srv.client.get("/v1/spectrum/fc_in/0").status_code == 401
        ok = srv.client.get("/v1/spectrum/fc_in/0", headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200 and len(ok.json()["singular_values"]) == 32
    finally:
        srv.stop()
