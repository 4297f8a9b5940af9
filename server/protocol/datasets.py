"""Protocol models of the dataset routes (``/v1/datasets``): upload, list, read, delete."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from laser_ops.datasets import DatasetKind, PromptFormat
from server.protocol.errors import ErrorBody
from server.protocol.validation import JsonValue, RequestModel, Text

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
