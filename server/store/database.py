"""The database seam: one interface over the embedded SQLite file and a PostgreSQL server.

Stores (profiles, datasets, jobs) write portable SQL once: ``?`` placeholders, types both engines know
(``TEXT``, ``INTEGER``, ``BIGINT``, ``DOUBLE PRECISION``), ``INSERT ... ON CONFLICT`` upserts, and
:attr:`Database.now` wherever the database's own clock is needed (job leases compare heartbeats with it,
so the replicas' clocks never matter). The schema is versioned: :meth:`Database.migrate` applies the
forward migrations of :mod:`server.store.migrations`, the same statements on both backends, under a lock so
that replicas starting together apply each one once.

Every call blocks, so async code goes through :meth:`Database.run`, which runs it on the store's own
thread pool: a slow or locked database never stalls the event loop (streams keep flowing), and store work
never queues behind other thread-pool users.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol, TypeVar

from server.store.migrations import MIGRATIONS, Migration

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Cursor(Protocol):
    """Rows are read by column name (``row["name"]``): sqlite3.Row and psycopg's dict_row both allow it."""

    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What a store sees inside a transaction: portable SQL with ``?`` placeholders."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None: ...


class StoreUnavailableError(RuntimeError):
    """The database cannot be reached (or stayed locked past its timeout); the request may be retried."""


class SchemaError(RuntimeError):
    """The database's schema is newer than this laser-serve knows."""


class Database(ABC):
    """A transactional store of profiles, datasets and jobs. Safe to use from any thread."""

    dialect: ClassVar[str]
    #: SQL expression for the database clock in Unix seconds (a DOUBLE PRECISION).
    now: ClassVar[str]

    def __init__(self, *, workers: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"laser-{self.dialect}")

    # -- transactions

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Connection]:
        """A read-write transaction: committed when the block ends, rolled back if it raises.

        Writers are serialised by the database (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: row locks), so a
        conditional ``UPDATE`` inside one decides a race exactly once.
        """

    @abstractmethod
    def snapshot(self) -> AbstractContextManager[Connection]:
        """A read-only transaction in which every read sees the same committed state."""

    @abstractmethod
    def describe(self) -> str:
        """Where the data lives, without secrets (for logs and errors)."""

    # -- off the event loop

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a blocking store call on the store's thread pool and await its result."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
        except Exception as e:
            if self.is_unavailable(e):
                raise StoreUnavailableError(f"the database ({self.describe()}) is unavailable: {e}") from e
            raise

    def is_unavailable(self, exc: BaseException) -> bool:
        """True for driver errors meaning "unreachable, or locked past the timeout" (worth a retry)."""
        return False

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- schema

    def _lock_schema(self, con: Connection) -> None:
        """Serialise migrations of concurrent starters (inside the migration transaction)."""

    def schema_version(self) -> int:
        with self.snapshot() as con:
            if not self._has_table(con, "schema_migrations"):
                return 0
            row = con.execute("SELECT MAX(version) AS version FROM schema_migrations").fetchone()
        return int(row["version"] or 0)

    @abstractmethod
    def _has_table(self, con: Connection, name: str) -> bool: ...

    @abstractmethod
    def columns(self, table: str) -> list[str]:
        """Column names of a table, in order (tests compare the backends' schemas with it)."""

    def migrate(self, migrations: Sequence[Migration] = MIGRATIONS) -> int:
        """Apply every migration newer than the database's version, in one transaction; the new version.

        A database written by v0.1 (tables, no version) is adopted by migration 1, whose statements only
        create what is missing. A database newer than ``migrations`` is refused: going back is not supported.
        """
        latest = migrations[-1].version if migrations else 0
        with self.transaction() as con:
            self._lock_schema(con)
            con.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                        "description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
            row = con.execute("SELECT MAX(version) AS version FROM schema_migrations").fetchone()
            current = int(row["version"] or 0)
            if current > latest:
                raise SchemaError(
                    f"the database ({self.describe()}) has schema version {current}, newer than this laser-serve "
                    f"knows ({latest}); upgrade laser-serve, or point it at another database")
            for m in migrations:
                if m.version <= current:
                    continue
                for statement in m.statements:
                    con.execute(statement)
                con.execute("INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                            (m.version, m.description, time.time()))
                logger.info("database %s: applied migration %d (%s)", self.describe(), m.version, m.description)
        return max(current, latest)

