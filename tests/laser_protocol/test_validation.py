"""Input checks shared by every request model: text, finite numbers, JSON integers, bounded nesting."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import BaseModel, ValidationError

from laser_protocol.validation import (
    MAX_JSON_DEPTH,
    REQUEST_CONFIG,
    InputError,
    Int,
    IntRange,
    JsonValue,
    Text,
    check_json_value,
    loads_strict,
    surrogate_error,
)


class Model(BaseModel):
    model_config = REQUEST_CONFIG

    text: Text = ""
    count: Int = 0
    bounded: IntRange(ge=1, le=5) | None = None
    ratio: float = 0.5
    extra: JsonValue = None


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("text", "ok \ud800", "lone UTF-16 surrogate (\\ud800) at character 3"),
    ("text", 5, "valid string"),
    ("count", True, "not a boolean"),
    ("count", "5", "valid integer"),
    ("count", 1.5, "valid integer"),
    ("bounded", 0, "greater than or equal to 1"),
    ("bounded", 6.0, "less than or equal to 5"),
    ("ratio", math.nan, "finite number"),
    ("ratio", math.inf, "finite number"),
    ("ratio", "0.5", "valid number"),
    ("extra", {"a": [1, math.nan]}, "['a'][1]: must be a finite number"),
    ("extra", {"\udc00": 1}, "key contains a lone UTF-16 surrogate"),
])
def test_refused_values_name_the_problem(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Model(**{field: value})
    err = exc.value.errors()[0]
    assert err["loc"][0] == field and fragment in err["msg"], err


def test_json_integers_are_ints() -> None:
    m = Model(count=5.0, bounded=3.0, ratio=1)
    assert m.count == 5 and isinstance(m.count, int) and m.bounded == 3 and m.ratio == 1.0
    schema = Model.model_json_schema()["properties"]
    assert schema["bounded"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 5}


def test_surrogates_are_found_only_when_alone() -> None:
    assert surrogate_error("plain ascii") is None
    assert surrogate_error("emoji \U0001f600 and accents é") is None
    assert surrogate_error("\ud83d") is not None


def test_loads_strict_refuses_what_json_cannot_write_back() -> None:
    assert loads_strict('{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    for text, fragment in (("NaN", "not a JSON number"), ("[Infinity]", "not a JSON number"),
                           ('{"a": 1e999}', "finite"), ('["\\ud800"]', "surrogate"),
                           ("[" * 100_000 + "]" * 100_000, "nested deeper"),
                           ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "nested deeper")):
        with pytest.raises(ValueError, match=fragment):
            loads_strict(text)
    with pytest.raises(json.JSONDecodeError):
        loads_strict("{")


def test_check_json_value_locates_the_problem() -> None:
    with pytest.raises(InputError) as exc:
        check_json_value({"rows": [{"score": 1.0}, {"score": -math.inf}]})
    assert exc.value.path == ("rows", 1, "score")
    assert check_json_value([[[]]], max_depth=3) == [[[]]]
    with pytest.raises(InputError):
        check_json_value([[[[]]]], max_depth=3)
