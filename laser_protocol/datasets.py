"""Datasets on the wire: how an example becomes a prompt (:class:`PromptFormat`, BIG-bench's prefix semantics)
and the models of the dataset routes (``/v1/datasets``): upload, list, read, delete. Parsing and splitting are
:mod:`laser_ops.datasets`.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from laser_protocol.errors import ErrorBody
from laser_protocol.validation import JsonValue, RequestModel, Text

DatasetKind = Literal["multiple_choice", "generation"]


TEMPLATE_FIELDS = ("input", "choices")


def check_template(template: str) -> None:
    """ValueError unless ``template`` uses only the plain placeholders {input} (required) and {choices}.

    ``str.format`` would also evaluate ``{input.attr}``, ``{input[0]}``, ``{input!r}`` and format specs such as
    ``{choices:>50000000}`` (a few bytes that render to megabytes): all are refused, so rendering a stored
    template can neither fail nor blow up.
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template is not a valid template: {e} (write {{{{ and }}}} for literal braces)") from None
    names = []
    for _literal, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS:
            raise ValueError(f"template placeholder {{{name}}} is not allowed: use only {{input}} and {{choices}} "
                             "(no attribute or index access, no positional fields)")
        if conversion is not None or spec:
            raise ValueError(f"template placeholder {{{name}}} has a conversion or format spec "
                             f"({'!' + conversion if conversion else ''}{':' + spec if spec else ''}); "
                             f"write plain {{{name}}}")
        names.append(name)
    if "input" not in names:
        raise ValueError("template must contain the placeholder {input}")


class PromptFormat(BaseModel):
    """How an example's input becomes a prompt (BIG-bench prefix semantics)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_prefix: Text = Field("", description="Text put before every prompt (e.g. the task instructions).")
    example_input_prefix: Text = Field("", description="Text put before the example's input (ignored with "
                                                       "template).")
    example_output_prefix: Text = Field(" ", description="Text put after the input, just before the answer "
                                                         "(ignored with template).")
    choice_prefix: Text = Field("\n  choice: ", description="Text put before each choice where the choices are "
                                                            "listed (append_choices_to_input, or {choices} in "
                                                            "template).")
    append_choices_to_input: bool = Field(False, description="Append the choices, each after choice_prefix, to "
                                                             "the input (with a template lacking {choices}: after "
                                                             "the rendered template).")
    template: Text | None = Field(None, description=(
        "Optional template with the placeholder {input} (and optionally {choices}); replaces the input/output "
        "prefixes. Only these two plain placeholders are allowed (no attribute or index access, conversion or "
        "format spec); write {{ and }} for literal braces."))

    @field_validator("template")
    @classmethod
    def _check_template(cls, v: str | None) -> str | None:
        if v is not None:
            check_template(v)
        return v

    def render(self, text: str, choices: Sequence[str] = ()) -> str:
        listed = self.choice_prefix + self.choice_prefix.join(choices) if choices else ""
        if self.template is not None:
            body = self.template.format(input=text, choices=listed)
            if self.append_choices_to_input and "{choices}" not in self.template:
                body += listed
            return self.task_prefix + body
        if self.append_choices_to_input:
            text = text + listed
        return self.task_prefix + self.example_input_prefix + text + self.example_output_prefix


DATASET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SAMPLE_SIZE = 3


class DatasetCreate(RequestModel):
    """Body of ``POST /v1/datasets``: the file's text (or a BIG-bench task object) and how to read it."""

    name: str = Field(..., pattern=DATASET_NAME_PATTERN, max_length=64,
                      description="Dataset name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                                  "digit; never a path. Built-in names are reserved.", examples=["my-qa"])
    format: Literal["jsonl", "bigbench"] = Field(..., description="'jsonl': one example per line "
                                                                  "({input, choices, answer} | {input, targets}); "
                                                                  "'bigbench': a BIG-bench JSON task.")
    content: Text | dict[str, JsonValue] = Field(..., description="The JSONL text, or the BIG-bench task as a "
                                                                 "JSON string or object.")
    kind: DatasetKind | None = Field(None, description="Expected kind; rows of the other kind are reported as "
                                                       "bad. Default: inferred from the rows.")
    prompt_template: Text | None = Field(None, max_length=4000, description=(
        "Template with the placeholder {input} (and optionally {choices}), e.g. 'Q: {input}\\nA:'; only these "
        "two plain placeholders (no attribute or index access, conversion or format spec; {{ and }} are literal "
        "braces). For BIG-bench tasks it replaces the input/output prefixes (task_prefix is kept)."))
    single_target_only: bool = Field(False, description="BIG-bench generation: drop examples with more than "
                                                        "one accepted target (the paper's WikidataQA).")
    description: Text = Field("", max_length=2000, description="Free text shown in listings.")


class BadRow(BaseModel):
    """One problem found while importing (``line``: 1-based JSONL line or BIG-bench example number)."""

    line: int | None = Field(None, description="1-based line (JSONL) or example number (BIG-bench); None for "
                                               "file-level problems.")
    message: str = Field(..., description="What is wrong with it.")


class DatasetRejected(ErrorBody):
    """422 answer of ``POST /v1/datasets``: the request's invalid fields, or every bad row of the upload (each
    in ``detail`` with loc ['body', 'content', line], and by line in ``errors``); nothing is stored either way."""

    errors: list[BadRow] = Field(default_factory=list, description="The bad rows, by line number (empty when a "
                                                                   "request field, not the content, is at fault).")


class ExampleSample(BaseModel):
    """One example as the model sees it."""

    id: int = Field(..., description="Position in the source file (0-based).")
    input: str = Field(..., description="The example's input field.")
    prompt: str = Field(..., description="The rendered prompt (format and template applied).")
    choices: list[str] = Field(default_factory=list, description="Candidates (multiple choice).")
    correct: list[int] = Field(default_factory=list, description="Indices of the correct choices.")
    targets: list[str] = Field(default_factory=list, description="Accepted answers (generation).")


class DatasetSummary(BaseModel):
    """A dataset in listings."""

    name: str = Field(..., description="Dataset name (what a sweep's 'dataset' field takes).")
    kind: DatasetKind = Field(..., description="multiple_choice or generation.")
    size: int = Field(..., description="Number of examples.")
    builtin: bool = Field(False, description="Shipped with the server (cannot be deleted or replaced).")
    source: str | None = Field(None, description="Where it came from.")
    description: str = Field("", description="Free text.")
    created_at: float | None = Field(None, description="Unix time of upload (None for built-ins).")


class DatasetPublic(DatasetSummary):
    """One dataset: summary, prompt format and a sample."""

    format: PromptFormat = Field(..., description="How an example becomes a prompt (BIG-bench prefixes).")
    sample: list[ExampleSample] = Field(..., description=f"The first {SAMPLE_SIZE} examples.")


class DatasetList(BaseModel):
    """Built-in datasets first, then uploads by name."""

    data: list[DatasetSummary] = Field(..., description="Datasets.")


class DatasetDeleted(BaseModel):
    """Answer of ``DELETE /v1/datasets/{name}``."""

    name: str = Field(..., description="The deleted dataset.")
    deleted: bool = Field(True, description="Always true (an unknown name answers 404).")
