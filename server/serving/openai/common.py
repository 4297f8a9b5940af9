"""What every OpenAI-compatible endpoint shares: the error type, token text, model resolution, limits and
prompt checks, request building, and stream helpers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from transformers import PreTrainedTokenizerBase

from laser_ops.batching.detokenizer import IncrementalDetokenizer, token_string
from laser_ops.scoring import GenerationRequest
from server import sse
from server.errors import ApiError
from laser_protocol.openai import ChatCompletionRequest, CompletionRequest
from server.serving.common import check_prompt_chars, check_prompt_tokens
from server.state import Services


DEFAULT_COMPLETION_TOKENS = 16
STARTED = int(time.time())


class OpenAIApiError(ApiError):
    """An :class:`ApiError` that also carries OpenAI's machine-readable ``code``."""

    def __init__(self, status: int, message: str, loc: tuple[str | int, ...] | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, loc, headers)
        self.code = code


# --------------------------------------------------------------------------------------------- token text


class TokenText:
    """Token ids as text for the OpenAI layouts, through the shared incremental detokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        # A plain token to read single tokens after: keeps the leading space SentencePiece strips from a first token.
        self._anchor = list(tokenizer("a", add_special_tokens=False).input_ids)
        self._single: dict[int, str] = {}

    def single(self, token_id: int) -> str:
        """The token's own text (special tokens show theirs), as it reads after other text."""
        text = self._single.get(token_id)
        if text is None:
            text = self._single[token_id] = token_string(self.tokenizer, token_id, self._anchor)
        return text

    def pieces(self, ids: Sequence[int], *, context: Sequence[int] = (), skip_special: bool = False) -> list[str]:
        """One text piece per id; ``"".join`` gives the decoded text of ``ids`` (after ``context``).

        A token that ends inside a multi-byte character gets "" and the token that completes it gets the
        whole character (:class:`~laser_ops.batching.detokenizer.IncrementalDetokenizer`).
        """
        return IncrementalDetokenizer(self.tokenizer, context=context, skip_special_tokens=skip_special).pieces(ids)

    def token_strings(self, ids: Sequence[int], pieces: Sequence[str]) -> list[str]:
        """Pieces, except special tokens, which show their own text."""
        return [self.single(t) if (t in self.special and not p) else p for t, p in zip(ids, pieces)]


def token_text(services: Services) -> TokenText:
    if services.token_text is None:
        services.token_text = TokenText(services.engine.info.tokenizer)
    return services.token_text


# --------------------------------------------------------------------------------------------- shared checks


def resolve_model(services: Services, request: Request, name: str | None) -> str:
    """The profile a request's ``model`` names (404 naming the known models); labels the request's metrics."""
    profile = name or services.settings.default_profile
    if profile not in services.profiles and profile == services.engine.info.model_id:
        profile = "base"
    if profile not in services.profiles:
        known = ", ".join(["base", *(p.name for p in services.profiles.list())])
        raise OpenAIApiError(404, f"The model {profile!r} does not exist; known models: {known}",
                             ("body", "model"), code="model_not_found")
    request.state.profile = profile
    return profile


def vocab_size(services: Services) -> int:
    """Token ids the model accepts: 0 .. vocab_size - 1."""
    return services.engine.info.vocab_size


def max_positions(services: Services) -> int | None:
    return services.engine.info.max_positions


def check_context(services: Services, n_prompt: int, max_tokens: int, field: str) -> None:
    limit = max_positions(services)
    if limit is not None and max_tokens > 0 and n_prompt + max_tokens > limit:
        raise OpenAIApiError(400, f"prompt ({n_prompt} tokens) + {field} ({max_tokens}) exceeds the model's "
                                  f"context of {limit} tokens", ("body", field), code="context_length_exceeded")


def prompt_ids(services: Services, prompt: Any) -> list[list[int]]:
    """Token ids of every prompt (strings get the tokenizer's default BOS); empty prompts condition on BOS."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise OpenAIApiError(400, "prompt is empty", ("body", "prompt"))
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    vocab = vocab_size(services)
    text = services.engine.info
    out: list[list[int]] = []
    for i, item in enumerate(items):
        loc: tuple[str | int, ...] = ("body", "prompt") if len(items) == 1 else ("body", "prompt", i)
        if isinstance(item, str):
            check_prompt_chars(services, item, loc)
            ids = text.encode(item)
        else:
            ids = list(item)
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise OpenAIApiError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", loc)
        if not ids:
            if text.prefix_token_id is None:
                raise OpenAIApiError(400, "prompt is empty and the model has no BOS token", loc)
            ids = [text.prefix_token_id]
        check_prompt_tokens(services, len(ids), loc)
        out.append(ids)
    return out


def check_batch(services: Services, n_sequences: int) -> None:
    limit = services.settings.max_queue
    if n_sequences > limit:
        raise OpenAIApiError(400, f"{n_sequences} sequences (prompts x n) exceed the {limit} one request may "
                                  "ask for (max_queue)", ("body", "n"))


def gen_request(body: CompletionRequest | ChatCompletionRequest, ids: list[int], max_tokens: int, j: int,
                 logprobs: int | None) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids=ids, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=max(body.top_k, 0), seed=None if body.seed is None else body.seed + j, stop=body.stop_list,
        logprobs=logprobs)


#: Tokens of context kept to decode the next streamed delta's token strings (enough for any multi-byte character).
CONTEXT_TOKENS = 8


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def openai_finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def sse_error(exc: BaseException) -> str:
    message = exc.message if isinstance(exc, ApiError) else f"{type(exc).__name__}: {exc}"
    return sse.data({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


async def merge_streams(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as (index, item); closing this closes (cancels) them all."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(i: int, it: AsyncIterator[Any]) -> None:
        try:
            async for item in it:
                queue.put_nowait((i, item, None, False))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, exc, False))
        finally:
            queue.put_nowait((i, None, None, True))
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                await aclose()

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item, error, done = await queue.get()
            if error is not None:
                raise error
            if done:
                left -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def render_chat(services: Services, messages: list[Any], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, extra: dict[str, Any] | None = None) -> list[int]:
    """Token ids of the chat as the model's chat template renders it (no extra special tokens)."""
    tokenizer = services.engine.info.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIApiError(400, f"model {services.engine.info.model_id!r} has no chat template; use /v1/completions",
                             ("body", "messages"))
    try:
        text = tokenizer.apply_chat_template(
            [m.as_template_input() for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **(extra or {}))
    except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
        raise OpenAIApiError(400, f"chat template failed: {exc}", ("body", "messages")) from None
    return list(tokenizer(text, add_special_tokens=False).input_ids)
