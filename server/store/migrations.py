"""Forward migrations of the store's schema, the same statements on SQLite and PostgreSQL.

To change the schema, append a :class:`Migration` with the next version; never edit one that shipped
(databases in the field have applied it). Statements must run on both backends: ``TEXT``, ``INTEGER``,
``BIGINT`` and ``DOUBLE PRECISION`` columns, ``CREATE ... IF NOT EXISTS``, ``ALTER TABLE ... ADD COLUMN``.
``tests/server/test_store.py`` applies them to both and compares the resulting tables column by column.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "profiles, datasets, sweep jobs and their rows (the v0.1 schema)", (
        """CREATE TABLE IF NOT EXISTS profiles (
            name TEXT PRIMARY KEY,
            description TEXT NOT NULL DEFAULT '',
            interventions TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS profile_revision (
            id INTEGER PRIMARY KEY CHECK (id = 0),
            value BIGINT NOT NULL
        )""",
        "INSERT INTO profile_revision (id, value) VALUES (0, 0) ON CONFLICT (id) DO NOTHING",
        """CREATE TABLE IF NOT EXISTS datasets (
            name TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            size INTEGER NOT NULL,
            source TEXT,
            description TEXT NOT NULL DEFAULT '',
            created_at DOUBLE PRECISION NOT NULL,
            data TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL DEFAULT 'sweep',
            state TEXT NOT NULL,
            dataset TEXT NOT NULL,
            config TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            started_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION,
            error TEXT,
            done INTEGER NOT NULL DEFAULT 0,
            total INTEGER,
            elapsed_s DOUBLE PRECISION NOT NULL DEFAULT 0,
            stopped TEXT,
            n_validation INTEGER,
            n_test INTEGER,
            best_key TEXT
        )""",
        """CREATE TABLE IF NOT EXISTS job_rows (
            job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            step INTEGER NOT NULL,
            row TEXT NOT NULL,
            PRIMARY KEY (job_id, key)
        )""",
        "CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state)",
    )),
    Migration(2, "job leases (owner, heartbeat) and the model each job is bound to", (
        "ALTER TABLE jobs ADD COLUMN owner TEXT",
        "ALTER TABLE jobs ADD COLUMN heartbeat DOUBLE PRECISION",
        "ALTER TABLE jobs ADD COLUMN model_fingerprint TEXT",
        "ALTER TABLE jobs ADD COLUMN model_id TEXT",
        "CREATE INDEX IF NOT EXISTS jobs_created_at ON jobs(created_at)",
    )),
)

assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1)), "versions must be 1, 2, 3, ..."
