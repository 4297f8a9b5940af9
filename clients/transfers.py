"""Helpers of the client's long-running calls, shared by the sync and async clients: downloading an export's
files safely (names confined to the destination, size and SHA-256 checked, written atomically) and following a
job until it ends (deadline, progress callback, polling fallback).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

from clients.errors import LaserError, LaserTimeoutError
from laser_protocol.exports import ExportFile, ExportPublic
from laser_protocol.jobs import JobProgress, JobPublic


def safe_relative(name: str) -> PurePosixPath:
    """An export's file name as a relative path that stays inside the destination, or ValueError."""
    p = PurePosixPath(name)
    if (not name or "\\" in name or "\x00" in name or p.is_absolute() or ":" in p.parts[0]
            or any(part in ("", ".", "..") for part in p.parts)):
        raise ValueError(f"refusing unsafe file name {name!r} in the export listing")
    return p


def download_plan(export: ExportPublic, dest: Path, overwrite: bool) -> list[tuple[ExportFile, Path]]:
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not overwrite)):
        raise FileExistsError(f"{dest} exists and is not an empty folder; pass overwrite=True to write into it")
    return [(f, dest.joinpath(*safe_relative(f.name).parts)) for f in export.files]


class FileSink:
    """Writes one downloaded file to ``<target>.part``, hashing; :meth:`commit` checks size and SHA-256, then moves."""

    def __init__(self, spec: ExportFile, target: Path) -> None:
        self.spec, self.target = spec, target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.part = target.with_name(target.name + ".part")
        self.fh = self.part.open("wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.fh.write(chunk)
        self.sha.update(chunk)
        self.size += len(chunk)

    def commit(self) -> None:
        self.fh.close()
        if self.size != self.spec.bytes or (self.spec.sha256 and self.sha.hexdigest() != self.spec.sha256):
            self.part.unlink(missing_ok=True)
            raise LaserError(f"download of {self.spec.name} is corrupt: {self.size} bytes (expected "
                             f"{self.spec.bytes}), sha256 {self.sha.hexdigest()} (expected {self.spec.sha256})")
        os.replace(self.part, self.target)

    def abort(self) -> None:
        self.fh.close()
        self.part.unlink(missing_ok=True)


class Waiter:
    """What :meth:`wait` shares between sync and async: deadline, progress callback, fallback polling."""

    def __init__(self, timeout: float | None, on_progress: Callable[[JobProgress], Any] | None,
                 poll_interval: float) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.on_progress = on_progress
        self.poll_interval = poll_interval

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self, job_id: str) -> None:
        left = self.remaining()
        if left is not None and left <= 0:
            raise LaserTimeoutError(f"job {job_id} did not finish in time")

    def stream_timeout(self, default: httpx.Timeout) -> httpx.Timeout:
        """The client's timeouts, with reads bounded by what is left of the deadline."""
        left = self.remaining()
        read = default.read if left is None else max(0.05, min(default.read or left, left))
        return httpx.Timeout(default.connect, read=read, write=default.write, pool=default.pool)

    def event(self, ev: JobProgress) -> bool:
        if self.on_progress is not None:
            self.on_progress(ev)
        return ev.terminal

    def snapshot(self, job: JobPublic) -> bool:
        """A polled job as a progress event (fallback when the event stream is unavailable)."""
        ev = JobProgress(type="state" if job.terminal else "progress", id=job.id, state=job.state, done=job.done,
                           total=job.total, progress=job.progress, elapsed_s=job.elapsed_s, eta_s=job.eta_s,
                           best=job.best, error=job.error)
        return self.event(ev)
