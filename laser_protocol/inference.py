"""Protocol models of the native inference routes: ``/v1/generate``, ``/v1/score``, ``/v1/compare``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from laser_protocol.profiles import ProfileName
from laser_protocol.validation import Int, IntRange, RequestModel, Text, one_of_groups

#: Response header naming the weights that computed an answer: "<profile>; hash=<interventions hash>".
PROFILE_HEADER = "X-Laser-Profile"
MAX_PROMPTS = 64
MAX_CONTINUATIONS = 64
MAX_STOP = 8
DEFAULT_MAX_NEW_TOKENS = 32

FinishReason = Literal["stop", "length", "cancelled"]


StopString = Annotated[Text, Field(min_length=1, max_length=256)]
_ONE_PROMPT_FIELD = one_of_groups({"prompt": "string"}, {"prompts": "array"})


# ---------------------------------------------------------------------------------------------- generate


class GenerateParams(RequestModel):
    """What to generate and how to sample (no profile: compare reuses it across profiles)."""

    model_config = ConfigDict(json_schema_extra=_ONE_PROMPT_FIELD)

    prompt: Text | None = Field(None, description="One prompt (give exactly one of prompt or prompts).",
                                examples=["The capital of France is"])
    prompts: list[Text] | None = Field(None, min_length=1, max_length=MAX_PROMPTS,
                                       description=f"Several prompts, answered in order (at most {MAX_PROMPTS}).")
    max_new_tokens: IntRange(ge=0) | None = Field(None, description=f"Most tokens to generate per prompt (default "
                                                               f"{DEFAULT_MAX_NEW_TOKENS}, at most the server's "
                                                               "max_new_tokens).")
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 is greedy (deterministic); > 0 samples "
                                                                 "(any positive value, however small).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 switches it off.")
    top_k: Int = Field(0, ge=0, description="Keep the k most likely tokens; 0 switches it off.")
    seed: IntRange(ge=0, le=2**63 - 1) | None = Field(None,
                             description="Seeds this request's sampler: the same seed gives the same text, "
                                         "whatever else shares the batch.")
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP)] | StopString | None = Field(
        None, description=f"Stop strings of 1-256 characters (at most {MAX_STOP}); the text is cut before the "
                          "first one.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str] | str | None) -> list[str]:
        return [v] if isinstance(v, str) else list(v or [])

    @model_validator(mode="after")
    def _one_prompt_field(self) -> GenerateParams:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'prompt' (a string) or 'prompts' (a list of strings)")
        return self

    @property
    def prompt_list(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])


class GenerateRequest(GenerateParams):
    """Body of ``POST /v1/generate``."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        _ONE_PROMPT_FIELD,
        {"anyOf": [{"properties": {"stream": {"const": False}}},  # a stream answers a single prompt
                   {"properties": {"prompts": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 1}]}}}]},
    ]})

    profile: ProfileName | None = Field(None, description="Profile that serves the request (default: the "
                                                           "server's default_profile, normally 'base').")
    stream: bool = Field(False, description="Answer Server-Sent Events, one per text delta (single prompt only: "
                                            "'prompt' or a one-element 'prompts').")

    @model_validator(mode="after")
    def _stream_single(self) -> GenerateRequest:
        if self.stream and self.prompts is not None and len(self.prompts) != 1:
            raise ValueError("stream supports a single prompt; send 'prompt' or a one-element 'prompts'")
        return self


class GenerateUsage(BaseModel):
    prompt_tokens: int = Field(..., description="Prompt tokens processed.")
    completion_tokens: int = Field(..., description="Tokens generated.")
    total_tokens: int = Field(..., description="Sum of both.")


class GenerateChoice(BaseModel):
    index: int = Field(..., description="Position of the prompt in the request.")
    text: str = Field(..., description="Generated text (cut before a stop string; EOS excluded).")
    finish_reason: FinishReason = Field(..., description="stop: EOS or a stop string; length: max_new_tokens; "
                                                         "cancelled: the client went away.")
    prompt_tokens: int = Field(..., description="Tokens in this prompt.")
    completion_tokens: int = Field(..., description="Tokens generated for this prompt.")


class GenerateResponse(BaseModel):
    """Answer of ``POST /v1/generate`` (non-streaming)."""

    profile: str = Field(..., description="Profile that served the request.")
    profile_hash: str = Field(..., description="Short hash of the interventions that computed this answer (the "
                                                "profile as it was when the request started; also in the "
                                                "X-Laser-Profile header).")
    choices: list[GenerateChoice] = Field(..., description="One per prompt, in request order.")
    usage: GenerateUsage = Field(..., description="Token counts over all prompts.")

    @property
    def text(self) -> str:
        """The first (usually only) choice's text."""
        return self.choices[0].text if self.choices else ""


class GenerateStreamEvent(BaseModel):
    """One ``data:`` event of a streamed generate; the last one before ``data: [DONE]`` has finish_reason and usage."""

    profile: str = Field(..., description="Profile that serves the request.")
    profile_hash: str = Field(..., description="Short hash of the interventions that computed this answer (the "
                                                "profile as it was when the request started; also in the "
                                                "X-Laser-Profile header).")
    text: str = Field("", description="Text delta (concatenated, the deltas are the final text). The first "
                                      "event has none: it names the weights before any token.")
    finish_reason: FinishReason | None = Field(None, description="Set on the final event only.")
    usage: GenerateUsage | None = Field(None, description="Set on the final event only.")


class StreamError(BaseModel):
    """Event sent when a stream fails after it started (then ``data: [DONE]``)."""

    error: str = Field(..., description="What went wrong.")


# ---------------------------------------------------------------------------------------------- score


class ScoreParams(RequestModel):
    """Either a context and candidate continuations (log-probs, argmax) or a text (perplexity)."""

    model_config = ConfigDict(json_schema_extra=one_of_groups({"context": "string", "continuations": "array"},
                                                              {"text": "string"}))

    context: Text | None = Field(None, description="Text the continuations are conditioned on ('' allowed).",
                                 examples=["The capital of France is"])
    continuations: list[Text] | None = Field(
        None, min_length=1, max_length=MAX_CONTINUATIONS,
        description="Candidates scored as log P(continuation | context); put the separating space at the start "
                    "of each (' Paris').", examples=[[" Paris", " Rome"]])
    normalize: bool = Field(False, description="Pick the argmax by log-prob per token instead of the sum.")
    text: Text | None = Field(None, min_length=1, description="A whole text whose perplexity to compute "
                                                              "(instead of context/continuations).")

    @model_validator(mode="after")
    def _one_mode(self) -> ScoreParams:
        pair = self.context is not None or self.continuations is not None
        if pair and self.text is not None:
            raise ValueError("give either context + continuations, or text, not both")
        if self.text is None:
            if self.context is None or self.continuations is None:
                raise ValueError("give 'context' and 'continuations' (log-probs), or 'text' (perplexity)")
        return self


class ScoreRequest(ScoreParams):
    """Body of ``POST /v1/score``."""

    profile: ProfileName | None = Field(None, description="Profile that scores (default: default_profile).")


class ContinuationScore(BaseModel):
    continuation: str = Field(..., description="The candidate, as sent.")
    logprob: float = Field(..., description="Summed log P(continuation tokens | context), natural log.")
    n_tokens: int = Field(..., description="Tokens in the continuation.")
    mean_logprob: float | None = Field(None, description="logprob / n_tokens (None for an empty continuation).")
    is_greedy: bool = Field(..., description="True iff every continuation token is the model's argmax.")


class PerplexityScore(BaseModel):
    logprob: float = Field(..., description="Total log-likelihood of the text (every token scored once).")
    n_tokens: int = Field(..., description="Tokens scored.")
    perplexity: float | None = Field(..., description="exp(-logprob / n_tokens); None when no token was scored.")


class ScoreResponse(BaseModel):
    """Answer of ``POST /v1/score``: ``continuations`` + ``argmax``, or ``perplexity``."""

    profile: str = Field(..., description="Profile that scored.")
    profile_hash: str = Field(..., description="Short hash of the interventions that computed this answer (the "
                                                "profile as it was when the request started; also in the "
                                                "X-Laser-Profile header).")
    continuations: list[ContinuationScore] | None = Field(None, description="Per candidate, in request order.")
    argmax: int | None = Field(None, description="Index of the most likely candidate (ties: lowest index).")
    perplexity: PerplexityScore | None = Field(None, description="Set when a text was scored.")


# ---------------------------------------------------------------------------------------------- compare


class CompareRequest(RequestModel):
    """Body of ``POST /v1/compare``: the same generate or score request on each profile (A/B)."""

    model_config = ConfigDict(json_schema_extra=one_of_groups({"generate": "object"}, {"score": "object"}))

    profiles: list[ProfileName] = Field(..., min_length=2, max_length=8, json_schema_extra={"uniqueItems": True},
                                        description="Profiles to compare; the first is the reference of the diff.",
                                        examples=[["base", "late-fc-in"]])
    generate: GenerateParams | None = Field(None, description="A generate request (no streaming).")
    score: ScoreParams | None = Field(None, description="A score request.")

    @model_validator(mode="after")
    def _one_request(self) -> CompareRequest:
        if (self.generate is None) == (self.score is None):
            raise ValueError("give exactly one of 'generate' or 'score'")
        if len(set(self.profiles)) != len(self.profiles):
            raise ValueError("profiles must be distinct")
        return self


class TextDiff(BaseModel):
    index: int = Field(..., description="Prompt index.")
    reference: str = Field(..., description="Text of the reference (first) profile.")
    text: str = Field(..., description="Text of this profile.")
    first_difference: int = Field(..., description="Character offset where the two texts first differ.")


class GenerateDiff(BaseModel):
    profile: str = Field(..., description="Profile compared with the reference.")
    changed: list[TextDiff] = Field(..., description="Prompts whose text differs from the reference's.")


class ScoreDiff(BaseModel):
    profile: str = Field(..., description="Profile compared with the reference.")
    logprob_deltas: list[float] | None = Field(None, description="Per continuation: logprob(this) - logprob(reference).")
    argmax: int | None = Field(None, description="This profile's argmax.")
    argmax_changed: bool | None = Field(None, description="True when the argmax differs from the reference's.")
    perplexity_delta: float | None = Field(None, description="perplexity(this) - perplexity(reference).")


class CompareDiff(BaseModel):
    reference: str = Field(..., description="The first profile; every diff is against it.")
    any_changed: bool = Field(..., description="True if any text, argmax or log-prob differs from the reference.")
    generate: list[GenerateDiff] | None = Field(None, description="Per other profile (generate requests).")
    score: list[ScoreDiff] | None = Field(None, description="Per other profile (score requests).")


class CompareResponse(BaseModel):
    """Answer of ``POST /v1/compare``: per-profile results side by side, and what differs."""

    profiles: list[str] = Field(..., description="Profiles, in request order.")
    generate: list[GenerateResponse] | None = Field(None, description="Per profile, in order (generate requests).")
    score: list[ScoreResponse] | None = Field(None, description="Per profile, in order (score requests).")
    diff: CompareDiff = Field(..., description="Differences against the first profile.")
