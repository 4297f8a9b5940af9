"""Routes: evaluation datasets for validation sweeps (admin key to upload or delete, inference key to read)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse

from server.deps import ServicesDep
from server.protocol.datasets import (
    DATASET_NAME_PATTERN,
    DatasetCreate,
    DatasetDeleted,
    DatasetList,
    DatasetPublic,
    DatasetRejected,
)
from server.security import AdminAuth, InferenceAuth
from server.serving import datasets as serving
from server.serving import jobs as jobs_serving

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

NamePath = Annotated[str, Path(pattern=DATASET_NAME_PATTERN, max_length=64, description="Dataset name.")]
_ERRORS = {401: {"description": "Missing or invalid API key."}, 403: {"description": "Key lacks the admin scope."}}


@router.post("", status_code=201, response_model=DatasetPublic, dependencies=[AdminAuth],
             responses={409: {"description": "Name exists or is built in."},
                        422: {"model": DatasetRejected, "description": "Bad rows, by line; nothing stored."},
                        **_ERRORS})
async def create_dataset(body: DatasetCreate, services: ServicesDep) -> DatasetPublic | JSONResponse:
    """Upload a dataset (JSONL or a BIG-bench task); every bad row is reported and nothing is stored."""
    try:
        return await serving.create_dataset(services, body)
    except serving.DatasetRejectedError as e:
        return JSONResponse(e.body(), 422)


@router.get("", response_model=DatasetList, dependencies=[InferenceAuth])
async def list_datasets(services: ServicesDep) -> DatasetList:
    """List built-in and uploaded datasets."""
    return await serving.list_datasets(services)


@router.get("/{name}", response_model=DatasetPublic, dependencies=[InferenceAuth],
            responses={404: {"description": "Unknown dataset."}})
async def get_dataset(name: NamePath, services: ServicesDep) -> DatasetPublic:
    """Read one dataset: size, kind, prompt format and a sample."""
    return await serving.get_dataset(services, name)


@router.delete("/{name}", response_model=DatasetDeleted, dependencies=[AdminAuth],
               responses={404: {"description": "Unknown dataset."},
                          409: {"description": "Built in, or used by an unfinished job."}, **_ERRORS})
async def delete_dataset(name: NamePath, services: ServicesDep) -> DatasetDeleted:
    """Delete an uploaded dataset."""
    return await serving.delete_dataset(services, name, jobs_serving.manager(services).in_use)
