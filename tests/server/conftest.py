"""Server fixtures: a real uvicorn server on a loopback port, serving a tiny model (or SmolLM2)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI

from laser_ops.loading import LoadedModel, load_model, model_fingerprint
from laser_ops.testing import make_tiny_model, tiny_tokenizer
from server.config import Settings
from server.main import create_app


def wait_until(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``condition`` until it is true, failing after ``timeout`` s (orders events without sleeping blind)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


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
    ``free_passes`` forward passes go through unhindered.
    """

    def __init__(self, model: torch.nn.Module, free_passes: int = 0) -> None:
        self.entered = threading.Event()
        self._open = threading.Event()
        self._passes = free_passes
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: object) -> None:
        if self._passes > 0:
            self._passes -= 1
            return
        self.entered.set()
        if not self._open.wait(60):
            raise TimeoutError("the test never opened the gate")

    def open(self) -> None:
        self._open.set()

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
