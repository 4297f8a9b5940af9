"""``/tokenize``, ``/detokenize`` and ``/tokenizer_info``: what lm-eval's remote tokenizer expects."""

from __future__ import annotations

from fastapi import Request

from laser_protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from server.serving.common import check_prompt_chars, check_prompt_tokens
from server.state import Services
from server.serving.openai.common import (
    OpenAIApiError,
    max_positions,
    render_chat,
    resolve_model,
    token_text,
    vocab_size,
)


def _check_optional_model(services: Services, request: Request, name: str | None) -> None:
    if name is not None:
        resolve_model(services, request, name)


def tokenize(services: Services, request: Request, body: TokenizeRequest) -> TokenizeResponse:
    """Token ids of a prompt or chat, under the same size limits as the completion routes."""
    _check_optional_model(services, request, body.model)
    if body.messages is not None:
        check_prompt_chars(services, "".join(m.as_template_input()["content"] for m in body.messages),
                           ("body", "messages"), "chat")
        ids = render_chat(services, body.messages, add_generation_prompt=body.add_generation_prompt)
        check_prompt_tokens(services, len(ids), ("body", "messages"))
        return _tokenized(services, ids, body.return_token_strs)
    check_prompt_chars(services, body.prompt or "", ("body", "prompt"))
    if body.add_special_tokens:
        ids = services.engine.info.encode(body.prompt or "")
    elif body.prompt:
        ids = list(services.engine.info.tokenizer(body.prompt, add_special_tokens=False).input_ids)
    else:
        ids = []
    check_prompt_tokens(services, len(ids), ("body", "prompt"))
    return _tokenized(services, ids, body.return_token_strs)


def _tokenized(services: Services, ids: list[int], with_strings: bool) -> TokenizeResponse:
    strs = None
    if with_strings:
        tt = token_text(services)
        strs = tt.token_strings(ids, tt.pieces(ids))
    return TokenizeResponse(count=len(ids), max_model_len=max_positions(services), tokens=ids, token_strs=strs)


def detokenize(services: Services, request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
    _check_optional_model(services, request, body.model)
    vocab = vocab_size(services)
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise OpenAIApiError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", ("body", "tokens"))
    return DetokenizeResponse(prompt=services.engine.info.decode(body.tokens))


def tokenizer_info(services: Services) -> TokenizerInfo:
    tok = services.engine.info.tokenizer
    return TokenizerInfo(
        tokenizer_class=type(tok).__name__, bos_token=tok.bos_token, eos_token=tok.eos_token,
        pad_token=tok.pad_token, unk_token=tok.unk_token, chat_template=getattr(tok, "chat_template", None),
        model_max_length=max_positions(services), vocab_size=len(tok),
        add_bos_token=bool(services.engine.info.prefix_ids))
