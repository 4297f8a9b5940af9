"""Protocol models of the sweep job routes (``/v1/jobs``): create, list, read, events, cancel, promote."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from laser_protocol.sweeps import SweepConfig
from laser_protocol.datasets import DATASET_NAME_PATTERN
from laser_protocol.profiles import ProfileName
from laser_protocol.validation import RequestModel, Text

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class SweepJobCreate(SweepConfig):
    """Body of ``POST /v1/jobs/sweeps``: a sweep config (see laser_ops.sweeps.SweepConfig) and its dataset."""

    dataset: str = Field(..., pattern=DATASET_NAME_PATTERN, max_length=64, description=(  # type: ignore[assignment]
        "Name of an uploaded or built-in dataset (epistemic_reasoning, qa_wikidata)."),
        examples=["epistemic_reasoning"])
    ray_address: str | None = Field(None, max_length=256, description=(
        "Evaluate this job's steps on a pool of Ray actors at this address ('local' starts a local cluster); "
        "unset: the server's ray_address setting, else in-process on the engine thread."))


class Accuracy(BaseModel):
    """An accuracy with its 95% Wilson interval."""

    accuracy: float = Field(..., description="Fraction correct.")
    ci_low: float = Field(..., description="95% Wilson interval, lower end.")
    ci_high: float = Field(..., description="95% Wilson interval, upper end.")
    n_correct: int = Field(..., description="Examples right.")
    n: int = Field(..., description="Examples scored.")
    log_loss: float | None = Field(None, description="Mean -log P(gold answer).")


class LabelMetricsPublic(BaseModel):
    """What accuracy alone hides: the split's majority baseline and how concentrated the answers are."""

    majority_label: str | None = Field(None, description="The answer that is right most often on these examples.")
    majority_accuracy: float = Field(0.0, description="Accuracy of always answering majority_label.")
    top_answer: str | None = Field(None, description="The model's most frequent answer.")
    top_answer_share: float = Field(0.0, description="Share of examples given top_answer.")
    collapsed: bool = Field(False, description="top_answer_share >= 0.95: (nearly) one answer for everything.")
    balanced_accuracy: float | None = Field(None, description="Mean per-label recall (multiple choice).")
    macro_f1: float | None = Field(None, description="Mean per-label F1 (multiple choice).")


class SweepRowPublic(BaseModel):
    """One finished step of the per-config table (validation split)."""

    key: str = Field(..., description="Step key, e.g. 'laser:fc_in:28:0.01' or 'base'.")
    step: int = Field(..., description="Order in which the step finished.")
    role: Literal["base", "config", "spectrum", "test"] = Field(..., description="What the step did.")
    type: str | None = Field(None, description="LASER type of the (last) edit.")
    layer: int | None = Field(None, description="Layer of the (last) edit.")
    rho: float | None = Field(None, description="Rank fraction of the (last) edit.")
    interventions: list[dict[str, Any]] = Field(default_factory=list, description="The profile evaluated.")
    validation: Accuracy | None = Field(None, description="Validation accuracy with its 95% CI and log-loss.")
    labels: LabelMetricsPublic | None = Field(None, description="Majority baseline, answer concentration, "
                                                                "balanced accuracy and macro-F1 on validation.")
    collapsed: bool = Field(False, description="Gives one answer on >= 95% of validation examples; cannot win "
                                               "unless the sweep allows collapsed configs.")
    delta_accuracy: float | None = Field(None, description="Validation accuracy minus base's (same examples).")
    delta_log_loss: float | None = Field(None, description="Validation log-loss minus base's.")
    val_perplexity: float | None = Field(None, description="Perplexity guard value (when configured).")
    rejected: str | None = Field(None, description="Why this config cannot win (perplexity guard).")
    eliminated: str | None = Field(None, description="successive_halving: why and when the config was dropped.")
    kept: bool | None = Field(None, description="greedy_compose: the edit was kept.")
    seconds: float = Field(0.0, description="Seconds the step took.")


class McNemar(BaseModel):
    """Exact McNemar test of the winner against base on the test split (paired)."""

    only_base: int = Field(..., description="Test examples base gets right and the winner wrong.")
    only_winner: int = Field(..., description="Test examples the winner gets right and base wrong.")
    p_value: float = Field(..., description="Two-sided exact p-value.")
    alpha: float = Field(..., description="Significance level.")
    significant: bool = Field(..., description="p < alpha.")


class MajorityBaseline(BaseModel):
    """The constant predictor that always answers the test split's most frequent correct answer."""

    label: str = Field(..., description="The answer it always gives.")
    accuracy: float = Field(..., description="Its test accuracy.")
    mcnemar: McNemar = Field(..., description="Exact McNemar of the winner against it (only_base: examples only "
                                              "the constant gets right).")
    beaten: bool = Field(..., description="The winner is significantly better than the constant predictor.")


class TestReportPublic(BaseModel):
    """Base vs the validation winner on the held-out test split, and both vs the majority baseline."""

    __test__ = False

    winner_key: str = Field(..., description="Key of the winning config ('base' if nothing beat it).")
    interventions: list[dict[str, Any]] = Field(..., description="The winner's edits.")
    base: Accuracy = Field(..., description="Base model on test.")
    winner: Accuracy = Field(..., description="Winner on test.")
    base_labels: LabelMetricsPublic | None = Field(None, description="Base model's label metrics on test.")
    winner_labels: LabelMetricsPublic | None = Field(None, description="Winner's label metrics on test.")
    delta_accuracy: float = Field(..., description="Winner minus base test accuracy.")
    mcnemar: McNemar = Field(..., description="Paired exact McNemar test against base.")
    majority: MajorityBaseline | None = Field(None, description="The majority-class baseline and the winner's "
                                                                "test against it.")
    significant: bool = Field(..., description="True only for a gain over base significant at alpha.")
    verdict: str = Field(..., description="Plain words, e.g. \"the winner beats base by +3.1 points on test "
                                          "(significant, ...); but it does not beat always-'false' (...)\".")


class JobProgress(BaseModel):
    """Progress of a job (also the payload of its SSE events)."""

    type: Literal["progress", "state"] = Field("progress", description="'progress' per step; 'state' when the "
                                                                       "job changes state (the last event).")
    id: str = Field(..., description="Job id.")
    state: JobState = Field(..., description="queued, running, succeeded, failed or cancelled.")
    done: int = Field(..., description="Steps finished (base, configs, test).")
    total: int | None = Field(None, description="Steps planned.")
    progress: float | None = Field(None, description="done / total.")
    elapsed_s: float = Field(0.0, description="Seconds the job has run (all sessions).")
    eta_s: float | None = Field(None, description="Estimated seconds left (from this session's step times).")
    best: SweepRowPublic | None = Field(None, description="Best config so far on validation.")
    last: SweepRowPublic | None = Field(None, description="The step that just finished.")
    error: str | None = Field(None, description="Why the job failed.")

    @property
    def terminal(self) -> bool:
        """The job has ended (succeeded, failed or cancelled)."""
        return self.state in TERMINAL_STATES


class JobSummary(BaseModel):
    """A job in listings."""

    id: str = Field(..., description="Job id.")
    kind: Literal["sweep"] = Field("sweep", description="Job kind.")
    state: JobState = Field(..., description="queued, running, succeeded, failed or cancelled.")
    dataset: str = Field(..., description="Dataset name.")
    done: int = Field(..., description="Steps finished.")
    total: int | None = Field(None, description="Steps planned.")
    created_at: float = Field(..., description="Unix time of submission.")
    started_at: float | None = Field(None, description="Unix time it first started.")
    finished_at: float | None = Field(None, description="Unix time it ended.")
    error: str | None = Field(None, description="Why it failed.")
    owner: str | None = Field(None, description=(
        "The server (host:pid:nonce) holding the job's lease while it runs (the last one once it ended); "
        "null while queued or after its owner shut down and gave it back."))
    heartbeat_at: float | None = Field(None, description=(
        "Unix time (database clock) of the owner's last heartbeat; another server takes a running job over "
        "once this is older than job_lease_s."))

    @property
    def terminal(self) -> bool:
        """The job has ended (succeeded, failed or cancelled)."""
        return self.state in TERMINAL_STATES


class JobPublic(JobSummary):
    """A sweep job: state, progress, the per-config table and, when finished, the test report."""

    config: dict[str, Any] = Field(..., description="The sweep config as submitted.")
    model_id: str | None = Field(None, description="The model the job was submitted for.")
    model_fingerprint: str | None = Field(None, description=(
        "Exact fingerprint of that model's weights: a server with other weights fails the job rather than "
        "resume it."))
    progress: float | None = Field(None, description="done / total.")
    elapsed_s: float = Field(0.0, description="Seconds of running (all sessions).")
    eta_s: float | None = Field(None, description="Estimated seconds left while running.")
    stopped: str | None = Field(None, description="Why the search ended: completed, max_configs, time_limit, "
                                                  "cancelled.")
    n_validation: int | None = Field(None, description="Validation examples.")
    n_test: int | None = Field(None, description="Test examples.")
    base: SweepRowPublic | None = Field(None, description="The base model on validation.")
    best: SweepRowPublic | None = Field(None, description="Best config so far (the winner once finished).")
    beats_base_on_validation: bool | None = Field(None, description="The best config's validation accuracy is "
                                                                    "above base's.")
    rows: list[SweepRowPublic] = Field(..., description="Every finished step, in order.")
    test: TestReportPublic | None = Field(None, description="Base vs winner on the test split, when finished.")
    verdict: str | None = Field(None, description="Plain-words conclusion of the job.")
    example_evaluations: int | None = Field(None, description="Validation example-evaluations spent on configs.")
    full_grid_evaluations: int | None = Field(None, description="What scoring every config on all of validation "
                                                                "costs (successive_halving saves the difference).")


ExampleFilter = Literal["flips", "fixed", "broken", "disagree", "all"]
ExampleSplit = Literal["validation", "test"]


class ExampleEvidence(BaseModel):
    """One example under base and under a config."""

    index: int = Field(..., description="Position in the split.")
    id: int = Field(..., description="The example's id in its dataset (its position in the source file).")
    prompt: str = Field(..., description="The prompt as scored.")
    choices: list[str] = Field(default_factory=list, description="Candidate answers (multiple choice).")
    gold: str = Field(..., description="The gold answer.")
    base_answer: str = Field(..., description="Base model's answer (chosen choice or generated text).")
    config_answer: str = Field(..., description="The config's answer.")
    base_correct: bool = Field(..., description="Base is right.")
    config_correct: bool = Field(..., description="The config is right.")
    base_gold_logprob: float | None = Field(None, description="log P(gold) under base.")
    config_gold_logprob: float | None = Field(None, description="log P(gold) under the config.")
    change: Literal["fixed", "broken", "both_right", "both_wrong"] = Field(..., description="What the config did "
                                                                           "to this example relative to base.")


class ExamplePage(BaseModel):
    """A page of per-example evidence of one config against base."""

    job_id: str = Field(..., description="Job id.")
    config: str = Field(..., description="Config key.")
    split: ExampleSplit = Field(..., description="validation or test.")
    filter: ExampleFilter = Field(..., description="Which examples: flips (fixed or broken), fixed, broken, "
                                                   "disagree (different answers), all.")
    counts: dict[str, int] = Field(..., description="fixed, broken, both_right, both_wrong over the examples scored.")
    total: int = Field(..., description="Examples matching the filter.")
    offset: int = Field(..., description="First example of this page.")
    limit: int = Field(..., description="Page size.")
    data: list[ExampleEvidence] = Field(..., description="The page.")


class JobList(BaseModel):
    """Jobs, newest first."""

    data: list[JobSummary] = Field(..., description="Jobs.")


class PromoteRequest(RequestModel):
    """Body of ``POST /v1/jobs/{id}/promote``."""

    name: ProfileName
    description: Text | None = Field(None, max_length=2000, description="Profile description (default: the "
                                                                        "job, config and accuracies).")
    replace: bool = Field(False, description="Replace an existing profile of that name instead of 409.")


class JobDeleted(BaseModel):
    """Answer of ``DELETE /v1/jobs/{id}``."""

    id: str = Field(..., description="The deleted job.")
    deleted: bool = Field(True, description="Always true (an unknown id answers 404).")
