"""Protocol models of the tokenizer routes lm-eval's remote tokenizer calls (/tokenize, /detokenize,
/tokenizer_info), in vLLM's shapes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from laser_protocol.openai import OPENAI_REQUEST, ChatMessage
from laser_protocol.validation import Int, Text, one_of_groups


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape; lm-eval's remote tokenizer sends {prompt, add_special_tokens: false})."""

    model_config = ConfigDict(**OPENAI_REQUEST, json_schema_extra=one_of_groups({"prompt": "string"},
                                                                                {"messages": "array"}))
    model: Text | None = Field(None, min_length=1, description="Optional; every profile shares the tokenizer.")
    prompt: Text | None = Field(None, description="Text to tokenize (give exactly one of prompt or messages).")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description=(
        "Chat to render with the template, then tokenize."))
    add_special_tokens: bool = Field(True, description="Prepend the BOS the tokenizer adds by default (as "
                                                       "/v1/completions does for text prompts).")
    add_generation_prompt: bool = Field(True, description="With messages: end with the assistant header.")
    return_token_strs: bool = Field(False, description="Also return each token's text.")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int = Field(..., description="Number of tokens.")
    max_model_len: int | None = Field(..., description="Model positions (prompt + completion); null if unknown.")
    tokens: list[int] = Field(..., description="Token ids.")
    token_strs: list[str] | None = Field(None, description="Each token's text, with return_token_strs; "
                                                           "otherwise null.")


class DetokenizeRequest(BaseModel):
    model_config = OPENAI_REQUEST
    model: Text | None = Field(None, min_length=1, description="Optional (checked to exist); every profile shares "
                                                               "the tokenizer.")
    tokens: list[Int] = Field(..., description="Token ids to decode, each inside the vocabulary.")


class DetokenizeResponse(BaseModel):
    prompt: str = Field(..., description="The decoded text (special tokens kept).")


class TokenizerInfo(BaseModel):
    tokenizer_class: str = Field(..., description="Class name of the transformers tokenizer.")
    bos_token: str | None = Field(..., description="Beginning-of-sequence token text; null if none.")
    eos_token: str | None = Field(..., description="End-of-sequence token text; null if none.")
    pad_token: str | None = Field(..., description="Padding token text; null if none.")
    unk_token: str | None = Field(..., description="Unknown-token text; null if none.")
    chat_template: str | None = Field(None, description="Jinja chat template used by /v1/chat/completions.")
    model_max_length: int | None = Field(None, description="Model positions (prompt + completion).")
    vocab_size: int = Field(..., description="Tokens the tokenizer knows, added tokens "
                                             "included.")
    add_bos_token: bool = Field(..., description="Whether text prompts get a BOS prepended.")
