"""Evaluation datasets for LASER validation sweeps: one typed model, two parsers, a seeded split.

A :class:`Dataset` is either ``multiple_choice`` (each example has candidate continuations and the
indices of the correct ones) or ``generation`` (each example has accepted answer strings). How an
example becomes a prompt is a :class:`PromptFormat`, which follows BIG-bench's JSON-task format::

    prompt = task_prefix + example_input_prefix + input
             [+ choice_prefix + choice_prefix.join(choices)   if append_choices_to_input]
             + example_output_prefix

and a multiple-choice candidate is scored as the continuation ``choice`` of that prompt (the scorer
moves the prompt's trailing space onto the continuation, as lm-evaluation-harness does). A
``template`` such as ``"Q: {input}\\nA:"`` replaces the input/output prefixes when given.

Parsers collect every bad row before failing: a :class:`DatasetError` carries one
``{"line": ..., "message": ...}`` per problem and nothing is half-imported.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from laser_protocol.datasets import DatasetKind, PromptFormat
from laser_protocol.validation import MAX_JSON_DEPTH, InputError, Text, check_json_value, loads_strict

logger = logging.getLogger(__name__)

#: BIG-bench's own defaults (bigbench/api/json_task.py) for keys a task file leaves out.
BIGBENCH_DEFAULTS: dict[str, Any] = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
}

#: Built-in tasks: name -> (file in laser_ops/data, parser options).
BUILTIN_DATASETS: dict[str, dict[str, Any]] = {
    "epistemic_reasoning": {"file": "epistemic_reasoning.json"},
    # The paper scores WikidataQA on examples with one accepted answer; a bare-string target is that.
    "qa_wikidata": {"file": "qa_wikidata.json", "single_target_only": True},
}


class DatasetError(ValueError):
    """A dataset that cannot be imported; ``errors`` lists every problem as ``{"line", "message"}``.

    ``line`` is the 1-based JSONL line, or the 1-based example number for a BIG-bench JSON task
    (``None`` for file-level problems).
    """

    def __init__(self, errors: list[dict[str, Any]], source: str = "dataset") -> None:
        self.errors = errors
        head = "; ".join(
            (f"line {e['line']}: " if e.get("line") is not None else "") + e["message"] for e in errors[:5]
        )
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"{source}: {len(errors)} bad row(s): {head}{more}")


class Example(BaseModel):
    """One example. ``id`` is its position in the source file (stable across splits)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int
    input: Text
    choices: list[Text] = Field(default_factory=list)
    correct: list[int] = Field(default_factory=list, description="Indices of every correct choice (MC).")
    targets: list[Text] = Field(default_factory=list, description="Accepted answers (generation).")

    @property
    def gold(self) -> int:
        """The gold choice scored for log-loss: the first correct one."""
        return self.correct[0]

    @property
    def gold_text(self) -> str:
        """The gold continuation (MC: the gold choice; generation: the first accepted answer)."""
        return self.choices[self.gold] if self.choices else self.targets[0]


class Dataset(BaseModel):
    """A named, typed list of examples plus the prompt format that turns them into scorer requests."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: DatasetKind
    examples: list[Example]
    format: PromptFormat = Field(default_factory=PromptFormat)
    source: str | None = None
    canary: str | None = None

    @model_validator(mode="after")
    def _check_examples(self) -> Dataset:
        for e in self.examples:
            if self.kind == "multiple_choice" and (len(e.choices) < 2 or not e.correct):
                raise ValueError(f"example {e.id}: multiple choice needs >= 2 choices and a correct index")
            if self.kind == "generation" and not e.targets:
                raise ValueError(f"example {e.id}: generation needs at least one target")
        return self

    def __len__(self) -> int:
        return len(self.examples)

    def prompt(self, example: Example) -> str:
        return self.format.render(example.input, example.choices)

    def choice_items(self) -> list[tuple[str, list[str]]]:
        """``(prompt, choices)`` per example, the input of ``Scorer.predict_choices``."""
        return [(self.prompt(e), list(e.choices)) for e in self.examples]

    def subset(self, indices: Iterable[int], name: str | None = None) -> Dataset:
        """The examples at these positions (not ids), same format."""
        picked = [self.examples[i] for i in indices]
        return self.model_copy(update={"examples": picked, "name": name or self.name})

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "examples": len(self.examples), "source": self.source}


class Split(BaseModel):
    """Validation (choose the config) and test (report it) parts of one dataset."""

    validation: Dataset
    test: Dataset
    seed: int
    validation_fraction: float


# ---------------------------------------------------------------------------------------------- parsing


def _as_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string")
    return value


def _example_from_row(row: Any, idx: int, *, single_target_only: bool = False) -> Example | None:
    """One example from a JSONL row or BIG-bench example; ``None`` to skip it (filtered, not bad)."""
    if not isinstance(row, dict):
        raise ValueError(f"row must be a JSON object, got {type(row).__name__}")
    if "input" not in row:
        raise ValueError("missing field 'input'")
    text = _as_text(row["input"], "'input'")
    forms = [k for k in ("choices", "target_scores", "targets", "target") if k in row]
    if "targets" in forms and "target" in forms:
        raise ValueError("give 'targets' or 'target', not both")
    if not forms:
        raise ValueError("needs one of: 'choices' + 'answer', 'target_scores', 'targets' or 'target'")
    if "choices" in row:
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("'choices' must be a list of >= 2 non-empty strings")
        if len(set(choices)) != len(choices):
            raise ValueError("'choices' has duplicates")
        if "answer" not in row:
            raise ValueError("'choices' needs 'answer' (an index or one of the choices)")
        answer = row["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (int, str)):
            raise ValueError("'answer' must be an index or one of the choice strings")
        if isinstance(answer, int):
            if not 0 <= answer < len(choices):
                raise ValueError(f"'answer' index {answer} out of range 0..{len(choices) - 1}")
            gold = answer
        elif answer in choices:
            gold = choices.index(answer)
        else:
            raise ValueError(f"'answer' {answer!r} is not one of the choices")
        return Example(id=idx, input=text, choices=list(choices), correct=[gold])
    if "target_scores" in row:
        scores = row["target_scores"]
        if not isinstance(scores, dict) or len(scores) < 2:
            raise ValueError("'target_scores' must map >= 2 choices to scores")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
            raise ValueError("'target_scores' values must be numbers")
        if not all(isinstance(k, str) and k for k in scores):
            raise ValueError("'target_scores' keys must be non-empty strings")
        best = max(scores.values())
        if best <= 0:
            raise ValueError("'target_scores' has no choice with a positive score")
        choices = list(scores)
        correct = [i for i, c in enumerate(choices) if scores[c] == best]
        return Example(id=idx, input=text, choices=choices, correct=correct)
    raw = row.get("targets", row.get("target"))
    targets = [raw] if isinstance(raw, str) else raw
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise ValueError("'targets'/'target' must be a non-empty string or a list of non-empty strings")
    if single_target_only and len(targets) != 1:
        return None
    return Example(id=idx, input=text, targets=list(targets))


def _row_kind(ex: Example) -> DatasetKind:
    return "multiple_choice" if ex.choices else "generation"


def _build(name: str, rows: Sequence[tuple[int | None, Any]], fmt: PromptFormat, *, source: str,
           kind: DatasetKind | None, single_target_only: bool = False, canary: str | None = None) -> Dataset:
    """Validate every row, then build the dataset, or raise one :class:`DatasetError` listing all problems."""
    errors: list[dict[str, Any]] = []
    parsed: list[tuple[int | None, Example]] = []
    for pos, (line, row) in enumerate(rows):
        try:
            ex = _example_from_row(row, pos, single_target_only=single_target_only)
        except ValueError as e:
            errors.append({"line": line, "message": str(e)})
            continue
        if ex is not None:
            parsed.append((line, ex))
    first: dict[str, int | None] = {}
    for line, ex in parsed:
        first.setdefault(_row_kind(ex), line)
    wanted: DatasetKind | None = kind or (_row_kind(parsed[0][1]) if len(first) == 1 else None)
    if wanted is None and len(first) > 1:
        errors.append({"line": first["generation"], "message": (
            "mixes multiple-choice and generation rows (first multiple-choice row at line "
            f"{first['multiple_choice']}); a dataset has one kind")})
    elif wanted is not None:
        errors.extend({"line": line, "message": f"row is not a {wanted} row"}
                      for line, ex in parsed if _row_kind(ex) != wanted)
    if not errors and not parsed:
        errors.append({"line": None, "message": "no examples"})
    if errors:
        raise DatasetError(errors, source)
    assert wanted is not None
    return Dataset(name=name, kind=wanted, examples=[ex for _, ex in parsed], format=fmt, source=source,
                   canary=canary)


def parse_jsonl(text: str, name: str, *, format: PromptFormat | None = None, kind: DatasetKind | None = None,
                source: str | None = None) -> Dataset:
    """A dataset from JSON lines; blank lines are skipped, every bad line is reported by number.

    Row forms: ``{input, choices, answer}`` (answer = index or choice string), ``{input, target_scores}``,
    ``{input, targets: [...]}`` or ``{input, target}``.
    """
    rows: list[tuple[int | None, Any]] = []
    errors: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, loads_strict(line, MAX_JSON_DEPTH)))
        except json.JSONDecodeError as e:
            errors.append({"line": number, "message": f"invalid JSON: {e.msg} (column {e.colno})"})
        except ValueError as e:  # NaN/Infinity, overflow, lone surrogates, nesting (InputError names the path)
            errors.append({"line": number, "message": _input_message(e)})
    try:
        dataset = _build(name, rows, format or PromptFormat(), source=source or name, kind=kind)
    except DatasetError as e:
        errors.extend(e.errors)
    if errors:
        errors.sort(key=lambda e: (e["line"] is None, e["line"] or 0))
        raise DatasetError(errors, source or name)
    return dataset


def parse_bigbench(task: dict[str, Any] | str, name: str | None = None, *, single_target_only: bool = False,
                   source: str | None = None) -> Dataset:
    """A dataset from a BIG-bench JSON task (its prefixes honoured, BIG-bench's defaults for missing ones).

    ``single_target_only`` drops examples with more than one accepted target (the paper's WikidataQA).
    Errors are reported by 1-based example number in ``line``.
    """
    try:
        task = loads_strict(task) if isinstance(task, str) else check_json_value(task)
    except json.JSONDecodeError as e:
        raise DatasetError([{"line": e.lineno, "message": f"invalid JSON: {e.msg}"}], source or "task") from None
    except InputError as e:
        raise _located(e, source or "task") from None
    except ValueError as e:  # a NaN or Infinity literal
        raise DatasetError([{"line": None, "message": str(e)}], source or "task") from None
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
        raise DatasetError([{"line": None, "message": "a BIG-bench task is an object with an 'examples' list"}],
                           source or "task")
    opts = {k: task.get(k, v) for k, v in BIGBENCH_DEFAULTS.items()}
    bad = [k for k, v in opts.items() if not isinstance(v, bool if k == "append_choices_to_input" else str)]
    if bad:
        raise DatasetError([{"line": None, "message": f"task field {k!r} has the wrong type"} for k in bad],
                           source or "task")
    name = name or str(task.get("name") or "task")
    rows = [(i + 1, ex) for i, ex in enumerate(task["examples"])]
    return _build(name, rows, PromptFormat(**opts), source=source or name, kind=None,
                  single_target_only=single_target_only, canary=task.get("canary"))


def _input_message(e: ValueError) -> str:
    where = "".join(f"[{p!r}]" for p in e.path) if isinstance(e, InputError) else ""
    return f"{where}: {e}" if where else str(e)


def _located(e: InputError, source: str) -> DatasetError:
    """A task-level :class:`InputError` as a dataset error, on the example it is in when it is in one."""
    path = e.path
    if len(path) >= 2 and path[0] == "examples" and isinstance(path[1], int):
        rest = "".join(f"[{p!r}]" for p in path[2:])
        return DatasetError([{"line": path[1] + 1, "message": f"{rest}: {e}" if rest else str(e)}], source)
    return DatasetError([{"line": None, "message": _input_message(e)}], source)


def load_dataset(path: str | Path, name: str | None = None, **kwargs: Any) -> Dataset:
    """A dataset from a ``.jsonl`` file or a BIG-bench ``.json`` task file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return parse_jsonl(text, name or path.stem, source=str(path), **kwargs)
    return parse_bigbench(text, name or path.stem, source=str(path), **kwargs)


def builtin_datasets() -> list[str]:
    return sorted(BUILTIN_DATASETS)


def builtin_dataset(name: str) -> Dataset:
    """A BIG-bench task shipped in ``laser_ops/data`` (see its README for attribution)."""
    spec = BUILTIN_DATASETS.get(name)
    if spec is None:
        raise KeyError(f"unknown built-in dataset {name!r}; available: {builtin_datasets()}")
    text = resources.files("laser_ops").joinpath("data", spec["file"]).read_text(encoding="utf-8")
    return parse_bigbench(text, name, single_target_only=spec.get("single_target_only", False),
                          source=f"builtin:{name}")


# ---------------------------------------------------------------------------------------------- split


def stratified_split(dataset: Dataset, validation_fraction: float = 0.2, seed: int = 0) -> Split:
    """Seeded split into validation and test, stratified by gold label for multiple choice.

    Strata are the gold choice text when every example offers the same choices (e.g. entailment /
    non-entailment), otherwise the gold index. The validation size is ``round(fraction * n)``,
    shared out between strata by largest remainder, so label proportions match to within one
    example. Both parts keep file order. Different seeds give different splits; the same seed the same.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    n = len(dataset)
    if n < 2:
        raise ValueError(f"need at least 2 examples to split, got {n}")
    if dataset.kind == "multiple_choice":
        same_choices = len({tuple(e.choices) for e in dataset.examples}) == 1
        keys = [e.choices[e.gold] if same_choices else str(e.gold) for e in dataset.examples]
    else:
        keys = [""] * n
    strata: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        strata.setdefault(k, []).append(i)
    total = min(n - 1, max(1, round(validation_fraction * n)))
    exact = {k: validation_fraction * len(v) for k, v in strata.items()}
    take = {k: int(x) for k, x in exact.items()}
    for k in sorted(strata, key=lambda k: (-(exact[k] - take[k]), k))[: total - sum(take.values())]:
        take[k] += 1
    rng = random.Random(seed)
    val: list[int] = []
    for k in sorted(strata):
        members = list(strata[k])
        rng.shuffle(members)
        val.extend(members[: take[k]])
    val_set = set(val)
    return Split(
        validation=dataset.subset(sorted(val_set), f"{dataset.name}:validation"),
        test=dataset.subset([i for i in range(n) if i not in val_set], f"{dataset.name}:test"),
        seed=seed, validation_fraction=validation_fraction,
    )
