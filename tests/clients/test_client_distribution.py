"""``pip install ./clients`` alone: a fresh virtual environment gets the client and the ``laser`` CLI without torch,
and the CLI drives a live server (a tiny Llama started by the test).

The venv is built with the interpreter's own ``venv`` and pip (which may use the package registry and its cache
for httpx, pydantic, typer, rich, httpx-sse, tenacity and the hatchling build backend); bounded to a few minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import LiveServer, start_server, tiny_loaded

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(COLUMNS="200", PYTHONNOUSERSITE="1")
    for var in ("LASER_URL", "LASER_API_KEY", "LASER_ADMIN_API_KEY"):
        env.pop(var, None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding only the client distribution (and its dependencies)."""
    where = tmp_path_factory.mktemp("client-venv")
    venv = where / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], where)
    assert made.returncode == 0, made.stderr
    installed = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                      str(ROOT / "clients")], where, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    s = start_server(tmp_path_factory.mktemp("client-dist"), tiny_loaded())
    yield s
    s.stop()


def test_client_installs_without_torch(client_venv: Path, tmp_path: Path) -> None:
    py = str(client_venv / "bin" / "python")
    for heavy in ("torch", "transformers", "numpy", "fastapi", "server", "laser_ops"):
        probe = _run([py, "-c", f"import {heavy}"], tmp_path)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, (heavy, probe.stderr)
    check = _run([py, "-c", "import sys, clients, clients.cli, laser_protocol.jobs; "
                            "from clients import LaserClient, AsyncLaserClient; "
                            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'server')))"],
                 tmp_path)
    assert check.returncode == 0 and check.stdout.strip() == "[]", check.stderr


def test_every_client_module_is_in_the_wheel(client_venv: Path, tmp_path: Path) -> None:
    where = _run([str(client_venv / "bin" / "python"), "-c", "import clients, laser_protocol; "
                  "print(clients.__file__); print(laser_protocol.__file__)"], tmp_path)
    package, protocol = (Path(line).parent for line in where.stdout.split())
    for source_dir, installed in ((ROOT / "clients", package), (ROOT / "laser_protocol", protocol)):
        mine = {p.relative_to(source_dir) for p in source_dir.rglob("*.py") if "__pycache__" not in p.parts}
        shipped = {p.relative_to(installed) for p in installed.rglob("*.py") if "__pycache__" not in p.parts}
        assert mine == shipped, f"{source_dir.name}: missing {mine - shipped}, extra {shipped - mine}"


def test_cli_against_a_live_server(client_venv: Path, srv: LiveServer, tmp_path: Path) -> None:
    laser = str(client_venv / "bin" / "laser")

    def run(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        result = _run([laser, "--url", srv.url, *args], tmp_path, timeout=120)
        assert result.returncode == code, (args, result.stdout, result.stderr)
        return result

    assert json.loads(run("info", "--json").stdout)["model_id"] == "tiny-llama"
    assert "created dist" in run("profiles", "create", "dist", "-e", "laser:fc_in:-1:0.25").stdout
    answer = json.loads(run("generate", "Paris is", "-p", "dist", "-n", "4", "--json").stdout)
    assert answer["profile"] == "dist" and answer["usage"]["completion_tokens"] <= 4
    assert run("generate", "Paris is", "-p", "dist", "-n", "4").stdout.rstrip("\n") == answer["choices"][0]["text"]
    refused = run("profiles", "create", "dist", "-e", "laser:fc_in:-1:0.25", code=1)
    assert "409" in refused.stderr and "already exists" in refused.stderr
    serve = run("serve", code=1)
    assert "pip install laser-serve" in serve.stderr and "client only" in serve.stderr
