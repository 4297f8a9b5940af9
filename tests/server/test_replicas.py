"""Failure drills with two real servers (separate processes) on one store, for each backend: SQLite (a shared
data dir) and PostgreSQL (``database_url``; each server with its own data dir).

- profiles written on one are served by the other, and never go back;
- a sweep runs exactly once: its owner keeps the lease while the other polls the queue, and every step is
  stored once across both logs; the other follows it over SSE;
- a cancel sent to either server stops it;
- kill -9 of the owner: the other takes the job over once the lease lapsed and finishes it, recomputing
  nothing that was stored;
- a model change: a third server with other weights fails the resumed job instead of mixing results.

The two servers are separate processes (``kill -9`` must be real); the third runs in the test process. Each
process runs ``tests.server.held_server``: its worker pauses after the 2nd stored step of a job until the
test releases it, so the drills act on a job known to be mid-flight. Nothing waits on a timer: every wait
polls a condition with a deadline. The two servers are shared by the drills of one backend (module scope,
in file order) to keep the suite lean.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from laser_ops.testing import save_tiny_model
from tests.server.conftest import ServerProcess, start_server, tiny_loaded, wait_until
from tests.server.held_server import gate_file
from tests.server.test_jobs import SMALL, sse_events, toy_rows, upload

LEASE_S = 3.0
REFRESH_S = 0.2
HOLD_AFTER = 2
HELD_ROWS = 3  # rows stored by then: base, then both rho of fc_in@1 (one step scores all rho of a matrix)
TERMINAL = ("succeeded", "failed", "cancelled")
DEADLINE_S = 120.0


def wait_for(what: str, check: Callable[[], Any], timeout: float = DEADLINE_S) -> Any:
    """Poll ``check`` (an HTTP round trip or a log read) until it returns something truthy; its value."""
    return wait_until(check, timeout=timeout, what=what, interval=0.05)


@dataclass
class Replica:
    name: str
    server: ServerProcess
    client: httpx.Client

    @property
    def pid(self) -> int:
        return self.server.pid

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def stored(self, job_id: str) -> list[str]:
        """Step keys this server stored for the job, from its log."""
        return re.findall(rf"job {re.escape(job_id)}: step (\S+) stored", self.server.log_text())


@dataclass
class Cluster:
    """Servers sharing one store (a data dir for SQLite, a database for PostgreSQL)."""

    root: Path
    backend: str
    database_url: str | None
    model_dir: Path
    gates: Path
    replicas: list[Replica] = field(default_factory=list)

    def start(self, *names: str) -> list[Replica]:
        started = []
        for name in names:
            data_dir = self.root / ("data" if self.database_url is None else f"data-{name}")
            flags = ["--log-level", "info", "--job-lease-s", str(LEASE_S), "--profile-refresh-s", str(REFRESH_S)]
            if self.database_url is not None:
                flags += ["--database-url", self.database_url]
            env = {"LASER_TEST_HOLD_AFTER": str(HOLD_AFTER), "LASER_TEST_GATE_DIR": str(self.gates)}
            server = ServerProcess.spawn(self.model_dir, data_dir, *flags, log=self.root / f"{name}.log",
                                         module="tests.server.held_server", env=env)
            started.append(Replica(name, server, httpx.Client(base_url=server.url, timeout=60)))
        for r in started:  # both start at once; wait for each
            r.server.wait_ready()
        self.replicas += started
        return started

    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.server.proc.poll() is None]

    def owner_of(self, job: dict[str, Any]) -> Replica:
        pid = int(job["owner"].split(":")[1])
        (owner,) = [r for r in self.replicas if r.pid == pid]
        return owner

    def other_than(self, replica: Replica) -> Replica:
        (other,) = [r for r in self.alive() if r is not replica]
        return other

    def release(self, replica: Replica, job_id: str) -> None:
        gate_file(self.gates, replica.pid, job_id).touch()

    def held(self, via: Replica, job_id: str) -> tuple[dict[str, Any], Replica]:
        """Wait until the job is held by its owner after its 2nd step; (job, owner)."""
        job = wait_for(f"job {job_id} to store {HOLD_AFTER} steps",
                       lambda: (j := via.job(job_id))["done"] >= HELD_ROWS and j["owner"] and j)
        assert job["state"] == "running" and job["done"] == HELD_ROWS, job
        return job, self.owner_of(job)

    def stop(self) -> None:
        for r in self.replicas:
            r.client.close()
            r.server.kill()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp(f"replicas-{request.param}")
    url = request.getfixturevalue("postgres_cluster").create_database() if request.param == "postgresql" else None
    gates = root / "gates"
    gates.mkdir()
    c = Cluster(root, request.param, url, Path(save_tiny_model("llama", str(root / "model"))), gates)
    try:
        c.start("a", "b")
        upload(c.replicas[0].client, "toy", toy_rows())
        yield c
    finally:
        c.stop()


def _sweep(replica: Replica) -> str:
    r = replica.client.post("/v1/jobs/sweeps", json={"dataset": "toy", **SMALL})
    assert r.status_code == 202, r.text
    return r.json()["id"]


# ---------------------------------------------------------------------------------------------- profiles


def test_profiles_written_on_one_are_served_by_the_other_and_never_go_back(cluster: Cluster) -> None:
    a, b = cluster.replicas[:2]
    versions = 12
    seen: list[int] = []  # what b served, in order: version i, or versions + 1 once deleted
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            r = b.client.get("/v1/profiles/shared")
            if r.status_code == 200:
                seen.append(int(r.json()["description"].removeprefix("v")))
            elif r.status_code == 404 and seen:
                seen.append(versions + 1)
            else:
                assert r.status_code == 404, r.text

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(1, versions + 1):
            body = {"interventions": [{"target": "fc_in", "layer": i % 3, "rank_fraction": 0.5}],
                    "description": f"v{i}"}
            assert a.client.put("/v1/profiles/shared", json=body).status_code in (200, 201)
        wait_for("b to serve the last version", lambda: seen and seen[-1] == versions)
        g = b.client.post("/v1/generate", json={"profile": "shared", "prompt": "Paris is", "max_new_tokens": 2})
        assert g.status_code == 200 and g.json()["profile"] == "shared"
        assert a.client.delete("/v1/profiles/shared").status_code == 200
        wait_for("b to see the delete", lambda: seen[-1] == versions + 1)
    finally:
        done.set()
        watcher.join(60)
    assert seen == sorted(seen), f"b went back in time: {seen}"
    assert b.client.get("/v1/profiles/shared").status_code == 404


# ---------------------------------------------------------------------------------------------- sweeps


def test_a_sweep_runs_exactly_once_and_the_other_server_follows_it(cluster: Cluster) -> None:
    a, b = cluster.replicas[:2]
    job_id = _sweep(a)
    job, owner = cluster.held(b, job_id)
    other = cluster.other_than(owner)
    assert job["model_fingerprint"] == a.client.get("/info").json()["fingerprint"]

    events: list[tuple[str, dict[str, Any]]] = []

    def follow() -> None:  # SSE from the server that does not run the job: it follows the store
        with other.client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=DEADLINE_S) as s:
            events.extend(sse_events(s.iter_lines()))

    follower = threading.Thread(target=follow)
    follower.start()
    # Let a whole lease pass while the owner is held (the other server polls the queue all along): the
    # owner's heartbeats keep the job, so nothing is taken over.
    first_beat = job["heartbeat_at"]
    wait_for("the owner to renew its lease past a full lease period",
             lambda: other.job(job_id)["heartbeat_at"] >= first_beat + LEASE_S)
    assert other.job(job_id)["owner"] == job["owner"] and other.stored(job_id) == []
    cluster.release(owner, job_id)
    final = wait_for("the sweep to finish", lambda: (j := other.job(job_id))["state"] in TERMINAL and j)
    follower.join(DEADLINE_S)
    assert final["state"] == "succeeded" and final["done"] == final["total"] == 10, final
    keys = [r["key"] for r in final["rows"]]
    assert sorted(owner.stored(job_id)) == sorted(keys) and other.stored(job_id) == []  # each step once
    assert events[-1][0] == "state" and events[-1][1]["state"] == "succeeded"
    dones = [e["done"] for _, e in events]
    assert dones == sorted(dones) and len(set(dones)) > 1  # progress came through the store


@pytest.mark.parametrize("via", ["other", "owner"])
def test_a_cancel_sent_to_either_server_stops_the_job(cluster: Cluster, via: str) -> None:
    a = cluster.replicas[0]
    job_id = _sweep(a)
    _, owner = cluster.held(a, job_id)
    sender = owner if via == "owner" else cluster.other_than(owner)
    r = sender.client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    cluster.release(owner, job_id)
    wait_for("the owner to stop and settle the cancelled job",
             lambda: f"job {job_id}: cancelled after {HELD_ROWS} stored step(s)" in owner.server.log_text())
    for r in cluster.alive():
        job = r.job(job_id)
        assert job["state"] == "cancelled" and job["done"] == HELD_ROWS and job["stopped"] == "cancelled"
        assert len(job["rows"]) == HELD_ROWS
    assert len(owner.stored(job_id)) == HELD_ROWS  # nothing stored after the cancel
    assert sender.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409  # already cancelled


def test_kill_9_of_the_owner_the_other_finishes_after_the_lease(cluster: Cluster) -> None:
    a = cluster.replicas[0]
    job_id = _sweep(a)
    job, owner = cluster.held(a, job_id)
    survivor = cluster.other_than(owner)
    cluster.release(survivor, job_id)  # the survivor will not be held when it resumes the job
    owner.server.kill()
    final = wait_for("the survivor to take over and finish",
                     lambda: (j := survivor.job(job_id))["state"] in TERMINAL and j)
    assert final["state"] == "succeeded" and final["done"] == final["total"] == 10, final
    assert final["owner"] != job["owner"] and cluster.owner_of(final) is survivor
    took_over = re.search(rf"job {job_id}: taking over from {re.escape(job['owner'])}, whose last heartbeat was "
                          r"([\d.]+) s ago", survivor.server.log_text())
    assert took_over is not None and float(took_over.group(1)) >= LEASE_S  # only once the lease had lapsed
    before, after = owner.stored(job_id), survivor.stored(job_id)
    assert len(before) == HELD_ROWS and not set(before) & set(after)  # nothing recomputed
    assert sorted(before + after) == sorted(r["key"] for r in final["rows"])  # every step stored exactly once


def test_a_model_change_fails_the_resumed_job(cluster: Cluster) -> None:
    (server,) = cluster.alive()  # the other one was killed by the previous drill
    job_id = _sweep(server)
    job, owner = cluster.held(server, job_id)
    assert owner is server
    owner.server.terminate()  # graceful: the job is given back at once (no lease to wait for)
    # A third server on the same store with other weights (in this process: it starts in a second).
    changed = start_server(cluster.root, tiny_loaded(seed=1), database_url=cluster.database_url,
                           job_lease_s=LEASE_S)
    try:
        c = changed.client
        final = wait_for("the job to fail on the changed model",
                         lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["state"] in TERMINAL and j)
        fingerprint = c.get("/info").json()["fingerprint"]
        assert fingerprint != job["model_fingerprint"]
        assert final["state"] == "failed" and "resuming would mix results of different weights" in final["error"]
        assert job["model_fingerprint"][:16] in final["error"] and fingerprint[:16] in final["error"]
        assert final["done"] == HELD_ROWS and final["owner"] == changed.app.state.services.jobs.owner
        assert changed.app.state.services.jobs.rows_run == 0  # nothing computed on other weights
    finally:
        changed.stop()
