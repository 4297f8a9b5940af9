"""Uploaded datasets as JSON in the ``datasets`` table (one row each); built-ins resolved from the library.

Names are validated by the protocol model (a safe pattern) and are only ever keys, never paths.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass
from typing import Any

from laser_ops.datasets import Dataset, builtin_dataset, builtin_datasets
from server.store.database import Database


@functools.lru_cache(maxsize=8)
def _builtin(name: str) -> Dataset:
    return builtin_dataset(name)


@dataclass(frozen=True)
class StoredDataset:
    name: str
    kind: str
    size: int
    source: str | None
    description: str
    created_at: float | None
    builtin: bool = False


class DatasetExistsError(KeyError):
    pass


class DatasetStore:
    """Datasets by name. Blocking calls: from async code, go through ``db.run``."""

    _COLUMNS = "name, kind, size, source, description, created_at"
    _PARSED_KEEP = 4

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        # Parsed uploads, keyed by (name, created_at): a name deleted and uploaded again (here or on another
        # replica) has a new created_at, so a stale parse is never served.
        self._parsed: dict[tuple[str, float], Dataset] = {}

    @staticmethod
    def builtin_names() -> list[str]:
        return builtin_datasets()

    def is_builtin(self, name: str) -> bool:
        return name in builtin_datasets()

    @staticmethod
    def _row(r: Any) -> StoredDataset:
        return StoredDataset(r["name"], r["kind"], r["size"], r["source"], r["description"], r["created_at"])

    def list(self) -> list[StoredDataset]:
        with self.db.snapshot() as con:
            rows = con.execute(f"SELECT {self._COLUMNS} FROM datasets ORDER BY name").fetchall()
        return [self._row(r) for r in rows]

    def info(self, name: str) -> StoredDataset | None:
        if self.is_builtin(name):
            ds = _builtin(name)
            return StoredDataset(name, ds.kind, len(ds), ds.source, "Built-in BIG-bench task.", None, True)
        with self.db.snapshot() as con:
            r = con.execute(f"SELECT {self._COLUMNS} FROM datasets WHERE name = ?", (name,)).fetchone()
        return None if r is None else self._row(r)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.info(name) is not None

    def get(self, name: str) -> Dataset:
        """The dataset; KeyError if unknown. Parsing a stored one may be slow: call off the event loop."""
        if self.is_builtin(name):
            return _builtin(name)
        with self.db.snapshot() as con:
            r = con.execute("SELECT created_at FROM datasets WHERE name = ?", (name,)).fetchone()
            if r is None:
                raise KeyError(name)
            key = (name, float(r["created_at"]))
            with self._lock:
                cached = self._parsed.get(key)
            if cached is not None:
                return cached
            data = con.execute("SELECT data FROM datasets WHERE name = ?", (name,)).fetchone()["data"]
        ds = Dataset.model_validate_json(data)
        with self._lock:
            if len(self._parsed) >= self._PARSED_KEEP:
                self._parsed.pop(next(iter(self._parsed)))
            self._parsed[key] = ds
        return ds

    def put(self, dataset: Dataset, description: str = "") -> StoredDataset:
        """Store a new dataset; :class:`DatasetExistsError` if the name is taken (or built in)."""
        if self.is_builtin(dataset.name):
            raise DatasetExistsError(dataset.name)
        now = time.time()
        with self.db.transaction() as con:
            inserted = con.execute(
                "INSERT INTO datasets (name, kind, size, source, description, created_at, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (dataset.name, dataset.kind, len(dataset), dataset.source, description, now,
                 dataset.model_dump_json())).rowcount
        if inserted != 1:
            raise DatasetExistsError(dataset.name)
        return StoredDataset(dataset.name, dataset.kind, len(dataset), dataset.source, description, now)

    def delete(self, name: str) -> bool:
        with self.db.transaction() as con:
            deleted = con.execute("DELETE FROM datasets WHERE name = ?", (name,)).rowcount > 0
        with self._lock:
            for key in [k for k in self._parsed if k[0] == name]:
                del self._parsed[key]
        return deleted
