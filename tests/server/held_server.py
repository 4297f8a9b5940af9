"""``python -m tests.server.held_server [server flags]``: a real laser-serve process whose sweep worker can be
held mid-job, for the replica drills (kill -9 of an owner, cancel from another server, a model change).

With ``LASER_TEST_HOLD_AFTER=N`` and ``LASER_TEST_GATE_DIR=DIR``, after storing its N-th step of a job the
worker waits until the file ``DIR/release-<pid>-<job id>`` exists (its heartbeat keeps the lease meanwhile).
Without them it is plain ``python -m server``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from server.__main__ import main
from server.serving.jobs.manager import JobManager


def gate_file(gate_dir: Path, pid: int, job_id: str) -> Path:
    return gate_dir / f"release-{pid}-{job_id}"


def install_hold(after: int, gate_dir: Path) -> None:
    stored: dict[str, int] = {}

    async def hold_after_step(self: JobManager, job_id: str, row: object) -> None:
        stored[job_id] = stored.get(job_id, 0) + 1
        gate = gate_file(gate_dir, os.getpid(), job_id)
        while stored[job_id] >= after and not gate.exists():
            await asyncio.sleep(0.02)

    JobManager._after_step = hold_after_step  # type: ignore[method-assign]


if __name__ == "__main__":
    if os.environ.get("LASER_TEST_HOLD_AFTER"):
        install_hold(int(os.environ["LASER_TEST_HOLD_AFTER"]), Path(os.environ["LASER_TEST_GATE_DIR"]))
    main()
