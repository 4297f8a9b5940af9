"""Routes: evaluation datasets for validation sweeps (admin key to upload or delete, inference key to read)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse

from server.deps import ServicesDep
from laser_protocol.datasets import (
    DATASET_NAME_PATTERN,
    DatasetCreate,
    DatasetDeleted,
    DatasetList,
    DatasetPublic,
    DatasetRejected,
)
from server.openapi import link
from server.routing import ApiRoute
from server.security import AdminAuth, InferenceAuth
from server.serving import datasets as serving
from server.serving.jobs import service as jobs_serving

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], route_class=ApiRoute)

NamePath = Annotated[str, Path(pattern=DATASET_NAME_PATTERN, max_length=64, description="Dataset name.")]


def _dataset_links(name: str) -> dict[str, object]:
    """From a dataset (``name``: where its name is in the response) to what can be done with it."""
    ref = {"name": name}
    return {"GetDataset": link("get_dataset", "Read the dataset.", parameters=ref),
            "DeleteDataset": link("delete_dataset", "Delete the dataset.", parameters=ref),
            "Sweep": link("create_sweep", "Sweep LASER configs on the dataset.", body={"dataset": name})}


@router.post("", status_code=201, response_model=DatasetPublic, dependencies=[AdminAuth],
             responses={201: {"links": _dataset_links("$response.body#/name")},
                        409: {"description": "Name exists or is built in."},
                        422: {"model": DatasetRejected, "description": "Invalid fields, or bad rows by line; nothing "
                                                                      "stored."}})
async def create_dataset(body: DatasetCreate, services: ServicesDep) -> DatasetPublic | JSONResponse:
    """Upload a dataset (JSONL or a BIG-bench task); every bad row is reported and nothing is stored."""
    try:
        return await serving.create_dataset(services, body)
    except serving.DatasetRejectedError as e:
        return JSONResponse(e.body(), 422)


@router.get("", response_model=DatasetList, dependencies=[InferenceAuth],
            responses={200: {"links": _dataset_links("$response.body#/data/0/name")}})
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
                          409: {"description": "Built in, or used by an unfinished job."}})
async def delete_dataset(name: NamePath, services: ServicesDep) -> DatasetDeleted:
    """Delete an uploaded dataset."""
    return await serving.delete_dataset(services, name, jobs_serving.manager(services).in_use)
