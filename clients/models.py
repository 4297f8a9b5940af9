"""Typed results of the client: mirrors of the server's protocol models (``server/protocol/*.py``).

They are redeclared here, not imported, so the client needs only httpx and pydantic (no torch). Every
model accepts unknown fields (``extra="allow"``): a newer server adding a field does not break an
older client. ``tests/clients/test_client.py`` checks that each mirror has every field of its
server model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class Model(BaseModel):
    """Base of every result: unknown fields kept, not rejected."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------------- system


class Health(Model):
    status: str = "ok"


class Readiness(Model):
    ready: bool
    detail: str = ""


class LaserTypeInfo(Model):
    module: str
    shape: tuple[int, int]
    fused: bool
    stored_transposed: bool


class Info(Model):
    model_id: str
    source: str
    fingerprint: str
    architecture: str
    model_type: str
    num_layers: int
    laser_types: dict[str, LaserTypeInfo]
    groups: dict[str, list[str]]
    dtype: str
    device: str
    version: str
    active_profile: str | None = None
    profiles: int
    default_profile: str


# ---------------------------------------------------------------------------------------------- profiles


class Profile(Model):
    """``ProfilePublic``. ``interventions`` are the library's spec dicts (kind, target, layer, ...)."""

    name: str
    description: str = ""
    interventions: list[dict[str, Any]]
    reserved: bool = False
    matrices: int
    active: bool
    created_at: float | None = None
    updated_at: float | None = None


class MatrixEditReport(Model):
    index: int
    type: str
    layer: int
    param_name: str
    shape: tuple[int, int]
    kind: str
    k: int | None = None
    retained_energy: float | None = None
    frobenius_error: float
    relative_frobenius_error: float


class ProfileDryRun(Model):
    name: str
    dry_run: bool = True
    matrices: list[MatrixEditReport]


class Deleted(Model):
    """``ProfileDeleted`` / ``DatasetDeleted`` / ``ExportDeleted``."""

    name: str
    deleted: bool = True


class JobDeleted(Model):
    id: str
    deleted: bool = True


# ---------------------------------------------------------------------------------------------- inference


class GenerateUsage(Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateChoice(Model):
    index: int
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(Model):
    profile: str
    profile_hash: str = ""  # hash of the interventions that computed the answer
    choices: list[GenerateChoice]
    usage: GenerateUsage

    @property
    def text(self) -> str:
        """The first (usually only) choice's text."""
        return self.choices[0].text if self.choices else ""


class GenerateStreamEvent(Model):
    """One streamed delta; the last event has ``finish_reason`` and ``usage``."""

    profile: str
    profile_hash: str = ""
    text: str = ""
    finish_reason: str | None = None
    usage: GenerateUsage | None = None


class ContinuationScore(Model):
    continuation: str
    logprob: float
    n_tokens: int
    mean_logprob: float | None = None
    is_greedy: bool


class PerplexityScore(Model):
    logprob: float
    n_tokens: int
    perplexity: float | None = None


class ScoreResponse(Model):
    profile: str
    profile_hash: str = ""
    continuations: list[ContinuationScore] | None = None
    argmax: int | None = None
    perplexity: PerplexityScore | None = None


class TextDiff(Model):
    index: int
    reference: str
    text: str
    first_difference: int


class GenerateDiff(Model):
    profile: str
    changed: list[TextDiff]


class ScoreDiff(Model):
    profile: str
    logprob_deltas: list[float] | None = None
    argmax: int | None = None
    argmax_changed: bool | None = None
    perplexity_delta: float | None = None


class CompareDiff(Model):
    reference: str
    any_changed: bool
    generate: list[GenerateDiff] | None = None
    score: list[ScoreDiff] | None = None


class CompareResponse(Model):
    profiles: list[str]
    generate: list[GenerateResponse] | None = None
    score: list[ScoreResponse] | None = None
    diff: CompareDiff


# ---------------------------------------------------------------------------------------------- datasets


class ExampleSample(Model):
    id: int
    input: str
    prompt: str
    choices: list[str] = []
    correct: list[int] = []
    targets: list[str] = []


class DatasetSummary(Model):
    name: str
    kind: str
    size: int
    builtin: bool = False
    source: str | None = None
    description: str = ""
    created_at: float | None = None


class Dataset(DatasetSummary):
    """``DatasetPublic``: summary, prompt format and a sample."""

    format: dict[str, Any]
    sample: list[ExampleSample]


# ---------------------------------------------------------------------------------------------- jobs


class Accuracy(Model):
    accuracy: float
    ci_low: float
    ci_high: float
    n_correct: int
    n: int
    log_loss: float | None = None


class LabelMetrics(Model):
    majority_label: str | None = None
    majority_accuracy: float = 0.0
    top_answer: str | None = None
    top_answer_share: float = 0.0
    collapsed: bool = False
    balanced_accuracy: float | None = None
    macro_f1: float | None = None


class SweepRow(Model):
    key: str
    step: int
    role: str
    type: str | None = None
    layer: int | None = None
    rho: float | None = None
    interventions: list[dict[str, Any]] = []
    validation: Accuracy | None = None
    labels: LabelMetrics | None = None
    collapsed: bool = False
    delta_accuracy: float | None = None
    delta_log_loss: float | None = None
    val_perplexity: float | None = None
    rejected: str | None = None
    eliminated: str | None = None
    kept: bool | None = None
    seconds: float = 0.0


class McNemar(Model):
    only_base: int
    only_winner: int
    p_value: float
    alpha: float
    significant: bool


class MajorityBaseline(Model):
    label: str
    accuracy: float
    mcnemar: McNemar
    beaten: bool


class TestReport(Model):
    __test__ = False

    winner_key: str
    interventions: list[dict[str, Any]]
    base: Accuracy
    winner: Accuracy
    base_labels: LabelMetrics | None = None
    winner_labels: LabelMetrics | None = None
    delta_accuracy: float
    mcnemar: McNemar
    majority: MajorityBaseline | None = None
    significant: bool
    verdict: str


class ExampleEvidence(Model):
    index: int
    id: int
    prompt: str
    choices: list[str] = []
    gold: str
    base_answer: str
    config_answer: str
    base_correct: bool
    config_correct: bool
    base_gold_logprob: float | None = None
    config_gold_logprob: float | None = None
    change: str


class ExamplePage(Model):
    """``ExamplePage``: per-example evidence of one config against base, one page."""

    job_id: str
    config: str
    split: str
    filter: str
    counts: dict[str, int]
    total: int
    offset: int
    limit: int
    data: list[ExampleEvidence]


class JobProgress(Model):
    """A job's progress: the payload of its SSE events."""

    type: Literal["progress", "state"] = "progress"
    id: str
    state: JobState
    done: int
    total: int | None = None
    progress: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    best: SweepRow | None = None
    last: SweepRow | None = None
    error: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class JobSummary(Model):
    id: str
    kind: str = "sweep"
    state: JobState
    dataset: str
    done: int
    total: int | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    owner: str | None = None
    heartbeat_at: float | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class Job(JobSummary):
    """``JobPublic``: state, progress, the per-config table and, when finished, the test report."""

    config: dict[str, Any]
    model_id: str | None = None
    model_fingerprint: str | None = None
    progress: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    stopped: str | None = None
    n_validation: int | None = None
    n_test: int | None = None
    base: SweepRow | None = None
    best: SweepRow | None = None
    beats_base_on_validation: bool | None = None
    rows: list[SweepRow]
    test: TestReport | None = None
    verdict: str | None = None
    example_evaluations: int | None = None
    full_grid_evaluations: int | None = None


# ---------------------------------------------------------------------------------------------- models (OpenAI)


class ModelCard(Model):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "laser-serve"
    root: str
    parent: str | None = None
    max_model_len: int | None = None
    description: str | None = None


# ---------------------------------------------------------------------------------------------- exports


class ExportFile(Model):
    name: str
    bytes: int
    sha256: str | None = None
    url: str


class ExportMatrix(Model):
    param_name: str
    type: str
    layer: int
    kind: str
    shape: tuple[int, int]
    k: int | None = None
    stored: str
    dense_bytes: int
    stored_bytes: int
    saved_bytes: int
    note: str | None = None


class ExportSummary(Model):
    name: str
    profile: str | None = None
    mode: str
    bytes: int
    saved_bytes: int = 0
    created_at: float | None = None


class Export(ExportSummary):
    """``ExportPublic``: files (size, SHA-256, URL) and the per-matrix report."""

    files: list[ExportFile]
    dense_bytes: int = 0
    factored_bytes: int = 0
    matrices: list[ExportMatrix] = []
    notes: list[str] = []
    profile_signature: str = ""
    fingerprint: str = ""
    seconds: float = 0.0
    load: str = ""


#: client model -> server protocol model it mirrors ("module:Class"), checked by the tests.
MIRRORS: dict[type[BaseModel], str] = {
    Health: "system:Health", Readiness: "system:Readiness", Info: "system:Info", LaserTypeInfo: "system:LaserTypeInfo",
    Profile: "profiles:ProfilePublic", MatrixEditReport: "profiles:MatrixEditReport",
    ProfileDryRun: "profiles:ProfileDryRun", Deleted: "profiles:ProfileDeleted",
    GenerateUsage: "inference:GenerateUsage", GenerateChoice: "inference:GenerateChoice",
    GenerateResponse: "inference:GenerateResponse", GenerateStreamEvent: "inference:GenerateStreamEvent",
    ContinuationScore: "inference:ContinuationScore", PerplexityScore: "inference:PerplexityScore",
    ScoreResponse: "inference:ScoreResponse", TextDiff: "inference:TextDiff", GenerateDiff: "inference:GenerateDiff",
    ScoreDiff: "inference:ScoreDiff", CompareDiff: "inference:CompareDiff", CompareResponse: "inference:CompareResponse",
    ExampleSample: "datasets:ExampleSample", DatasetSummary: "datasets:DatasetSummary", Dataset: "datasets:DatasetPublic",
    Accuracy: "jobs:Accuracy", SweepRow: "jobs:SweepRowPublic", McNemar: "jobs:McNemar", TestReport: "jobs:TestReportPublic",
    LabelMetrics: "jobs:LabelMetricsPublic", MajorityBaseline: "jobs:MajorityBaseline",
    ExampleEvidence: "jobs:ExampleEvidence", ExamplePage: "jobs:ExamplePage",
    JobProgress: "jobs:JobProgress", JobSummary: "jobs:JobSummary", Job: "jobs:JobPublic",
    JobDeleted: "jobs:JobDeleted",
    ModelCard: "openai:ModelCard",
    ExportFile: "exports:ExportFile", ExportMatrix: "exports:ExportMatrix", ExportSummary: "exports:ExportSummary",
    Export: "exports:ExportPublic",
}
