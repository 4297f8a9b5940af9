"""SVDs are computed off the engine's owner thread: inference is served while a decomposition is in progress.

Event-ordered, not timed: the decomposition worker is held mid-job by an Event; a generate sent meanwhile must
complete before the Event is released, which is only possible if the owner thread is free.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import laser_ops.svd as svd_module
from laser_ops.swap import DecompositionJob
from tests.server.conftest import LiveServer, start_server, tiny_loaded

ALL_LAYERS = [{"target": "mlp", "layer": "all", "rank_fraction": 0.25}]


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[LiveServer]:
    s = start_server(tmp_path, tiny_loaded(), svd_disk_cache_bytes=0)
    yield s
    s.stop()


class HeldWorker:
    """Replaces the decomposer's job runner: records the threads that decompose and holds the first job."""

    def __init__(self, srv: LiveServer) -> None:
        self.decomposer = srv.app.state.services.decomposer
        self.original = self.decomposer.run_job
        self.started, self.release = threading.Event(), threading.Event()
        self.threads: set[str] = set()
        self.decomposer.run_job = self.run

    def run(self, job: DecompositionJob) -> None:
        self.threads.add(threading.current_thread().name)
        self.started.set()
        assert self.release.wait(120), "the test never released the decomposition"
        self.original(job)


def test_generate_is_served_while_a_decomposition_is_in_progress(srv: LiveServer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    decomposing_threads: list[str] = []
    real = svd_module.decompose
    monkeypatch.setattr(svd_module, "decompose",
                        lambda *a, **k: decomposing_threads.append(threading.current_thread().name) or real(*a, **k))
    worker = HeldWorker(srv)
    dry_run: dict[str, httpx.Response] = {}

    def send_dry_run() -> None:
        with httpx.Client(base_url=srv.url, timeout=180) as c:
            dry_run["r"] = c.post("/v1/profiles?dry_run=true", json={"name": "all", "interventions": ALL_LAYERS})

    sender = threading.Thread(target=send_dry_run)
    sender.start()
    try:
        assert worker.started.wait(120)  # a decomposition is now in progress (and held)
        r = srv.client.post("/v1/generate", json={"prompt": "The capital of France is", "max_new_tokens": 2})
        assert r.status_code == 200  # served by the owner thread meanwhile
        assert not worker.release.is_set() and "r" not in dry_run  # ... while the dry run still waits
    finally:
        worker.release.set()
        sender.join(180)
    assert dry_run["r"].status_code == 200, dry_run["r"].text
    assert len(dry_run["r"].json()["matrices"]) == 9  # 3 layers x (fc_in, fc_up, fc_out)
    assert worker.threads == {"laser-svd_0"}
    assert decomposing_threads and set(decomposing_threads) == {"laser-svd_0"}  # never on the owner thread


def test_new_profile_is_prepared_off_the_owner_thread_before_its_first_request(srv: LiveServer) -> None:
    worker = HeldWorker(srv)
    assert srv.client.post("/v1/profiles", json={"name": "p", "interventions": ALL_LAYERS}).status_code == 201
    assert worker.started.wait(120)  # preparing p's decompositions in the background
    first: dict[str, httpx.Response] = {}
    waiting = threading.Event()
    ready = worker.decomposer.ready

    async def observed_ready(name: str) -> None:
        if name == "p":
            waiting.set()
        await ready(name)

    worker.decomposer.ready = observed_ready

    def send() -> None:
        with httpx.Client(base_url=srv.url, timeout=180) as c:
            first["r"] = c.post("/v1/generate", json={"profile": "p", "prompt": "a", "max_new_tokens": 2})

    sender = threading.Thread(target=send)
    sender.start()
    try:  # p's first request waits for its preparation; other profiles are served meanwhile
        assert waiting.wait(120)
        assert srv.client.post("/v1/generate", json={"prompt": "b", "max_new_tokens": 2}).status_code == 200
        assert "r" not in first
    finally:
        worker.release.set()
        sender.join(180)
    assert first["r"].status_code == 200
    cache = srv.app.state.services.engine.swapper.svd_cache
    computed = cache.computed
    assert srv.client.post("/v1/generate", json={"profile": "p", "prompt": "c", "max_new_tokens": 2}).status_code == 200
    assert cache.computed == computed  # nothing left to decompose
