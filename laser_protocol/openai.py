"""Protocol models of the OpenAI-compatible routes (/v1/models, /v1/completions, /v1/chat/completions); the
tokenizer routes' models are in :mod:`laser_protocol.tokenize`.

Requests ignore fields they do not know (OpenAI clients send many); fields they know but cannot honour
(``suffix``, penalties, ``logit_bias``, ``best_of`` != ``n``, tools, non-text content) are refused with a
400 that names the field instead of being silently dropped. ``model`` picks the profile: ``base`` or a
stored profile name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from laser_protocol.validation import REQUEST_CONFIG
from laser_protocol.validation import (
    Int,
    IntRange,
    JsonValue,
    Text,
)

#: OpenAI requests carry many fields laser-serve does not use: unknown ones are ignored, known ones are strict.
OPENAI_REQUEST = ConfigDict(**{**REQUEST_CONFIG, "extra": "ignore"})

#: Most alternatives per position a request may ask for (vLLM's default cap; OpenAI allows 5 / 20).
MAX_LOGPROBS = 20
#: Most choices per prompt (``n``).
MAX_N = 64


# --------------------------------------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str = Field(..., description="What went wrong, naming the offending field.")
    type: str = Field(..., description="invalid_request_error, authentication_error, permission_error, "
                                       "rate_limit_error, server_error, service_unavailable_error.")
    param: str | None = Field(None, description="The request field at fault (dotted path), if any.")
    code: str | None = Field(None, description="Machine-readable code, e.g. model_not_found.")


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo = Field(..., description="What went wrong and where.")


# --------------------------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str = Field(..., description="What to send as `model`: 'base' or a profile name.")
    object: Literal["model"] = Field("model", description="Always 'model'.")
    created: int = Field(..., description="Unix time the profile was created (server start for base).")
    owned_by: str = Field("laser-serve", description="Always 'laser-serve'.")
    root: str = Field(..., description="The underlying model (alias, folder or GGUF stem).")
    parent: str | None = Field(None, description="'base' for profiles (they are edits of it); null for base.")
    max_model_len: int | None = Field(None, description="Longest prompt + completion, in tokens.")
    description: str | None = Field(None, description="The profile's description.")


class ModelList(BaseModel):
    object: Literal["list"] = Field("list", description="Always 'list'.")
    data: list[ModelCard] = Field(..., description="'base' first, then every stored profile.")


# --------------------------------------------------------------------------------------------- shared


class StreamOptions(BaseModel):
    model_config = OPENAI_REQUEST
    include_usage: bool = Field(False, description="Send a last chunk with `usage` (and no choices) before [DONE].")


class Usage(BaseModel):
    prompt_tokens: int = Field(..., description="Prompt tokens, counted once per prompt (not per choice).")
    completion_tokens: int = Field(..., description="Generated tokens over all choices (an ending EOS not counted).")
    total_tokens: int = Field(..., description="prompt_tokens + completion_tokens.")


def _no_effect(name: str, value: Any, neutral: tuple[Any, ...]) -> Any:
    if value not in neutral:
        raise ValueError(f"{name}={value!r} is not supported by laser-serve (only {neutral[-1]!r} / unset)")
    return value


#: ``stream_options`` only goes with ``stream: true`` (as in OpenAI's API).
_STREAM_OPTIONS_RULE = {"anyOf": [{"properties": {"stream": {"const": True}}, "required": ["stream"]},
                                  {"properties": {"stream_options": {"type": "null"}}}]}


def _only(*values: Any) -> Any:
    """Schema of a field laser-serve accepts only with a neutral value (its validator says why)."""
    return WithJsonSchema({"anyOf": [*({"const": v} for v in values), {"type": "null"}]})


class _SamplingBase(BaseModel):
    """Fields completions and chat share; unknown fields are ignored."""

    model_config = ConfigDict(**OPENAI_REQUEST, json_schema_extra=_STREAM_OPTIONS_RULE)

    model: Text | None = Field(None, min_length=1, description=(
        "'base' or a profile name (see GET /v1/models); unset or null: the server's default profile. The base "
        "model's own id also means 'base'."))
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy (deterministic).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 switches it off.")
    top_k: Int = Field(-1, ge=-1, description="Extension (vLLM): keep the k most likely tokens; -1 or 0: off.")
    n: Int = Field(1, ge=1, le=MAX_N, description="Choices per prompt.")
    stream: bool = Field(False, description="Send server-sent events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true, e.g. include_usage.")
    stop: Text | Annotated[list[Text], Field(max_length=16)] | None = Field(
        None, description="Stop strings (at most 16); the text ends just before the first one.")
    seed: IntRange(ge=-(2**63), le=2**63 - 1) | None = Field(None,
                             description="Reproducible sampling (a signed 64-bit int); choice j of a prompt uses "
                                         "seed + j.")
    presence_penalty: Annotated[float | None, _only(0)] = Field(None, description="Only 0 / unset.")
    frequency_penalty: Annotated[float | None, _only(0)] = Field(None, description="Only 0 / unset.")
    logit_bias: Annotated[dict[Text, float] | None, WithJsonSchema(
        {"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}]})] = Field(
        None, description="Only empty / unset.")
    user: Text | None = Field(None, description="Accepted and ignored.")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v: float | None, info: Any) -> float | None:
        return _no_effect(info.field_name, v, (None, 0, 0.0))

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported by laser-serve (only {} / unset)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        items = [v] if isinstance(v, str) else list(v or [])
        return [s for s in items if s]

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingBase:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# --------------------------------------------------------------------------------------------- completions

Prompt = Text | list[Text] | list[Int] | list[list[Int]]


class CompletionRequest(_SamplingBase):
    """POST /v1/completions. lm-evaluation-harness's `local-completions` sends
    {model, prompt, max_tokens: 1, temperature: 0, logprobs: 1, echo: true, seed}."""

    prompt: Prompt = Field(..., description="A string, a list of strings, a list of token ids, or a list of "
                                            "token-id lists; each prompt gets `n` choices.")
    max_tokens: IntRange(ge=0) | None = Field(16, description="Tokens to generate (0: none, to score an echoed prompt).")
    echo: bool = Field(False, description="Return the prompt before the completion (text and logprobs).")
    logprobs: IntRange(ge=0, le=MAX_LOGPROBS) | None = Field(None, description=(
        "Return per-token log-probs with this many alternatives per position (the chosen token is always "
        "among them). With echo they cover the prompt too; the first prompt token's log-prob is null."))
    suffix: Annotated[Text | None, _only("")] = Field(None, description="Not supported (only unset or '').")
    best_of: IntRange(ge=1, le=MAX_N) | None = Field(None, description="Only unset or equal to n.")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        return _no_effect("suffix", v, (None, ""))

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of={self.best_of} is not supported (only unset or equal to n={self.n})")
        return self


class CompletionLogprobs(BaseModel):
    """Aligned one-to-one: the i-th token, its log-prob, its alternatives and its offset in `text`."""

    tokens: list[str] = Field(default_factory=list, description="Token strings; they join to the returned text "
                                                                "(a listed EOS shows its special-token text).")
    token_logprobs: list[float | None] = Field(default_factory=list, description=(
        "Natural-log probability of each token; null for the first prompt token (with echo)."))
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list, description=(
        "Per token: token text -> log-prob of the `logprobs` most likely tokens plus the chosen one; null where "
        "token_logprobs is null."))
    text_offset: list[int] = Field(default_factory=list, description="Character offset of each token in `text`.")


class CompletionChoice(BaseModel):
    index: int = Field(..., description="prompt_index * n + j.")
    text: str = Field(..., description="Generated text, after the prompt's text with echo (in a stream: the "
                                       "next piece of it).")
    logprobs: CompletionLogprobs | None = Field(None, description="Per-token log-probs when the request set "
                                                                  "logprobs; otherwise null.")
    finish_reason: Literal["stop", "length"] | None = Field(None, description=(
        "'stop' (EOS or a stop string) or 'length' (token limit reached); null on a stream's intermediate chunks."))


class CompletionResponse(BaseModel):
    """The completion; with stream: true also the payload of each SSE event (one choice per chunk)."""

    id: str = Field(..., description="Completion id, 'cmpl-<hex>' (the same on every chunk of a stream).")
    object: Literal["text_completion"] = Field("text_completion", description="Always 'text_completion'.")
    created: int = Field(..., description="Unix time the request was accepted.")
    model: str = Field(..., description="The request's model, or the default profile when it named none.")
    choices: list[CompletionChoice] = Field(..., description="n choices per prompt, ordered by prompt then j "
                                                             "(a stream chunk holds one; the usage chunk none).")
    usage: Usage | None = Field(None, description="Token counts; in a stream only on the last chunk, with "
                                                  "stream_options.include_usage.")
    system_fingerprint: str | None = Field(None, description=(
        "Hash of the interventions of the profile that computed the answer (also in the X-Laser-Profile "
        "header): the same profile name with another hash means other weights."))


# --------------------------------------------------------------------------------------------- chat


class TextPart(BaseModel):
    model_config = OPENAI_REQUEST
    type: Literal["text"] = Field(..., description="Part type; only 'text' is supported.")
    text: Text = Field(..., description="The text.")


ChatRole = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(BaseModel):
    model_config = OPENAI_REQUEST
    role: ChatRole = Field(..., description="system, developer (OpenAI's newer name for system), user, assistant "
                                            "or tool.")
    content: Text | list[TextPart] | None = Field(None, description="Text, or text parts (joined); null counts "
                                                                    "as empty.")
    name: Text | None = Field(None, description="Optional participant name, passed on to the chat template.")

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text or "" for p in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingBase):
    """POST /v1/chat/completions: the messages go through the model's chat template."""

    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_RULE, {"anyOf": [
        {"properties": {"top_logprobs": {"type": "null"}}},  # top_logprobs needs logprobs: true
        {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}]}]})

    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation, oldest first; "
                                                                     "rendered with the model's chat template.")
    max_tokens: IntRange(ge=0) | None = Field(None, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: IntRange(ge=0) | None = Field(None, description="Unset: up to the server's max_new_tokens "
                                                                      "(and the model's context).")
    logprobs: bool = Field(False, description="Return log-probs of the generated tokens.")
    top_logprobs: IntRange(ge=0, le=MAX_LOGPROBS) | None = Field(None,
                                      description="Alternatives per token (needs logprobs).")
    add_generation_prompt: bool = Field(True, description="Extension (vLLM): end the prompt with the assistant header.")
    continue_final_message: bool = Field(False, description="Extension (vLLM): continue the last (assistant) message.")
    chat_template_kwargs: dict[Text, JsonValue] | None = Field(None, description=(
        "Extension (vLLM): extra template variables."))
    tools: Annotated[list[JsonValue] | None, WithJsonSchema(
        {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}]})] = Field(
        None, description="Not supported (only empty / unset).")
    tool_choice: Annotated[JsonValue, _only("none")] = Field(None, description="Only 'none' / unset.")
    response_format: Annotated[dict[Text, JsonValue] | None, WithJsonSchema({"anyOf": [
        {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"]}, {"type": "null"}]})] = Field(
        None, description="Only {'type': 'text'} / unset.")

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("tools are not supported by laser-serve")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        return _no_effect("tool_choice", v, (None, "none"))

    @field_validator("response_format")
    @classmethod
    def _format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type") != "text":
            raise ValueError(f"response_format {v.get('type')!r} is not supported (only 'text')")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.continue_final_message and self.add_generation_prompt:
            self.add_generation_prompt = False
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TopLogprob(BaseModel):
    token: str = Field(..., description="The token's text.")
    logprob: float = Field(..., description="Natural-log probability of the token at this position.")
    bytes: list[int] | None = Field(None, description="UTF-8 bytes of `token`.")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list, description=(
        "The request's top_logprobs most likely tokens at this position, most likely first."))


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = Field(None, description="One entry per generated token.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = Field("assistant", description="Always 'assistant'.")
    content: str = Field(..., description="The generated text.")


class ChatChoice(BaseModel):
    index: int = Field(..., description="Choice number j, 0..n-1.")
    message: AssistantMessage = Field(..., description="The generated reply.")
    logprobs: ChatChoiceLogprobs | None = Field(None, description="With logprobs: true, per-token log-probs; "
                                                                  "otherwise null.")
    finish_reason: Literal["stop", "length"] | None = Field(None, description=(
        "'stop' (EOS or a stop string) or 'length' (token limit reached)."))


class ChatCompletionResponse(BaseModel):
    id: str = Field(..., description="Completion id, 'chatcmpl-<hex>'.")
    object: Literal["chat.completion"] = Field("chat.completion", description="Always 'chat.completion'.")
    created: int = Field(..., description="Unix time the request was accepted.")
    model: str = Field(..., description="The request's model, or the default profile when it named none.")
    choices: list[ChatChoice] = Field(..., description="n choices.")
    usage: Usage | None = Field(None, description="Token counts.")
    system_fingerprint: str | None = Field(None, description=(
        "Hash of the interventions of the profile that computed the answer (also in the X-Laser-Profile "
        "header): the same profile name with another hash means other weights."))


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, description="'assistant' on a choice's first chunk only.")
    content: str | None = Field(None, description="The next piece of text (empty on the first chunk).")


class ChatStreamChoice(BaseModel):
    index: int = Field(..., description="Choice number j, 0..n-1.")
    delta: ChatDelta = Field(..., description="What this chunk adds to the choice's message.")
    logprobs: ChatChoiceLogprobs | None = Field(None, description="With logprobs: true, on each content delta: "
                                                                  "the log-probs of the tokens of that delta.")
    finish_reason: Literal["stop", "length"] | None = Field(None, description=(
        "'stop' (EOS or a stop string) or 'length' (token limit reached), on the choice's last chunk; null before."))


class ChatCompletionChunk(BaseModel):
    """Payload of each SSE event of POST /v1/chat/completions with stream: true."""

    id: str = Field(..., description="Completion id, 'chatcmpl-<hex>' (the same on every chunk).")
    object: Literal["chat.completion.chunk"] = Field("chat.completion.chunk", description=(
        "Always 'chat.completion.chunk'."))
    created: int = Field(..., description="Unix time the request was accepted.")
    model: str = Field(..., description="The request's model, or the default profile when it named none.")
    choices: list[ChatStreamChoice] = Field(..., description="One choice's update (none in the usage chunk).")
    usage: Usage | None = Field(None, description="Token counts, only on the last chunk with "
                                                  "stream_options.include_usage.")
    system_fingerprint: str | None = Field(None, description=(
        "Hash of the interventions of the profile that computes the answer (also in the X-Laser-Profile "
        "header), on every chunk."))
