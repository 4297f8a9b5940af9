"""Tests for laser_ops.datasets: parsers, error reporting by line, built-ins and the seeded split."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from laser_ops.datasets import (
    Dataset,
    DatasetError,
    PromptFormat,
    builtin_dataset,
    builtin_datasets,
    load_dataset,
    parse_bigbench,
    parse_jsonl,
    stratified_split,
)


def _jsonl(*rows: object) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


def test_jsonl_row_forms() -> None:
    ds = parse_jsonl(_jsonl(
        {"input": "Is it?", "choices": ["yes", "no"], "answer": 1},
        {"input": "Colour?", "choices": ["red", "blue", "green"], "answer": "green"},
        {"input": "Pick", "target_scores": {"a": 0, "b": 1, "c": 1}},
    ), "mc")
    assert ds.kind == "multiple_choice"
    assert [e.gold for e in ds.examples] == [1, 2, 1]
    assert ds.examples[2].correct == [1, 2]
    gen = parse_jsonl(_jsonl({"input": "Capital of France is", "target": "Paris"},
                             {"input": "Capital of Italy is", "targets": ["Rome", "Roma"]}), "gen")
    assert gen.kind == "generation"
    assert gen.examples[1].targets == ["Rome", "Roma"]
    assert gen.prompt(gen.examples[0]) == "Capital of France is "


def test_bad_rows_are_all_reported_by_line_number() -> None:
    text = _jsonl(
        {"input": "ok", "choices": ["a", "b"], "answer": 0},
        {"input": "bad index", "choices": ["a", "b"], "answer": 5},
        "",
        "{not json",
        {"choices": ["a", "b"], "answer": 0},
        {"input": "x", "choices": ["a", "b"], "answer": "c"},
        {"input": "y", "target_scores": {"a": 0, "b": 0}},
    )
    with pytest.raises(DatasetError) as info:
        parse_jsonl(text, "t")
    lines = [e["line"] for e in info.value.errors]
    assert lines == [2, 4, 5, 6, 7]
    assert "out of range 0..1" in info.value.errors[0]["message"]
    assert "input" in info.value.errors[2]["message"]
    assert "line 2" in str(info.value)


def test_mixed_kinds_and_empty_are_refused() -> None:
    with pytest.raises(DatasetError, match="mixes"):
        parse_jsonl(_jsonl({"input": "a", "target": "b"}, {"input": "c", "choices": ["d", "e"], "answer": 0}), "t")
    with pytest.raises(DatasetError, match="no examples"):
        parse_jsonl("\n\n", "t")


def test_bigbench_prefixes_and_defaults() -> None:
    task = {"name": "toy", "task_prefix": "Answer.\n", "example_input_prefix": "\nQ: ",
            "example_output_prefix": "\nA: ", "choice_prefix": " option: ", "append_choices_to_input": True,
            "examples": [{"input": "2+2?", "target_scores": {"4": 1, "5": 0}}]}
    ds = parse_bigbench(task)
    assert ds.prompt(ds.examples[0]) == "Answer.\n\nQ: 2+2? option: 4 option: 5\nA: "
    bare = parse_bigbench({"examples": [{"input": "2+2?", "target_scores": {"4": 1, "5": 0}}]}, "bare")
    assert bare.prompt(bare.examples[0]) == "\nQ: 2+2?\n  choice: 4\n  choice: 5\nA: "
    with pytest.raises(DatasetError) as info:
        parse_bigbench({"examples": [{"input": "a", "target": "b"}, {"input": ""}, {"target": "x"}]})
    assert [e["line"] for e in info.value.errors] == [2, 3]


def test_template_format() -> None:
    fmt = PromptFormat(template="Q: {input}\nA:")
    assert fmt.render("hi") == "Q: hi\nA:"
    with pytest.raises(ValueError, match="input"):
        PromptFormat(template="no placeholder")


def test_builtins_load_with_canary_and_single_targets() -> None:
    assert builtin_datasets() == ["epistemic_reasoning", "qa_wikidata"]
    er = builtin_dataset("epistemic_reasoning")
    assert len(er) == 2000 and er.kind == "multiple_choice"
    assert er.canary and "canary GUID" in er.canary
    p = er.prompt(er.examples[0])
    assert p.startswith("Identify the relation") and p.endswith("\nRelation: ")
    qa = builtin_dataset("qa_wikidata")
    assert qa.kind == "generation" and len(qa) == 18933
    assert all(len(e.targets) == 1 for e in qa.examples)
    with pytest.raises(KeyError, match="available"):
        builtin_dataset("nope")


def test_load_dataset_from_files(tmp_path) -> None:
    (tmp_path / "d.jsonl").write_text(_jsonl({"input": "a", "target": "b"}))
    assert load_dataset(tmp_path / "d.jsonl").name == "d"
    (tmp_path / "t.json").write_text(json.dumps({"examples": [{"input": "a", "target": "b"}]}))
    assert load_dataset(tmp_path / "t.json").kind == "generation"


def _mc(n_pos: int, n_neg: int) -> Dataset:
    rows = [{"input": f"q{i}", "choices": ["yes", "no"], "answer": 0 if i < n_pos else 1}
            for i in range(n_pos + n_neg)]
    return parse_jsonl(_jsonl(*rows), "mc")


def test_split_is_stratified_seeded_and_disjoint() -> None:
    ds = _mc(30, 70)
    s = stratified_split(ds, 0.2, seed=1)
    assert len(s.validation) == 20 and len(s.test) == 80
    assert Counter(e.gold for e in s.validation.examples) == {0: 6, 1: 14}
    ids_v = {e.id for e in s.validation.examples}
    assert ids_v.isdisjoint(e.id for e in s.test.examples)
    assert ids_v | {e.id for e in s.test.examples} == set(range(100))
    assert ids_v == {e.id for e in stratified_split(ds, 0.2, seed=1).validation.examples}
    assert ids_v != {e.id for e in stratified_split(ds, 0.2, seed=2).validation.examples}
    er = stratified_split(builtin_dataset("epistemic_reasoning"))
    assert len(er.validation) == 400
    share = sum(e.choices[e.gold] == "entailment" for e in er.validation.examples) / 400
    assert abs(share - 741 / 2000) < 1 / 400
    with pytest.raises(ValueError, match="validation_fraction"):
        stratified_split(ds, 1.5)


# ---------------------------------------------------------------------------------------------- properties

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from laser_ops.datasets import DatasetError, PromptFormat  # noqa: E402

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=6), st.just("\ud800"))
_ROWS = st.one_of(
    st.fixed_dictionaries({"input": st.text(min_size=1, max_size=8),
                           "choices": st.lists(st.text(min_size=1, max_size=4), min_size=2, max_size=4, unique=True),
                           "answer": st.integers(0, 3)}),
    st.fixed_dictionaries({"input": st.text(min_size=1, max_size=8),
                           "target_scores": st.dictionaries(st.text(min_size=1, max_size=4),
                                                            st.one_of(st.integers(0, 1), st.floats()),
                                                            min_size=2, max_size=3)}),
    st.fixed_dictionaries({"input": _SCALARS, "targets": st.lists(_SCALARS, max_size=2)}),
    st.dictionaries(st.sampled_from(["input", "choices", "answer", "target", "x"]), _SCALARS, max_size=4),
)
_LINES = st.one_of(_ROWS.map(lambda r: json.dumps(r, allow_nan=True)), st.text(max_size=10),
                   st.integers(1, 60).map(lambda n: "[" * n + "]" * n))
_TEMPLATES = st.one_of(st.none(), st.sampled_from(["Q: {input}\nA:", "{input} {choices}", "{{{input}}}"]),
                       st.text(alphabet="{}input.:>0!r[]", max_size=14))


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(_LINES, min_size=1, max_size=6), template=_TEMPLATES)
def test_any_upload_is_refused_or_usable(lines: list[str], template: str | None) -> None:
    """Never accepted-then-broken: a parsed dataset renders every prompt, round-trips through storage as JSON,
    and splits; anything else is a DatasetError (or a template error) naming the problem."""
    try:
        fmt = PromptFormat(template=template)
        ds = parse_jsonl("\n".join(lines), "prop", format=fmt)
    except DatasetError as e:
        assert e.errors and all(err["message"] for err in e.errors)
        return
    except ValueError as e:  # the template (a pydantic ValidationError)
        assert "template" in str(e)
        return
    prompts = [ds.prompt(e) for e in ds.examples]
    assert all(isinstance(p, str) and len(p) < 10_000 for p in prompts)
    again = Dataset.model_validate_json(ds.model_dump_json())  # what the store writes and reads back
    assert [again.prompt(e) for e in again.examples] == prompts
    json.dumps(again.model_dump(), allow_nan=False).encode("utf-8")
    if len(ds) >= 2:
        split = stratified_split(ds, 0.5, seed=0)
        assert len(split.validation) + len(split.test) == len(ds)
