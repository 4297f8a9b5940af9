"""Export routes over real HTTP: the downloaded folder loads with plain transformers (no laser-serve) and gives
the live profile's logits; factored exports save bytes; names never become paths; errors map to 404/409/422."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from laser_ops.interventions import parse_profile
from tests.server.conftest import LiveServer, start_server, tiny_loaded, until

PROFILE = [{"kind": "laser", "target": "fc_in", "layer": -1, "rank_fraction": 0.25},
           {"kind": "laser", "target": "q_proj", "layer": 0, "rank": 2}]
TEXT = "The capital of France is Paris. A quick brown fox"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    s = start_server(tmp_path_factory.mktemp("exports"), tiny_loaded())
    r = s.client.post("/v1/profiles", json={"name": "edited", "interventions": PROFILE})
    assert r.status_code == 201, r.text
    yield s
    s.stop()


def _ids(srv: LiveServer) -> torch.Tensor:
    return srv.app.state.services.engine.info.tokenizer(TEXT, return_tensors="pt").input_ids


def live_logits(srv: LiveServer, profile: str) -> torch.Tensor:
    """Logits of the model as the engine serves ``profile`` (on the engine's owner thread)."""
    services = srv.app.state.services
    specs = [] if profile == "base" else services.profiles.get(profile).interventions
    ids = _ids(srv)

    def run(swapper, _scorer) -> torch.Tensor:
        with swapper.applied_profile(parse_profile(specs)), torch.no_grad():
            return swapper.model(ids).logits.clone()

    # The engine answers on the loop that submitted (a fresh one here), so the test thread may use it.
    return asyncio.run(services.engine.run_task(run))


def download(srv: LiveServer, export: dict, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in export["files"]:
        r = srv.client.get(f["url"])
        assert r.status_code == 200, r.text
        assert len(r.content) == f["bytes"]
        (dest / f["name"]).write_bytes(r.content)
    return dest


def export(srv: LiveServer, profile: str, **body) -> dict:
    r = srv.client.post(f"/v1/profiles/{profile}/export", json=body, timeout=120)
    assert r.status_code == 201, r.text
    return r.json()


def _import_loader(folder: Path):
    spec = importlib.util.spec_from_file_location(f"laser_loader_{abs(hash(str(folder)))}", folder / "laser_loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dense_export_round_trip(srv: LiveServer, tmp_path: Path) -> None:
    e = export(srv, "edited")
    assert e["name"] == "edited-dense" and e["mode"] == "dense" and e["profile"] == "edited"
    names = {f["name"] for f in e["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json", "laser_profile.json"} <= names
    assert all(f["sha256"] and f["url"].startswith("/v1/exports/edited-dense/files/") for f in e["files"])
    data_dir = str(srv.app.state.settings.data_dir.resolve())
    assert "path" not in e and data_dir not in json.dumps(e)  # the server's filesystem stays private
    folder = download(srv, e, tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        got = model(_ids(srv)).logits
    expected = live_logits(srv, "edited")
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert not torch.allclose(got, live_logits(srv, "base"), atol=1e-4)  # the edit is really in there
    # The served log-probs agree with the exported model too.
    # (the rolling score conditions the first token on the scorer's prefix token, as lm-eval does)
    r = srv.client.post("/v1/score", json={"profile": "edited", "text": TEXT}).json()
    services = srv.app.state.services
    seq = torch.tensor([[services.engine.info.prefix_token_id, *services.engine.info.encode(TEXT)]])
    with torch.no_grad():
        logits = model(seq).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1).gather(1, seq[0, 1:, None]).sum().item()
    assert r["perplexity"]["logprob"] == pytest.approx(logp, abs=1e-3)


def test_factored_export_saves_bytes_and_matches(srv: LiveServer, tmp_path: Path) -> None:
    e = export(srv, "edited", mode="factored")
    assert e["name"] == "edited-factored" and e["mode"] == "factored"
    assert e["saved_bytes"] > 0 and e["saved_bytes"] == e["dense_bytes"] - e["factored_bytes"]
    assert any(mx["stored"] == "factored" and mx["k"] for mx in e["matrices"])
    folder = download(srv, e, tmp_path / "factored")
    model = _import_loader(folder).load(folder)
    with torch.no_grad():
        got = model(_ids(srv)).logits
    assert torch.allclose(got, live_logits(srv, "edited"), atol=1e-5, rtol=0)


def test_exports_load_without_laser_serve(srv: LiveServer, tmp_path: Path) -> None:
    """A fresh interpreter that cannot import laser_ops/server/clients loads both folders."""
    dense = download(srv, export(srv, "edited", name="plain-dense"), tmp_path / "d")
    factored = download(srv, export(srv, "edited", mode="factored", name="plain-fact"), tmp_path / "f")
    torch.save(_ids(srv), tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.util, os, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("laser_ops", "server", "clients"):
                    raise ImportError("laser-serve is not installed here: " + name)
        sys.meta_path.insert(0, Block())
        sys.path = [p for p in sys.path if os.path.abspath(p) != {str(Path.cwd())!r}]
        import torch
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        with torch.no_grad():
            a = AutoModelForCausalLM.from_pretrained({str(dense)!r}).eval()(ids).logits
            spec = importlib.util.spec_from_file_location("laser_loader", {str(factored / 'laser_loader.py')!r})
            m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
            b = m.load({str(factored)!r})(ids).logits
        torch.save({{"dense": a, "factored": b}}, {str(tmp_path / 'out.pt')!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    expected = live_logits(srv, "edited")
    assert torch.allclose(out["dense"], expected, atol=1e-5, rtol=0)
    assert torch.allclose(out["factored"], expected, atol=1e-5, rtol=0)


def test_errors_and_names_never_become_paths(srv: LiveServer) -> None:
    c = srv.client
    r = c.post("/v1/profiles/nope/export", json={})
    assert r.status_code == 404 and "nope" in r.text
    export(srv, "base", name="base-x")
    r = c.post("/v1/profiles/base/export", json={"name": "base-x"})
    assert r.status_code == 409 and "overwrite" in r.text and r.json()["detail"][0]["loc"] == ["body", "name"]
    assert c.post("/v1/profiles/base/export", json={"name": "base-x", "overwrite": True}).status_code == 201
    for bad in ("../x", ".hidden", "a/b", "x" * 81, ""):
        assert c.post("/v1/profiles/base/export", json={"name": bad}).status_code == 422, bad
    assert c.post("/v1/profiles/base/export", json={"path": "/tmp/x"}).status_code == 422  # no such field
    # A stored profile that no longer fits the model: 422 naming it, nothing written.
    services = srv.app.state.services
    services.profiles.put("stale", parse_profile([{"kind": "laser", "target": "fc_in", "layer": 99,
                                                   "rank_fraction": 0.5}]))
    r = c.post("/v1/profiles/stale/export", json={})
    assert r.status_code == 422 and "stale" in r.text
    assert c.get("/v1/exports/stale-dense").status_code == 404
    # Downloads: only the export's own listed files.
    assert c.get("/v1/exports/base-x/files/config.json").status_code == 200
    for bad in ("../../laser.sqlite3", "..%2F..%2Flaser.sqlite3", "%2e%2e/%2e%2e/laser.sqlite3", "/etc/passwd",
                "nope.json", ".reports/base-x.json"):
        r = c.get(f"/v1/exports/base-x/files/{bad}")
        assert r.status_code == 404, (bad, r.status_code)
    assert c.get("/v1/exports/..%2F..%2Fsvd").status_code in (404, 422)
    assert c.get("/v1/exports/.reports").status_code == 422


def test_list_get_delete(srv: LiveServer) -> None:
    c = srv.client
    export(srv, "base", name="to-delete")
    listed = {e["name"]: e for e in c.get("/v1/exports").json()["data"]}
    assert listed["to-delete"]["mode"] == "dense" and listed["to-delete"]["bytes"] > 0
    assert not any(n.startswith(".") for n in listed)
    one = c.get("/v1/exports/to-delete").json()
    assert one["bytes"] == sum(f["bytes"] for f in one["files"])
    assert c.delete("/v1/exports/to-delete").json() == {"name": "to-delete", "deleted": True}
    assert c.get("/v1/exports/to-delete").status_code == 404
    assert c.delete("/v1/exports/to-delete").status_code == 404


def test_admin_key_guards_exports(tmp_path: Path) -> None:
    s = start_server(tmp_path, tiny_loaded(), admin_api_key="adm", api_key="inf")
    try:
        c = s.client
        assert c.post("/v1/profiles/base/export", json={}).status_code == 401
        assert c.get("/v1/exports", headers={"Authorization": "Bearer inf"}).status_code == 403
        r = c.post("/v1/profiles/base/export", json={}, headers={"Authorization": "Bearer adm"})
        assert r.status_code == 201
        f = r.json()["files"][0]["url"]
        assert c.get(f, headers={"Authorization": "Bearer inf"}).status_code == 403
        assert c.get(f, headers={"Authorization": "Bearer adm"}).status_code == 200
    finally:
        s.stop()


def test_export_files_are_written_off_the_engine_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While an export's files are being written, the engine serves requests, and sweep-like background tasks
    (which swap weights) wait until the write is done: the writer reads the live base weights."""
    import threading

    from server.serving import exports as exports_serving

    writing, release = threading.Event(), threading.Event()
    real_write = exports_serving.write_export

    def gated_write(*args, **kwargs):
        writing.set()
        if not release.wait(60):
            raise TimeoutError("never released")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(exports_serving, "write_export", gated_write)
    srv = start_server(tmp_path, tiny_loaded())
    engine = srv.app.state.services.engine
    try:
        c = srv.client
        assert c.post("/v1/profiles", json={"name": "p", "interventions": PROFILE}).status_code == 201
        order: list[str] = []

        async def run() -> tuple[int, int]:
            import httpx

            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:
                export = asyncio.create_task(ac.post("/v1/profiles/p/export", json={"name": "e"}))
                await asyncio.to_thread(writing.wait, 60)  # the snapshot is taken; files are being written
                r = await ac.post("/v1/generate", json={"profile": "p", "prompt": "Paris is", "max_new_tokens": 3})
                order.append("generate")
                seen = engine.submitted
                background = asyncio.create_task(
                    engine.run_task(lambda s, sc: order.append("background"), background=True))
                await until(lambda: engine.submitted > seen, what="the background task to reach the engine")
                order.append("release")
                release.set()
                await background
                return r.status_code, (await export).status_code

        gen_status, export_status = asyncio.run(run())
        assert gen_status == 200 and export_status == 201
        assert order == ["generate", "release", "background"]
    finally:
        release.set()
        srv.stop()
