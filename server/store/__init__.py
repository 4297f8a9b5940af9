"""Durable state shared by every replica: profiles, datasets and jobs in one database.

``database.py`` is the seam (transactions, snapshots, migrations, a thread pool for async callers);
``sqlite.py`` (the embedded default, one file under ``data_dir``) and ``postgres.py`` (``database_url``)
implement it; ``migrations.py`` versions the schema; ``profiles.py``, ``datasets.py`` and ``jobs.py`` are the
stores, written once in SQL both backends run.
"""

from __future__ import annotations

from pathlib import Path

from server.store.database import Database, SchemaError, StoreUnavailableError
from server.store.profiles import (
    RESERVED_PROFILES,
    ProfileBackend,
    ProfileExistsError,
    ProfileSnapshot,
    ProfileStore,
    SqlProfileBackend,
    StoredProfile,
)
from server.store.sqlite import SqliteDatabase

__all__ = [
    "RESERVED_PROFILES", "Database", "ProfileBackend", "ProfileExistsError", "ProfileSnapshot", "ProfileStore",
    "SchemaError", "SqlProfileBackend", "SqliteDatabase", "StoreUnavailableError", "StoredProfile",
    "open_database",
]


def open_database(url: str | None, sqlite_path: Path, *, pool_size: int = 8) -> Database:
    """PostgreSQL for a ``postgresql://`` URL, else the SQLite file; the schema migrated to the latest version."""
    db: Database
    if url:
        from server.store.postgres import PostgresDatabase  # psycopg is only needed with a URL

        db = PostgresDatabase(url, pool_size=pool_size)
    else:
        db = SqliteDatabase(sqlite_path, workers=pool_size)
    try:
        db.migrate()
    except BaseException:
        db.close()
        raise
    return db
