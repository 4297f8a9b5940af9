"""Checks every inference route shares: which profile serves a request, and the size limits."""

from __future__ import annotations

from fastapi import Request

from server.errors import ApiError
from server.state import Services


def resolve_profile(services: Services, request: Request, name: str | None, *,
                    loc: tuple[str | int, ...] = ("body", "profile")) -> str:
    """The profile that serves this request (``default_profile`` when unnamed); 404 if unknown.

    Also labels the request's metrics with the profile.
    """
    profile = name or services.settings.default_profile
    if profile not in services.profiles:
        known = ["base", *(p.name for p in services.profiles.list())]
        raise ApiError(404, f"unknown profile {profile!r}; known profiles: {known}", loc)
    request.state.profile = profile
    return profile


async def profile_ready(services: Services, profile: str) -> None:
    """Wait while ``profile``'s decompositions are computed off the owner thread (just created or replaced),
    so that its first request does not decompose on the owner thread and hold every other request."""
    await services.decomposer.ready(profile)


def check_prompt_tokens(services: Services, n_tokens: int, loc: tuple[str | int, ...]) -> None:
    limit = services.settings.max_prompt_tokens
    if n_tokens > limit:
        raise ApiError(413, f"prompt has {n_tokens} tokens; the limit is {limit} (max_prompt_tokens)", loc)


#: Characters per token no tokenizer exceeds in practice: longer texts are refused before tokenizing.
MAX_CHARS_PER_TOKEN = 32


def check_prompt_chars(services: Services, text: str, loc: tuple[str | int, ...], what: str = "prompt") -> None:
    """413 for a text far over ``max_prompt_tokens`` by its length alone, so it is never tokenized."""
    limit = services.settings.max_prompt_tokens
    if len(text) > limit * MAX_CHARS_PER_TOKEN:
        raise ApiError(413, f"{what} of {len(text)} characters is far over the {limit}-token limit "
                            "(max_prompt_tokens)", loc)


def check_new_tokens(services: Services, n: int, loc: tuple[str | int, ...]) -> None:
    limit = services.settings.max_new_tokens
    if not 0 <= n <= limit:
        raise ApiError(422, f"{loc[-1]} must be in 0..{limit}, got {n}", loc)
