"""Server fixtures: a real uvicorn server on a loopback port, serving a tiny model (or SmolLM2), in this
process (:class:`LiveServer`) or in its own (:class:`ServerProcess`, for kill -9 and replica drills)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI

from laser_ops.loading import LoadedModel, load_model, model_fingerprint
from laser_ops.testing import make_tiny_model, tiny_tokenizer
from server.config import Settings
from server.main import create_app

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 60.0, what: str = "condition",
               interval: float = 0.005) -> T:
    """Poll ``condition`` until it is true, failing after ``timeout`` s (orders events without sleeping blind).

    Returns the condition's (truthy) value, so a poll can hand back what it found.
    """
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return value


async def until(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> None:
    """Async :func:`wait_until`: yields to the event loop between polls."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


class ForwardGate:
    """A forward pre-hook that holds the owner thread inside the model until :meth:`open` is called.

    ``entered`` is set once a forward pass is waiting at the gate, so a test knows the owner is busy
    (and the queue holds exactly what it submitted next) without guessing with sleeps. The first
    ``free_passes`` forward passes go through unhindered; :meth:`close` arms it again. It hooks the
    transformer body (``model.base_model``), which every engine forward runs.
    """

    def __init__(self, model: torch.nn.Module, free_passes: int = 0) -> None:
        self.entered = threading.Event()
        self._open = threading.Event()
        self._passes = free_passes
        self.passes = 0  # forward passes that went through
        body = getattr(model, "base_model", None) or model
        self._handle = body.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: object) -> None:
        if self._passes > 0:
            self._passes -= 1
        else:
            self.entered.set()
            if not self._open.wait(60):
                raise TimeoutError("the test never opened the gate")
        self.passes += 1

    def open(self) -> None:
        self._open.set()

    def close(self, free_passes: int = 0) -> None:
        """Hold forward passes again after ``free_passes`` more."""
        self._passes = free_passes
        self.entered.clear()
        self._open.clear()

    def remove(self) -> None:
        self._open.set()
        self._handle.remove()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    """A uvicorn server in a background thread; ``client`` talks real HTTP to it."""

    app: FastAPI
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    client: httpx.Client

    @classmethod
    def start(cls, app: FastAPI) -> LiveServer:
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.time() + 60
        while not server.started:
            if not thread.is_alive() or time.time() > deadline:
                raise RuntimeError("test server failed to start")
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        return cls(app, url, server, thread, httpx.Client(base_url=url, timeout=60))

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    """``python -m server`` (or ``module``) in its own process, its output in ``log``."""

    proc: subprocess.Popen
    url: str
    log: Path

    @classmethod
    def spawn(cls, model_dir: Path, data_dir: Path, *flags: str, log: Path, module: str = "server",
              env: dict[str, str] | None = None) -> ServerProcess:
        port = free_port()
        cmd = [sys.executable, "-m", module, "--model", str(model_dir), "--data-dir", str(data_dir),
               "--port", str(port), "--device", "cpu", *flags]
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                    stdout=out, stderr=subprocess.STDOUT)
        return cls(proc, f"http://127.0.0.1:{port}", log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300) -> ServerProcess:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.log_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server did not become ready: {self.log_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs (the crash a lease must survive)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)

    def terminate(self) -> None:
        """SIGTERM: a graceful shutdown."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()


def tiny_loaded(arch: str = "llama", seed: int = 0) -> LoadedModel:
    model = make_tiny_model(arch, seed)
    return LoadedModel(model, tiny_tokenizer(), f"tiny-{arch}", f"tiny:{arch}", model_fingerprint(model))


def start_server(tmp_path: Path, loaded: LoadedModel, **settings: object) -> LiveServer:
    app = create_app(Settings(data_dir=tmp_path / "data", **settings), loaded=loaded)
    return LiveServer.start(app)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    """A fresh server on a tiny Llama with its own data dir."""
    srv = start_server(tmp_path, tiny_loaded())
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real default model, loaded once per test session (GGUF converted once and cached)."""
    return load_model("smollm2-135m")
