"""SVDs computed off the engine's owner thread, so inference goes on while a profile is being prepared.

A profile that edits many matrices for the first time (``{"target": "all", "layer": "all", ...}``) needs one
SVD per matrix; computed inside the apply or dry run, they would hold the owner thread (and every request
queued behind it) for as long as they take. Instead, before such work reaches the owner thread:

1. a short owner-thread task copies each original matrix the profile needs and the cache lacks to CPU
   (:meth:`WeightSwapper.missing_decompositions`): a copy, so later swaps cannot change what is decomposed;
2. one worker thread decomposes the copies into the shared :class:`SvdCache` (thread-safe), at a lower OS
   priority so that a CPU shared with inference favours inference;
3. the apply or dry run then finds every decomposition cached.

Dry runs and exports wait for step 2; creating or replacing a profile starts it in the background, and
inference for that profile waits for it (:meth:`Decomposer.ready`) rather than decompose on the owner thread.
Preparation is best effort: if it fails, the owner thread computes as it always could, and reports any error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from laser_ops.interventions import InterventionSpec
from laser_ops.svd import SvdCache
from laser_ops.swap import DecompositionJob, WeightSwapper

from server.engine import Engine

logger = logging.getLogger(__name__)

#: OS niceness of the decomposition thread (and the threads its math library starts): inference comes first.
WORKER_NICENESS = 10


def _lower_priority() -> None:
    if sys.platform.startswith("linux"):  # Linux niceness is per thread
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
        except OSError:
            logger.debug("could not lower the decomposition thread's priority", exc_info=True)


class Decomposer:
    """Prepares the SVDs of profiles on one worker thread; see the module docstring."""

    def __init__(self, engine: Engine, cache: SvdCache) -> None:
        self.engine = engine
        self.cache = cache
        #: Runs one job on the worker thread (a seam: tests hold a decomposition in progress with it).
        self.run_job: Callable[[DecompositionJob], None] = lambda job: job.run(self.cache)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="laser-svd", initializer=_lower_priority)
        self._by_profile: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.jobs_run = 0

    async def prepare(self, specs: Sequence[InterventionSpec]) -> None:
        """Compute, off the owner thread, every decomposition ``specs`` need that is not cached yet."""
        specs = list(specs)
        try:
            jobs = await self.engine.run_task(lambda swapper, _scorer: _missing(swapper, specs))
            loop = asyncio.get_running_loop()
            for job in jobs:
                await loop.run_in_executor(self._executor, self.run_job, job)
                self.jobs_run += 1
        except Exception:  # best effort: the owner thread decomposes (and reports errors) as before
            logger.warning("preparing decompositions failed; the engine will compute them", exc_info=True)

    def prepare_profile(self, name: str, specs: Sequence[InterventionSpec]) -> None:
        """Start preparing a stored profile in the background; :meth:`ready` waits for it."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        previous = self._by_profile.get(name)
        self._by_profile[name] = done

        async def run() -> None:
            try:
                if previous is not None:  # one preparation per profile at a time, in order
                    await asyncio.shield(previous)
                await self.prepare(specs)
            finally:
                if self._by_profile.get(name) is done:
                    del self._by_profile[name]
                done.set_result(None)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ready(self, name: str) -> None:
        """Wait while profile ``name`` is being prepared (returns at once otherwise)."""
        pending = self._by_profile.get(name)
        if pending is not None:
            await asyncio.shield(pending)

    def close(self) -> None:
        """Drop pending work (shutdown): preparations are only a head start, nothing is lost."""
        for task in list(self._tasks):
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _missing(swapper: WeightSwapper, specs: list[InterventionSpec]) -> list[DecompositionJob]:
    try:
        return swapper.missing_decompositions(specs)
    except Exception:  # an invalid profile: the real apply or dry run reports it
        return []
