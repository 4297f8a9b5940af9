"""Tests for laser_ops.ray_sweeps on a local Ray cluster (started once per test process, 2 CPUs): a pool of
2 actors gives the same rows as the in-process sweep, retries a lost actor's step elsewhere, refuses
actors holding other weights, and stops when closed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from laser_ops.loading import LoadedModel, load_model
from laser_ops.scoring import HFScorer
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.sweeps import SweepConfig, SweepRunner, run_steps
from laser_ops.testing import save_tiny_model
from tests.laser_ops.test_sweeps import toy_mc

ray = pytest.importorskip("ray")
from laser_ops.ray_sweeps import FingerprintMismatch, ModelSource, PoolClosed, RaySweepPool  # noqa: E402

CONFIG = SweepConfig(types=["fc_in", "fc_out"], layers=[1, 2], rhos=[0.5, 0.1], validation_fraction=0.5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(save_tiny_model("llama", str(tmp_path_factory.mktemp("tiny-llama"))))


@pytest.fixture(scope="module")
def loaded(folder: Path) -> LoadedModel:
    return load_model(str(folder))


@pytest.fixture(scope="module")
def pool(folder: Path, loaded: LoadedModel) -> Iterator[RaySweepPool]:
    p = RaySweepPool("local", ModelSource(str(folder), loaded.fingerprint), CONFIG, toy_mc(24, seed=5), actors=2)
    yield p
    p.close()


def _comparable(rows) -> list[dict]:
    return [r.model_dump(exclude={"seconds", "test"}) | {"test": r.test and r.test.model_dump()} for r in rows]


def test_pool_rows_equal_the_in_process_sweep_and_survive_a_lost_actor(pool: RaySweepPool,
                                                                         loaded: LoadedModel) -> None:
    ds = toy_mc(24, seed=5)
    sw = WeightSwapper(loaded.model, svd_cache=SvdCache(loaded.fingerprint))
    sc = HFScorer(loaded.model, loaded.tokenizer, batch_size=CONFIG.batch_size)
    local = SweepRunner(CONFIG, ds).run(sw, sc)
    remote = run_steps(SweepRunner(CONFIG, ds), sw.targets, pool.submit, max_in_flight=pool.size)
    assert _comparable(remote.rows) == _comparable(local.rows)  # identical rows, same order and step numbers
    assert remote.test.verdict == local.test.verdict

    pool.kill_actor(0)  # a lost node: the next step handed to it is retried on the other actor
    again = run_steps(SweepRunner(CONFIG, ds), sw.targets, pool.submit, max_in_flight=pool.size)
    assert pool.retried >= 1 and pool.size == 1
    assert _comparable(again.rows) == _comparable(local.rows)


def test_actors_must_hold_the_jobs_weights(folder: Path) -> None:
    with pytest.raises(FingerprintMismatch, match="fingerprint"):
        RaySweepPool("local", ModelSource(str(folder), "not-this-model"), CONFIG, toy_mc(8), actors=1)


def test_close_stops_the_pool(pool: RaySweepPool) -> None:
    """Last in this file: closes the shared pool (what cancelling a job does)."""
    actors = list(pool.actors)
    pool.close()
    with pytest.raises(PoolClosed):
        pool.submit(SweepRunner(CONFIG, toy_mc(8))._test_plan())
    for actor in actors:  # killed, not idle (ray.kill is asynchronous: poll with a deadline)
        deadline = time.monotonic() + 60
        while True:
            try:
                ray.get(actor.model_fingerprint.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, "a closed pool's actor still answers"
