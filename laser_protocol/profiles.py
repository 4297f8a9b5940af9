"""Protocol models of the profile routes (``/v1/profiles``): create, list, read, replace, delete, dry run."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from laser_protocol.interventions import InterventionSpec
from laser_protocol.validation import RequestModel, Text

PROFILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

ProfileName = Annotated[str, Field(
    pattern=PROFILE_NAME_PATTERN, min_length=1, max_length=64,
    description="Profile name: 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter "
                "or digit. 'base' is the unedited model.",
    examples=["late-fc-in"],
)]

MAX_INTERVENTIONS = 512


class ProfileBase(RequestModel):
    """What a profile holds: a description and the interventions applied together."""

    description: Text = Field("", max_length=2000, description="Free text shown in listings.")
    interventions: list[InterventionSpec] = Field(
        ..., max_length=MAX_INTERVENTIONS,
        description="The edits, applied together (the library's intervention spec: kind, target, layer, "
                    "rank_fraction | rank | energy, ...). Each matrix may be edited at most once. "
                    "An empty list is the unedited model under another name.",
        examples=[[{"kind": "laser", "target": "fc_in", "layer": -2, "rank_fraction": 0.01}]],
    )


class ProfileCreate(ProfileBase):
    """Body of ``POST /v1/profiles``."""

    name: ProfileName


class ProfileUpdate(ProfileBase):
    """Body of ``PUT /v1/profiles/{name}``: the profile's new content (the name comes from the path)."""


class ProfilePublic(BaseModel):
    """A stored profile as the API shows it."""

    name: str = Field(..., description="Profile name.")
    description: str = Field("", description="Free text.")
    interventions: list[InterventionSpec] = Field(..., description="The edits, as stored.")
    reserved: bool = Field(False, description="True for 'base' (the unedited model; cannot be changed).")
    matrices: int = Field(..., description="Number of weight matrices the interventions expand to on this model.")
    active: bool = Field(..., description="True when this profile's weights are live in the model right now.")
    created_at: float | None = Field(None, description="Unix time of creation (None for base).")
    updated_at: float | None = Field(None, description="Unix time of the last change (None for base).")


class ProfileList(BaseModel):
    """All profiles, 'base' first, then by name."""

    data: list[ProfilePublic] = Field(..., description="Profiles.")


class MatrixEditReport(BaseModel):
    """What one intervention does to one matrix (dry run)."""

    index: int = Field(..., description="Position of the intervention in the profile.")
    type: str = Field(..., description="LASER type of the matrix (fc_in, q_proj, ...).")
    layer: int = Field(..., description="0-based layer.")
    param_name: str = Field(..., description="Parameter holding the matrix.")
    shape: tuple[int, int] = Field(..., description="Logical (out, in) shape.")
    kind: str = Field(..., description="Edit kind.")
    k: int | None = Field(None, description="Rank kept (None where rank is not the knob, e.g. prune_magnitude).")
    retained_energy: float | None = Field(
        None, description="Fraction of the sum of squared singular values kept (laser, laser_mp, keep_bottom).")
    frobenius_error: float = Field(..., description="||W - W_edited||_F.")
    relative_frobenius_error: float = Field(..., description="||W - W_edited||_F / ||W||_F.")


class ProfileDryRun(BaseModel):
    """Answer of a create or replace with ``?dry_run=true``: the per-matrix effect, nothing stored."""

    name: str = Field(..., description="The profile name that was checked.")
    dry_run: bool = Field(True, description="Always true: nothing was stored.")
    matrices: list[MatrixEditReport] = Field(..., description="One entry per edited matrix.")


class ProfileDeleted(BaseModel):
    """Answer of ``DELETE /v1/profiles/{name}``."""

    name: str = Field(..., description="The deleted profile.")
    deleted: bool = Field(True, description="Always true (an unknown name answers 404).")
