"""Sweeps on Ray: a pool of actors, each holding the same model, evaluates a sweep's step plans.

For grids that outgrow one machine. Every actor loads the model from the same source, proves it holds
the same weights (its fingerprint must equal the job's), keeps its own SVD cache and hidden-state
cache, and builds the same :class:`~laser_ops.sweep_steps.StepExecutor` from the same config and
dataset (the split is seeded), so a plan gives the same rows on any actor as in process. The pool
hands a plan to an idle actor; a plan whose actor dies is retried on another one (a replacement is
started when none is left); :meth:`RaySweepPool.close` kills the actors and fails what is in flight.
A test step's two sides (base and the winner on test) run on two actors at once and are joined here.

Drive a runner with :func:`laser_ops.sweeps.run_steps` and ``pool.submit`` (independent steps run
on several actors at once; rows are recorded in plan order). Ray is an optional dependency
(``pip install 'laser-serve[ray]'``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from laser_ops.datasets import Dataset
from laser_ops.evaluation import EvalReport
from laser_ops.fast_choice import drive
from laser_ops.sweep_models import StepPlan, SweepConfig, SweepRow
from laser_ops.sweep_steps import StepExecutor

logger = logging.getLogger(__name__)


class PoolClosed(RuntimeError):
    """The pool was closed (the job was cancelled) while a step waited or ran."""


class FingerprintMismatch(RuntimeError):
    """An actor loaded different weights than the job's model."""


@dataclass(frozen=True)
class ModelSource:
    """How an actor loads the job's model, and the fingerprint it must find."""

    source: str
    fingerprint: str
    device: str | None = None
    dtype: str | None = None
    cache_dir: str | None = None


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:  # pragma: no cover - ray is installed by `make test`
        raise RuntimeError("sweeps on Ray need the ray package: pip install 'laser-serve[ray]'") from e
    return ray


def connect(address: str, *, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` ('local' starts one in this process's session) unless already joined."""
    ray = _ray()
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)  # logical CPUs
    else:
        ray.init(address=address, log_to_driver=False)


class SweepWorker:
    """What one actor holds: the model, its swapper and scorer, and the sweep's executor."""

    def __init__(self, model: ModelSource, config_json: str, dataset_json: str, threads: int,
                 svd_cache_bytes: int) -> None:
        import torch

        from laser_ops.loading import load_model
        from laser_ops.scoring import HFScorer
        from laser_ops.svd import SvdCache
        from laser_ops.swap import WeightSwapper

        torch.set_num_threads(max(1, threads))
        lm = load_model(model.source, device=model.device, dtype=model.dtype, cache_dir=model.cache_dir)
        self.fingerprint = lm.fingerprint
        config = SweepConfig.model_validate_json(config_json)
        self.swapper = WeightSwapper(lm.model, svd_cache=SvdCache(lm.fingerprint, max_bytes=svd_cache_bytes))
        self.scorer = HFScorer(lm.model, lm.tokenizer, batch_size=config.batch_size)
        self.executor = StepExecutor.for_dataset(config, Dataset.model_validate_json(dataset_json))

    def model_fingerprint(self) -> str:
        return self.fingerprint

    def run(self, plan_json: str) -> list[str]:
        rows = self.executor.run(StepPlan.model_validate_json(plan_json), self.swapper, self.scorer)
        return [r.model_dump_json() for r in rows]

    def test_side(self, plan_json: str, side: str) -> str:
        gen = self.executor.test_side(StepPlan.model_validate_json(plan_json), side,  # type: ignore[arg-type]
                                      self.swapper, self.scorer)
        return drive(gen).model_dump_json()


class RaySweepPool:
    """``actors`` Ray actors (``threads`` torch threads each) evaluating one sweep's plans. Thread-safe."""

    def __init__(self, address: str, model: ModelSource, config: SweepConfig, dataset: Dataset, *,
                 actors: int = 2, threads: int = 1, svd_cache_bytes: int = 2 << 30, max_retries: int = 2) -> None:
        if actors < 1:
            raise ValueError(f"actors must be >= 1, got {actors}")
        self.ray = _ray()
        connect(address, num_cpus=max(4, actors * threads) if address == "local" else None)
        self.model = model
        self.threads = threads
        self.max_retries = max_retries
        self._args = (model, config.model_dump_json(), dataset.model_dump_json(), threads, svd_cache_bytes)
        self._cls = self.ray.remote(num_cpus=threads, max_restarts=0)(SweepWorker)
        self._cond = threading.Condition()
        self._closed = False
        self._idle: deque[Any] = deque()
        self.actors: list[Any] = []
        self.retried = 0  # steps retried after their actor died (tests and logs read it)
        for _ in range(actors):
            self.actors.append(self._cls.remote(*self._args))
        try:
            found = self.ray.get([a.model_fingerprint.remote() for a in self.actors])
        except Exception:
            self.close()
            raise
        bad = [f for f in found if f != model.fingerprint]
        if bad:
            self.close()
            raise FingerprintMismatch(f"Ray actors loaded {model.source!r} with fingerprint {bad[0]}, but the job's "
                                      f"model is {model.fingerprint}: every worker must hold the same weights")
        self._idle.extend(self.actors)
        # a test step waits on its two sides, each on a thread of its own
        self._threads = ThreadPoolExecutor(max_workers=actors + 3, thread_name_prefix="laser-ray")
        self._local = StepExecutor.for_dataset(config, dataset)  # joins the sides of a test step (no model)
        logger.info("ray sweep pool: %d actor(s) x %d thread(s) on %s", actors, threads, address)

    @property
    def size(self) -> int:
        return len(self.actors)

    def submit(self, step: Any) -> Future[list[SweepRow]]:
        """Run a :class:`StepPlan` (or a SweepStep's plan) on the next idle actor."""
        plan: StepPlan = step.plan if hasattr(step, "plan") else step
        if self._closed:
            raise PoolClosed("the Ray pool is closed")
        if plan.role == "test" and self.size > 1:
            return self._threads.submit(self._run_test, plan)
        return self._threads.submit(self._run, plan)

    def _acquire(self) -> Any:
        with self._cond:
            while not self._idle and not self._closed:
                if not self.actors:
                    replacement = self._cls.remote(*self._args)
                    self.actors.append(replacement)
                    self._idle.append(replacement)
                    break
                self._cond.wait()
            if self._closed:
                raise PoolClosed("the Ray pool is closed")
            return self._idle.popleft()

    def _release(self, actor: Any) -> None:
        with self._cond:
            if actor in self.actors:
                self._idle.append(actor)
            self._cond.notify()

    def _drop(self, actor: Any) -> None:
        with self._cond:
            if actor in self.actors:
                self.actors.remove(actor)
            self._cond.notify_all()

    def _run(self, plan: StepPlan) -> list[SweepRow]:
        rows = self._on_actor(plan, lambda actor: actor.run.remote(plan.model_dump_json()))
        return [SweepRow.model_validate_json(r) for r in rows]

    def _run_test(self, plan: StepPlan) -> list[SweepRow]:
        """A test step's two sides (base, winner) on two actors at once, joined here: the same row as one actor's."""
        t0 = time.perf_counter()
        sides = [self._threads.submit(self._on_actor, plan, lambda actor, side=side: actor.test_side.remote(
            plan.model_dump_json(), side)) for side in ("base", "winner")]
        base, winner = (EvalReport.model_validate_json(f.result()) for f in sides)
        return [self._local.test_row(plan, base, winner, time.perf_counter() - t0)]

    def _on_actor(self, plan: StepPlan, call: Callable[[Any], Any]) -> Any:
        """``call(actor)`` (a remote call) on the next idle actor; retried on another when the actor dies."""
        errors = self.ray.exceptions
        attempts = 0
        while True:
            actor = self._acquire()
            try:
                result = self.ray.get(call(actor))
            except (errors.RayActorError, errors.ActorUnavailableError) as e:
                self._drop(actor)
                if self._closed:
                    raise PoolClosed("the Ray pool was closed while a step ran") from None
                attempts += 1
                if attempts > self.max_retries:
                    raise RuntimeError(f"step {plan.key}: {attempts} Ray actors died running it") from e
                self.retried += 1
                logger.warning("step %s: its Ray actor died (%s); retrying on another", plan.key, type(e).__name__)
                continue
            self._release(actor)
            return result

    def kill_actor(self, index: int = 0) -> None:
        """Kill one actor (what a lost node does; tests use it). Its current or next step is retried elsewhere."""
        self.ray.kill(self.actors[index], no_restart=True)

    def close(self) -> None:
        """Kill every actor; steps waiting or running fail with :class:`PoolClosed`."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            actors, self.actors = list(self.actors), []
            self._idle.clear()
            self._cond.notify_all()
        for a in actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                logger.debug("ray.kill failed", exc_info=True)
        threads = getattr(self, "_threads", None)
        if threads is not None:
            threads.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RaySweepPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
