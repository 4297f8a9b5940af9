"""PostgreSQL (psycopg 3 with a connection pool): the store replicas on several nodes share.

Selected by ``database_url = postgresql://user:password@host:5432/dbname``. The pool checks a connection
before lending it, so a database restart costs a reconnect, not a failed request; transactions are
``READ COMMITTED`` (conditional ``UPDATE``s are decided under row locks), snapshots ``REPEATABLE READ``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from server.store.database import Connection, Cursor, Database, StoreUnavailableError

_MIGRATION_LOCK = 0x6C61736572  # pg_advisory_xact_lock key ("laser"): one migrator at a time


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """Portable ``?`` placeholders to psycopg's ``%s`` (a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgConnection:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self._conn.execute(_pg_sql(sql), tuple(params))  # type: ignore[return-value]

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(_pg_sql(sql), [tuple(p) for p in params])


def redact(url: str) -> str:
    """``postgresql://user@host:port/dbname`` without the password (for logs and errors)."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparseable url)"
    user = f"{info['user']}@" if info.get("user") else ""
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{info.get('host', '')}{port}/{info.get('dbname', '')}"


class PostgresDatabase(Database):
    dialect = "postgresql"
    now = "(EXTRACT(EPOCH FROM clock_timestamp())::double precision)"

    def __init__(self, url: str, *, pool_size: int = 8, connect_timeout_s: float = 60.0) -> None:
        super().__init__(workers=pool_size)
        self._where = redact(url)
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False, name="laser-serve",
                                    kwargs={"row_factory": dict_row}, check=ConnectionPool.check_connection)
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except PoolTimeout as e:
            self._pool.close()
            super().close()
            raise StoreUnavailableError(f"cannot connect to {self._where} within {connect_timeout_s:g} s: {e}") from e

    def describe(self) -> str:
        return self._where

    def is_unavailable(self, exc: BaseException) -> bool:
        return isinstance(exc, (psycopg.OperationalError, PoolTimeout))

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self._pool.connection() as conn, conn.transaction():
            yield _PgConnection(conn)

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield _PgConnection(conn)

    def _lock_schema(self, con: Connection) -> None:
        con.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))

    def _has_table(self, con: Connection, name: str) -> bool:
        return con.execute("SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() "
                           "AND table_name = ?", (name,)).fetchone() is not None

    def columns(self, table: str) -> list[str]:
        with self.snapshot() as con:
            rows = con.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = "
                               "current_schema() AND table_name = ? ORDER BY ordinal_position", (table,)).fetchall()
        return [r["column_name"] for r in rows]

    def close(self) -> None:
        self._pool.close()
        super().close()
