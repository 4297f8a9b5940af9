"""The embedded default: one SQLite file under ``data_dir``.

WAL journal with ``synchronous=FULL``: a committed write survives ``kill -9`` and power loss. Each call
opens a short-lived connection, so the database is safe to use from any thread and from several processes
sharing the data dir on one host (SQLite on a network file system is not: use PostgreSQL for replicas on
several nodes).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.store.database import Connection, Database


class SqliteDatabase(Database):
    dialect = "sqlite"
    now = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0, workers: int = 8) -> None:
        super().__init__(workers=workers)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self._write_lock = threading.Lock()  # one writer per process: threads queue here, not in busy loops
        con = self._connect()
        try:
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA synchronous=FULL")
        con.execute("PRAGMA foreign_keys=ON")
        return con

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self._write_lock:
            con = self._connect()
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    yield con
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
            finally:
                con.close()

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        con = self._connect()
        try:
            con.execute("BEGIN DEFERRED")  # in WAL mode, every read of this transaction sees one snapshot
            try:
                yield con
            finally:
                con.execute("ROLLBACK")
        finally:
            con.close()

    def is_unavailable(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and any(
            needle in str(exc) for needle in ("locked", "busy", "unable to open", "disk I/O"))

    def _has_table(self, con: Connection, name: str) -> bool:
        return con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                           (name,)).fetchone() is not None

    def columns(self, table: str) -> list[str]:
        with self.snapshot() as con:
            return [r["name"] for r in con.execute(f"PRAGMA table_info({table})").fetchall()]
