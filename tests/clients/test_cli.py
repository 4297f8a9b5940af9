"""The ``laser`` CLI through typer's runner against a live server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clients.cli import app
from tests.server.conftest import LiveServer, start_server, tiny_loaded

ROWS = [{"input": f"{w} is a", "choices": ["city", "dog", "colour"], "answer": i % 3}
        for i, w in enumerate(["Paris", "Rome", "Rex", "Fido", "Blue", "Red", "Oslo", "Spot", "Green", "Lyon"])]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    s = start_server(tmp_path_factory.mktemp("cli"), tiny_loaded())
    yield s
    s.stop()


@pytest.fixture
def laser(srv: LiveServer, monkeypatch: pytest.MonkeyPatch):
    for var in ("LASER_API_KEY", "LASER_ADMIN_API_KEY", "LASER_URL"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()

    def run(*args: str, code: int = 0):
        result = runner.invoke(app, ["--url", srv.url, *args], env={"COLUMNS": "200"})
        assert result.exit_code == code, (args, result.output, result.exception)
        return result

    return run


def test_help_texts_have_examples(laser) -> None:
    assert "Examples" in laser("--help").output
    for cmd in (["info"], ["profiles", "create"], ["generate"], ["score"], ["ab"], ["sweep"], ["promote"],
                ["export"], ["profiles", "ls"]):
        out = laser(*cmd, "--help").output
        assert "Example" in out, cmd
    assert "laser-serve" in laser("serve", "--help").output


def test_info_and_models(laser) -> None:
    assert json.loads(laser("info", "--json").stdout)["model_id"] == "tiny-llama"
    assert "fc_in" in laser("info").output
    assert json.loads(laser("models", "--json").stdout)[0]["id"] == "base"


def test_profiles_generate_score_ab(laser) -> None:
    out = laser("profiles", "create", "late", "-e", "laser:fc_in:-1:0.25", "-d", "late fc").output
    assert "created late" in out
    laser("profiles", "create", "late", "-e", "laser:fc_in:-1:0.25", code=1)  # 409, message on stderr
    spec = json.dumps([{"kind": "laser", "target": "fc_out", "layer": 0, "rank": 2}])
    assert "fc_out" in laser("profiles", "create", "dry", "--spec", spec, "--dry-run").output
    names = [p["name"] for p in json.loads(laser("profiles", "ls", "--json").stdout)]
    assert names[:1] == ["base"] and "late" in names and "dry" not in names
    assert "late fc" in laser("profiles", "show", "late").output
    assert json.loads(laser("profiles", "show", "late", "--json").stdout)["matrices"] == 1
    laser("profiles", "show", "nope", code=1)

    g = json.loads(laser("generate", "Paris is", "-p", "late", "-n", "5", "--json").stdout)
    assert g["profile"] == "late"
    assert laser("generate", "Paris is", "-p", "late", "-n", "5").output.rstrip("\n") == g["choices"][0]["text"]
    assert laser("generate", "Paris is", "-p", "late", "-n", "5", "--stream").output.startswith(g["choices"][0]["text"])

    s = json.loads(laser("score", "-c", "Paris is", "-k", " a", "-k", " b", "--json").stdout)
    assert len(s["continuations"]) == 2
    assert "' a'" in laser("score", "-c", "Paris is", "-k", " a", "-k", " b").output
    assert "perplexity" in laser("score", "--text", "the quick fox").output

    ab = json.loads(laser("ab", "--profiles", "base,late", "Paris is", "-n", "6", "--json").stdout)
    assert ab["profiles"] == ["base", "late"]
    table = laser("ab", "--profiles", "base,late", "Paris is", "-n", "6").output
    assert "base" in table and "late" in table and ("differs" in table or "no difference" in table)
    assert "argmax" in laser("ab", "--profiles", "base,late", "Paris is", "-k", " a", "-k", " b").output
    laser("ab", "--profiles", "base", "x", code=2)
    laser("ab", "--profiles", "base,missing", "x", code=1)
    assert "deleted" in laser("profiles", "rm", "late").output


def test_sweep_watch_promote(laser, tmp_path: Path) -> None:
    file = tmp_path / "toy.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert "uploaded toy" in laser("datasets", "upload", "toy", str(file)).output
    assert "toy" in laser("datasets", "ls").output
    out = laser("sweep", "--dataset", "toy", "--types", "fc_in", "--layers", "1", "--rhos", "0.5,0.1",
                "--grid", '{"validation_fraction": 0.5}', "--watch").output
    assert "validation" in out and "base" in out and "best:" in out  # progress bar, then the results table
    job_id = json.loads(laser("jobs", "ls", "--json").stdout)[0]["id"]
    job = json.loads(laser("jobs", "show", job_id, "--json").stdout)
    assert job["state"] == "succeeded" and job["config"]["rhos"] == [0.5, 0.1]
    key = next(r["key"] for r in job["rows"] if r["role"] == "config")
    out = laser("jobs", "examples", job_id, "--config", key, "--filter", "all", "--limit", "3").output
    assert f"{key} vs base on validation: fixed" in out and "all: 1-3 of 5; next: --offset 3" in out
    page = json.loads(laser("jobs", "examples", job_id, "-c", key, "-f", "all", "--offset", "3", "--json").stdout)
    assert [e["index"] for e in page["data"]] == [3, 4] and page["total"] == 5
    assert {"fixed", "broken"} <= set(page["counts"])
    laser("jobs", "examples", job_id, "--config", "nope", code=1)
    assert "--ray" in laser("sweep", "--help").output
    if job["best"] and job["best"]["interventions"]:
        assert "promoted cli-win" in laser("promote", job_id, "cli-win").output
        laser("promote", job_id, "cli-win", code=1)
        assert json.loads(laser("promote", job_id, "cli-win", "--replace", "--json").stdout)["name"] == "cli-win"
    laser("jobs", "cancel", job_id, code=1)  # already finished
    assert f"job {job_id}: deleted" in laser("jobs", "rm", job_id).output
    laser("jobs", "show", job_id, code=1)
    queued = json.loads(laser("sweep", "-D", "toy", "--types", "fc_in", "--layers", "1", "--rhos", "0.5",
                              "--json").stdout)
    assert queued["state"] in ("queued", "running", "succeeded")
    laser("sweep", "-D", "missing", code=1)


def test_export_downloads_a_loadable_folder(laser, tmp_path: Path) -> None:
    laser("profiles", "create", "ex", "-e", "laser:fc_in:-1:0.25")
    dest = tmp_path / "hf"
    out = laser("export", "ex", str(dest)).output
    assert "model.safetensors" in out and (dest / "config.json").exists()
    laser("export", "ex", str(dest), code=1)  # the server's export exists: 409
    report = json.loads(laser("export", "ex", str(tmp_path / "fac"), "--mode", "factored", "--json").stdout)
    assert report["saved_bytes"] > 0 and (tmp_path / "fac" / "laser_loader.py").exists()
    assert "saved" in laser("export", "ex", str(tmp_path / "fac2"), "--mode", "factored", "--name", "ex-f2").output
    assert "ex-f2" in laser("exports").output
    laser("export", "nope", str(tmp_path / "x"), code=1)


def test_admin_key_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = start_server(tmp_path, tiny_loaded(), admin_api_key="adm", api_key="inf")
    try:
        runner = CliRunner()
        r = runner.invoke(app, ["--url", s.url, "profiles", "ls"], env={"LASER_API_KEY": "", "LASER_ADMIN_API_KEY": ""})
        assert r.exit_code == 1 and "401" in r.output
        r = runner.invoke(app, ["--url", s.url, "profiles", "create", "k", "-e", "laser:fc_in:0:0.5"],
                          env={"LASER_API_KEY": "inf", "LASER_ADMIN_API_KEY": ""})
        assert r.exit_code == 1 and "403" in r.output
        r = runner.invoke(app, ["--url", s.url, "profiles", "create", "k", "-e", "laser:fc_in:0:0.5"],
                          env={"LASER_ADMIN_API_KEY": "adm"})
        assert r.exit_code == 0, r.output
    finally:
        s.stop()
