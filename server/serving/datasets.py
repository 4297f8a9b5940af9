"""Dataset logic: parse uploads with the library (every bad row reported, nothing half-imported), store them
durably in SQLite, resolve a name to a :class:`~laser_ops.datasets.Dataset` (built-in or uploaded).

Names are validated by the protocol model (a safe pattern) and are only ever SQLite keys, never paths.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from laser_ops.datasets import (
    Dataset,
    DatasetError,
    PromptFormat,
    builtin_dataset,
    builtin_datasets,
    parse_bigbench,
    parse_jsonl,
)
from server.errors import ApiError
from server.protocol.datasets import (
    SAMPLE_SIZE,
    BadRow,
    DatasetCreate,
    DatasetDeleted,
    DatasetList,
    DatasetPublic,
    DatasetRejected,
    DatasetSummary,
    ExampleSample,
)
from server.state import Services
from server.store import Database

EXTRAS_KEY = "datasets"


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
    """Uploaded datasets as JSON in SQLite (one row each); built-ins resolved from the library."""

    _DDL = """
    CREATE TABLE IF NOT EXISTS datasets (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        size INTEGER NOT NULL,
        source TEXT,
        description TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        data TEXT NOT NULL
    )
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        db.ensure_schema(self._DDL)
        self._lock = threading.Lock()
        self._parsed: dict[str, Dataset] = {}  # small cache of uploads already parsed

    @staticmethod
    def builtin_names() -> list[str]:
        return builtin_datasets()

    def is_builtin(self, name: str) -> bool:
        return name in builtin_datasets()

    @staticmethod
    def _row(r: sqlite3.Row) -> StoredDataset:
        return StoredDataset(r["name"], r["kind"], r["size"], r["source"], r["description"], r["created_at"])

    def list(self) -> list[StoredDataset]:
        with self.db.connect() as con:
            rows = con.execute("SELECT name, kind, size, source, description, created_at FROM datasets "
                               "ORDER BY name").fetchall()
        return [self._row(r) for r in rows]

    def info(self, name: str) -> StoredDataset | None:
        if self.is_builtin(name):
            ds = _builtin(name)
            return StoredDataset(name, ds.kind, len(ds), ds.source, "Built-in BIG-bench task.", None, True)
        with self.db.connect() as con:
            r = con.execute("SELECT name, kind, size, source, description, created_at FROM datasets "
                            "WHERE name = ?", (name,)).fetchone()
        return None if r is None else self._row(r)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.info(name) is not None

    def get(self, name: str) -> Dataset:
        """The dataset; KeyError if unknown. Parsing a stored one may be slow: call off the event loop."""
        if self.is_builtin(name):
            return _builtin(name)
        with self._lock:
            cached = self._parsed.get(name)
        if cached is not None:
            return cached
        with self.db.connect() as con:
            r = con.execute("SELECT data FROM datasets WHERE name = ?", (name,)).fetchone()
        if r is None:
            raise KeyError(name)
        ds = Dataset.model_validate_json(r["data"])
        with self._lock:
            if len(self._parsed) >= 4:
                self._parsed.pop(next(iter(self._parsed)))
            self._parsed[name] = ds
        return ds

    def put(self, dataset: Dataset, description: str = "") -> StoredDataset:
        """Store a new dataset; :class:`DatasetExistsError` if the name is taken (or built in)."""
        if self.is_builtin(dataset.name):
            raise DatasetExistsError(dataset.name)
        now = time.time()
        try:
            with self.db.transaction() as con:
                con.execute("INSERT INTO datasets (name, kind, size, source, description, created_at, data) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (dataset.name, dataset.kind, len(dataset), dataset.source, description, now,
                             dataset.model_dump_json()))
        except sqlite3.IntegrityError:
            raise DatasetExistsError(dataset.name) from None
        return StoredDataset(dataset.name, dataset.kind, len(dataset), dataset.source, description, now)

    def delete(self, name: str) -> bool:
        with self.db.transaction() as con:
            deleted = con.execute("DELETE FROM datasets WHERE name = ?", (name,)).rowcount > 0
        with self._lock:
            self._parsed.pop(name, None)
        return deleted


class DatasetRejectedError(Exception):
    """An upload with bad rows; the route answers 422 with :meth:`body`."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} bad row(s)")
        self.errors = [BadRow(line=e.get("line"), message=str(e.get("message"))) for e in errors]

    def body(self) -> dict[str, Any]:
        detail = [{"loc": ["body", "content", *([e.line] if e.line is not None else [])],
                   "msg": (f"line {e.line}: " if e.line is not None else "") + e.message, "type": "bad_row"}
                  for e in self.errors]
        return DatasetRejected(detail=detail, errors=self.errors).model_dump()


# ---------------------------------------------------------------------------------------------- logic


def store(services: Services) -> DatasetStore:
    return services.extras[EXTRAS_KEY]


async def startup(app: Any, services: Services) -> None:
    """Start-up hook: create the table and put the store in ``services.extras``."""
    services.extras[EXTRAS_KEY] = await asyncio.to_thread(DatasetStore, services.db)


def _summary(s: StoredDataset) -> DatasetSummary:
    return DatasetSummary(name=s.name, kind=s.kind, size=s.size, builtin=s.builtin, source=s.source,
                          description=s.description, created_at=s.created_at)


def _public(s: StoredDataset, ds: Dataset) -> DatasetPublic:
    sample = [ExampleSample(id=e.id, input=e.input, prompt=ds.prompt(e), choices=e.choices, correct=e.correct,
                            targets=e.targets) for e in ds.examples[:SAMPLE_SIZE]]
    return DatasetPublic(**_summary(s).model_dump(), format=ds.format, sample=sample)


def list_datasets(services: Services) -> DatasetList:
    st = store(services)
    builtins = [st.info(n) for n in st.builtin_names()]
    return DatasetList(data=[_summary(s) for s in [*builtins, *st.list()] if s is not None])


async def get_dataset(services: Services, name: str) -> DatasetPublic:
    st = store(services)
    info = st.info(name)
    if info is None:
        raise ApiError(404, f"unknown dataset {name!r}; known: {[d.name for d in list_datasets(services).data]}",
                       ("path", "name"))
    ds = await asyncio.to_thread(st.get, name)
    return _public(info, ds)


def parse_upload(body: DatasetCreate) -> Dataset:
    """The library's parse of an upload; :class:`DatasetRejectedError` listing every bad row."""
    fmt: PromptFormat | None = None
    try:
        if body.format == "jsonl":
            if not isinstance(body.content, str):
                raise ApiError(422, "format 'jsonl' needs content as a string of JSON lines", ("body", "content"))
            if body.prompt_template is not None:
                fmt = _with_template(PromptFormat(), body.prompt_template)
            ds = parse_jsonl(body.content, body.name, format=fmt, kind=body.kind, source=f"upload:{body.name}")
        else:
            ds = parse_bigbench(body.content, body.name, single_target_only=body.single_target_only,
                                source=f"upload:{body.name}")
            if body.kind is not None and ds.kind != body.kind:
                raise ApiError(422, f"the task is {ds.kind}, not {body.kind}", ("body", "kind"))
            if body.prompt_template is not None:
                ds = ds.model_copy(update={"format": _with_template(ds.format, body.prompt_template)})
    except DatasetError as e:
        raise DatasetRejectedError(e.errors) from None
    return ds


def _with_template(fmt: PromptFormat, template: str) -> PromptFormat:
    try:
        return PromptFormat(**{**fmt.model_dump(), "template": template})
    except ValueError as e:
        msg = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
        raise ApiError(422, msg, ("body", "prompt_template")) from None


async def create_dataset(services: Services, body: DatasetCreate) -> DatasetPublic:
    st = store(services)
    if st.is_builtin(body.name):
        raise ApiError(409, f"dataset {body.name!r} is a built-in dataset; choose another name", ("body", "name"))
    if st.info(body.name) is not None:
        raise ApiError(409, f"dataset {body.name!r} already exists; delete it first", ("body", "name"))
    ds = await asyncio.to_thread(parse_upload, body)
    try:
        stored = await asyncio.to_thread(st.put, ds, body.description)
    except DatasetExistsError:
        raise ApiError(409, f"dataset {body.name!r} already exists; delete it first", ("body", "name")) from None
    return _public(stored, ds)


def delete_dataset(services: Services, name: str, in_use: Callable[[str], list[str]]) -> DatasetDeleted:
    """Delete an upload; 409 for built-ins and while a queued or running job uses it."""
    st = store(services)
    if st.is_builtin(name):
        raise ApiError(409, f"dataset {name!r} is built in and cannot be deleted", ("path", "name"))
    if st.info(name) is None:
        raise ApiError(404, f"unknown dataset {name!r}", ("path", "name"))
    jobs = in_use(name)
    if jobs:
        raise ApiError(409, f"dataset {name!r} is used by unfinished job(s) {jobs}; cancel them first",
                       ("path", "name"))
    st.delete(name)
    return DatasetDeleted(name=name)
