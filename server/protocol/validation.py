"""What every request model shares: the library's input checks (well-formed text, finite numbers, strict
types, bounded JSON) and cross-field rules written into the JSON schema, so the schema says what the server
accepts.

A rule such as "give exactly one of prompt or prompts" is checked by the model's validator *and* stated in its
schema with :func:`one_of_groups`; null counts as absent on both sides.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from laser_ops.validation import REQUEST_CONFIG, Int, IntRange, JsonValue, Text

__all__ = ["Int", "IntRange", "JsonValue", "RequestModel", "Text", "one_of_groups"]


class RequestModel(BaseModel):
    """Base of request bodies: unknown fields refused, strict types, finite floats (see ``REQUEST_CONFIG``)."""

    model_config = REQUEST_CONFIG


def one_of_groups(*groups: dict[str, str], optional: bool = False) -> dict[str, Any]:
    """JSON schema for "exactly one of these groups of fields is given" (``optional``: at most one).

    Each group maps its fields to their JSON type; a group is given when all its fields are present and not
    null, and then every field of the other groups must be absent or null. The alternatives exclude each
    other, so ``oneOf`` holds exactly when the model's own check passes.
    """
    names = [f for g in groups for f in g]
    alternatives: list[dict[str, Any]] = []
    for group in groups:
        props: dict[str, Any] = {f: {"type": "null"} for f in names if f not in group}
        props.update({f: {"type": t} for f, t in group.items()})
        alternatives.append({"required": list(group), "properties": props})
    if optional:
        alternatives.append({"properties": {f: {"type": "null"} for f in names}})
    return {"oneOf": alternatives}
