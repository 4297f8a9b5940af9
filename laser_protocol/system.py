"""Protocol models of the health, readiness and info routes."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: str = Field("ok", description="Always 'ok' while the process serves HTTP.")


class Readiness(BaseModel):
    ready: bool = Field(..., description="True once the model is loaded and profiles are restored.")
    detail: str = Field("", description="Why not ready (loading, or the load error).")


class LaserTypeInfo(BaseModel):
    module: str = Field(..., description="Module path with a {layer} placeholder.")
    shape: tuple[int, int] = Field(..., description="Logical (out, in) shape of the matrix.")
    fused: bool = Field(..., description="True when the matrix is a slice of a fused q/k/v projection.")
    stored_transposed: bool = Field(..., description="True for GPT-2 Conv1D weights (stored in x out).")


class Info(BaseModel):
    model_id: str = Field(..., description="Model name (alias, folder or GGUF stem).")
    source: str = Field(..., description="What was loaded (alias, folder or file path).")
    fingerprint: str = Field(..., description="Hash of the weights' identity; keys every cache.")
    architecture: str = Field(..., description="Registered laser-serve architecture family.")
    model_type: str = Field(..., description="transformers model_type.")
    num_layers: int = Field(..., description="Transformer layers (0-based indexes in interventions).")
    laser_types: dict[str, LaserTypeInfo] = Field(..., description="LASER types this architecture has.")
    groups: dict[str, list[str]] = Field(..., description="Group name -> types it expands to.")
    dtype: str = Field(..., description="Torch dtype of the weights, e.g. 'float16'.")
    device: str = Field(..., description="Device the model runs on, e.g. 'cuda:0' or 'cpu'.")
    version: str = Field(..., description="laser-serve version.")
    active_profile: str | None = Field(None, description="Profile whose weights are live right now.")
    profiles: int = Field(..., description="Stored profiles (not counting base).")
    default_profile: str = Field(..., description="Profile used when a request names none.")
