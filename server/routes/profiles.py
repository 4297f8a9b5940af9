"""Routes: named edit profiles (admin key for mutations, inference key to read)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from server.deps import ServicesDep
from laser_protocol.profiles import (
    PROFILE_NAME_PATTERN,
    ProfileCreate,
    ProfileDeleted,
    ProfileDryRun,
    ProfileList,
    ProfilePublic,
    ProfileUpdate,
)
from server.openapi import link
from server.routing import ApiRoute
from server.security import AdminAuth, InferenceAuth
from server.serving import profiles as serving

router = APIRouter(prefix="/v1/profiles", tags=["profiles"], route_class=ApiRoute)

NamePath = Annotated[str, Path(pattern=PROFILE_NAME_PATTERN, max_length=64, description="Profile name.")]
DryRun = Annotated[bool, Query(description="Validate and report per-matrix k, retained energy and Frobenius "
                                           "error without storing anything.")]
_ERRORS = {422: {"description": "Invalid profile (or one this model cannot apply); the error names the field."}}
_NAME = {"name": "$response.body#/name"}
#: From a stored profile to what can be done with it (the stateful tests follow these).
_PROFILE_LINKS = {
    "GetProfile": link("get_profile", "Read the profile.", parameters=_NAME),
    "ReplaceProfile": link("replace_profile", "Replace the profile.", parameters=_NAME),
    "DeleteProfile": link("delete_profile", "Delete the profile.", parameters=_NAME),
    "ExportProfile": link("export_profile", "Export the profile as a Hugging Face folder.", parameters=_NAME),
    "Generate": link("generate", "Generate with the profile.", body={"profile": "$response.body#/name"}),
    "Score": link("score", "Score with the profile.", body={"profile": "$response.body#/name"}),
}


@router.get("", response_model=ProfileList, dependencies=[InferenceAuth], responses={200: {"links": {
    "GetProfile": link("get_profile", "Read the first profile.", parameters={"name": "$response.body#/data/0/name"}),
}}})
async def list_profiles(services: ServicesDep) -> ProfileList:
    """List every profile, 'base' first."""
    return serving.list_profiles(services)


@router.post("", status_code=201, response_model=ProfilePublic | ProfileDryRun, dependencies=[AdminAuth],
             responses={200: {"model": ProfileDryRun, "description": "Dry run: nothing stored."},
                        201: {"links": _PROFILE_LINKS},
                        409: {"description": "Name exists or is reserved."}, **_ERRORS})
async def create_profile(body: ProfileCreate, services: ServicesDep, request: Request, response: Response,
                         dry_run: DryRun = False) -> ProfilePublic | ProfileDryRun:
    """Create a profile (validated against the loaded model); with dry_run, only report its effect."""
    if dry_run:
        response.status_code = 200
        return await serving.dry_run(services, body.name, body)
    created = await serving.create_profile(services, body.name, body)
    request.state.profile = created.name
    return created


@router.get("/{name}", response_model=ProfilePublic, dependencies=[InferenceAuth],
            responses={404: {"description": "Unknown profile."}})
async def get_profile(name: NamePath, services: ServicesDep) -> ProfilePublic:
    """Read one profile."""
    return serving.get_profile(services, name)


@router.put("/{name}", response_model=ProfilePublic | ProfileDryRun, dependencies=[AdminAuth],
            responses={200: {"links": _PROFILE_LINKS},
                       201: {"model": ProfilePublic, "description": "Created.", "links": _PROFILE_LINKS},
                       409: {"description": "Reserved name."}, **_ERRORS})
async def replace_profile(name: NamePath, body: ProfileUpdate, services: ServicesDep, request: Request,
                          response: Response, dry_run: DryRun = False) -> ProfilePublic | ProfileDryRun:
    """Replace a profile (or create it); live traffic uses the new edits from the next batch on."""
    if dry_run:
        return await serving.dry_run(services, name, body)
    profile, created = await serving.replace_profile(services, name, body)
    if created:
        response.status_code = 201
    request.state.profile = name
    return profile


@router.delete("/{name}", response_model=ProfileDeleted, dependencies=[AdminAuth],
               responses={404: {"description": "Unknown profile."}, 409: {"description": "'base' is reserved."},
                          **_ERRORS})
async def delete_profile(name: NamePath, services: ServicesDep) -> ProfileDeleted:
    """Delete a profile; queued requests naming it answer 404."""
    return await serving.delete_profile(services, name)
