"""Input checks shared by every request model (the library's config schemas and the routes' bodies): well-formed
text, finite numbers, integers that are not booleans, JSON of bounded nesting; and cross-field rules written into
the JSON schema, so the schema says what the server accepts.

Python's ``json`` module reads ``NaN``, ``Infinity`` and ``1e400`` as non-finite floats, ``"\\ud800"`` as a
string holding a lone UTF-16 surrogate (which no tokenizer, SQLite or JSON encoder accepts) and nests as deep
as the interpreter's recursion limit allows. Every model that takes user input refuses these at the boundary,
with an error naming the field, so nothing that would break later is ever accepted or stored.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Tag

#: Deepest JSON nesting any input needs (a dataset row is 3 levels deep; a request body about 6).
MAX_JSON_DEPTH = 32

#: Model config of every request model: unknown fields refused, no silent type coercion ("1" is not an int,
#: true is not 1), NaN and infinities refused in float fields.
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

_SURROGATE = re.compile("[\ud800-\udfff]")


class InputError(ValueError):
    """Invalid input; ``path`` locates the offending value inside the checked one (JSON path parts)."""

    def __init__(self, message: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.path = path


def surrogate_error(text: str) -> str | None:
    """Why ``text`` is not well-formed Unicode (a lone surrogate, as JSON's ``\\ud800`` escape decodes), or None."""
    if text.isascii():
        return None
    bad = _SURROGATE.search(text)
    if bad is None:
        return None
    return (f"contains a lone UTF-16 surrogate (\\u{ord(bad.group()):04x}) at character {bad.start()}; "
            "send well-formed Unicode text")


def check_text(text: str) -> str:
    """``text`` unchanged, or ValueError if it holds a lone surrogate."""
    error = surrogate_error(text)
    if error is not None:
        raise ValueError(error)
    return text


def _json_int(value: Any) -> Any:
    """JSON's integers: ``5`` and ``5.0`` (JSON Schema's "integer" includes integral numbers), never ``true``
    nor ``"5"``; the strict int validation that follows refuses the rest."""
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: A string of well-formed Unicode (``Tag``: the name an error inside a union gives this case).
Text = Annotated[str, AfterValidator(check_text), Tag("str")]
#: An integer as JSON writes it (``5`` or ``5.0``); booleans and strings are refused.
Int = Annotated[int, BeforeValidator(_json_int), Tag("int")]


def IntRange(ge: int | None = None, le: int | None = None) -> Any:  # noqa: N802 - a type, named as one
    """An :data:`Int` within [ge, le]. Use it for optional fields (``IntRange(ge=1) | None``): bounds given on the
    field of an optional :data:`Int` would not reach the JSON schema."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_json_int), Tag("int")]


def _walk(value: Any, max_depth: int) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Every (path, scalar) inside a JSON value, iteratively; InputError past ``max_depth`` levels."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, (dict, list)):
            if len(path) >= max_depth:
                raise InputError(f"nested deeper than {max_depth} levels", path)
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                if isinstance(key, str) and surrogate_error(key) is not None:
                    raise InputError(f"key {surrogate_error(key)}", path)
                stack.append(((*path, key), child))
        else:
            yield path, node


def check_json_value(value: Any, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``value`` unchanged if it is JSON that any encoder can write back: finite numbers, well-formed strings,
    at most ``max_depth`` levels deep. Otherwise :class:`InputError` with the offending path."""
    for path, scalar in _walk(value, max_depth):
        if isinstance(scalar, float) and not math.isfinite(scalar):
            raise InputError(f"must be a finite number, got {scalar!r}", path)
        if isinstance(scalar, str):
            error = surrogate_error(scalar)
            if error is not None:
                raise InputError(error, path)
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_strict(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` refusing what :func:`check_json_value` refuses (``NaN``/``Infinity`` literals, numbers that
    overflow to infinity, lone surrogates, deep nesting); raises ValueError (``json.JSONDecodeError`` for
    syntax) or :class:`InputError`."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise InputError(f"nested deeper than {max_depth} levels") from None
    return check_json_value(value, max_depth)


def _json_value(value: Any) -> Any:
    try:
        return check_json_value(value)
    except InputError as e:
        where = "".join(f"[{p!r}]" for p in e.path)
        raise ValueError(f"{where}: {e}" if where else str(e)) from None


#: An arbitrary JSON value (object members, list items, ...) that is safe to store and to echo back.
JsonValue = Annotated[Any, AfterValidator(_json_value)]


class RequestModel(BaseModel):
    """Base of request bodies: unknown fields refused, strict types, finite floats (see ``REQUEST_CONFIG``)."""

    model_config = REQUEST_CONFIG


def one_of_groups(*groups: dict[str, str], optional: bool = False) -> dict[str, Any]:
    """JSON schema for "exactly one of these groups of fields is given" (``optional``: at most one).

    A rule such as "give exactly one of prompt or prompts" is checked by the model's validator *and* stated in its
    schema with this; null counts as absent on both sides. Each group maps its fields to their JSON type; a group
    is given when all its fields are present and not null, and then every field of the other groups must be absent
    or null. The alternatives exclude each other, so ``oneOf`` holds exactly when the model's own check passes.
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
