"""Dataset logic: parse uploads with the library (every bad row reported, nothing half-imported), store them
durably (:class:`~server.store.datasets.DatasetStore`), resolve a name to a
:class:`~laser_ops.datasets.Dataset` (built-in or uploaded). Store calls run on the store's thread pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from laser_ops.datasets import Dataset, DatasetError, PromptFormat, parse_bigbench, parse_jsonl
from server.errors import ApiError
from laser_protocol.datasets import (
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
from server.store.datasets import DatasetExistsError, DatasetStore, StoredDataset


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


def _summary(s: StoredDataset) -> DatasetSummary:
    return DatasetSummary(name=s.name, kind=s.kind, size=s.size, builtin=s.builtin, source=s.source,
                          description=s.description, created_at=s.created_at)


def _public(s: StoredDataset, ds: Dataset) -> DatasetPublic:
    sample = [ExampleSample(id=e.id, input=e.input, prompt=ds.prompt(e), choices=e.choices, correct=e.correct,
                            targets=e.targets) for e in ds.examples[:SAMPLE_SIZE]]
    return DatasetPublic(**_summary(s).model_dump(), format=ds.format, sample=sample)


def _list(st: DatasetStore) -> DatasetList:
    builtins = [st.info(n) for n in st.builtin_names()]
    return DatasetList(data=[_summary(s) for s in [*builtins, *st.list()] if s is not None])


async def list_datasets(services: Services) -> DatasetList:
    return await services.db.run(_list, services.datasets)


def known_names(st: DatasetStore) -> list[str]:
    """Every dataset name (for "unknown dataset" messages). Blocking."""
    return [d.name for d in _list(st).data]


async def get_dataset(services: Services, name: str) -> DatasetPublic:
    st = services.datasets

    def read() -> DatasetPublic:
        info = st.info(name)
        if info is None:
            raise ApiError(404, f"unknown dataset {name!r}; known: {known_names(st)}", ("path", "name"))
        return _public(info, st.get(name))

    return await services.db.run(read)


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
    st = services.datasets
    if st.is_builtin(body.name):
        raise ApiError(409, f"dataset {body.name!r} is a built-in dataset; choose another name", ("body", "name"))
    if await services.db.run(st.info, body.name) is not None:
        raise ApiError(409, f"dataset {body.name!r} already exists; delete it first", ("body", "name"))
    ds = await asyncio.to_thread(parse_upload, body)
    try:
        stored = await services.db.run(st.put, ds, body.description)
    except DatasetExistsError:
        raise ApiError(409, f"dataset {body.name!r} already exists; delete it first", ("body", "name")) from None
    return _public(stored, ds)


async def delete_dataset(services: Services, name: str, in_use: Callable[[str], list[str]]) -> DatasetDeleted:
    """Delete an upload; 409 for built-ins and while a queued or running job uses it."""
    st = services.datasets
    if st.is_builtin(name):
        raise ApiError(409, f"dataset {name!r} is built in and cannot be deleted", ("path", "name"))

    def delete() -> DatasetDeleted:
        if st.info(name) is None:
            raise ApiError(404, f"unknown dataset {name!r}", ("path", "name"))
        jobs = in_use(name)
        if jobs:
            raise ApiError(409, f"dataset {name!r} is used by unfinished job(s) {jobs}; cancel them first",
                           ("path", "name"))
        if not st.delete(name):
            raise ApiError(404, f"unknown dataset {name!r}", ("path", "name"))
        return DatasetDeleted(name=name)

    return await services.db.run(delete)
