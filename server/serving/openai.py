"""Logic of the OpenAI-compatible routes: tokenization, limits, engine calls, and the response layout.

Expected failures raise :class:`OpenAIApiError` (an :class:`ApiError` with an OpenAI ``code``); the router
turns every exception into OpenAI's error body. Streaming entry points validate everything first and only
then return an async iterator of server-sent-event lines, so a bad request still gets a proper 4xx.

Log-prob layout of /v1/completions (what lm-evaluation-harness's ``local-completions`` reads): with
``echo`` the lists cover the prompt tokens (first log-prob null) followed by every generated token,
including an EOS that ended generation (its text is not part of ``text``). A greedy ``max_tokens: 1``
echo request (lm-eval's loglikelihood call) is answered from a single scoring pass.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from laser_ops.batching.detokenizer import IncrementalDetokenizer, token_string
from laser_ops.scoring import GenerationDelta, GenerationRequest, GenerationResult, PromptLogprobs
from server.errors import ApiError
from laser_protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    TopLogprob,
    Usage,
)
from server.serving.common import check_new_tokens, check_prompt_chars, check_prompt_tokens, profile_ready
from server.state import Services

DEFAULT_COMPLETION_TOKENS = 16
_STARTED = int(time.time())


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
    tt = services.extras.get("openai.token_text")
    if tt is None:
        tt = services.extras["openai.token_text"] = TokenText(services.loaded.tokenizer)
    return tt


# --------------------------------------------------------------------------------------------- shared checks


def resolve_model(services: Services, request: Request, name: str | None) -> str:
    """The profile a request's ``model`` names (404 naming the known models); labels the request's metrics."""
    profile = name or services.settings.default_profile
    if profile not in services.profiles and profile == services.loaded.model_id:
        profile = "base"
    if profile not in services.profiles:
        known = ", ".join(["base", *(p.name for p in services.profiles.list())])
        raise OpenAIApiError(404, f"The model {profile!r} does not exist; known models: {known}",
                             ("body", "model"), code="model_not_found")
    request.state.profile = profile
    return profile


def vocab_size(services: Services) -> int:
    """Token ids the model accepts: 0 .. vocab_size - 1."""
    emb = services.scorer.model.get_input_embeddings()
    return int(getattr(emb, "num_embeddings", 0) or len(services.loaded.tokenizer))


def _max_positions(services: Services) -> int | None:
    return services.scorer.max_positions


def _check_context(services: Services, n_prompt: int, max_tokens: int, field: str) -> None:
    limit = _max_positions(services)
    if limit is not None and max_tokens > 0 and n_prompt + max_tokens > limit:
        raise OpenAIApiError(400, f"prompt ({n_prompt} tokens) + {field} ({max_tokens}) exceeds the model's "
                                  f"context of {limit} tokens", ("body", field), code="context_length_exceeded")


def _prompt_ids(services: Services, prompt: Any) -> list[list[int]]:
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
    scorer = services.scorer
    out: list[list[int]] = []
    for i, item in enumerate(items):
        loc: tuple[str | int, ...] = ("body", "prompt") if len(items) == 1 else ("body", "prompt", i)
        if isinstance(item, str):
            check_prompt_chars(services, item, loc)
            ids = scorer.encode(item)
        else:
            ids = list(item)
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise OpenAIApiError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", loc)
        if not ids:
            if scorer.prefix_token_id is None:
                raise OpenAIApiError(400, "prompt is empty and the model has no BOS token", loc)
            ids = [scorer.prefix_token_id]
        check_prompt_tokens(services, len(ids), loc)
        out.append(ids)
    return out


def _check_batch(services: Services, n_sequences: int) -> None:
    limit = services.settings.max_queue
    if n_sequences > limit:
        raise OpenAIApiError(400, f"{n_sequences} sequences (prompts x n) exceed the {limit} one request may "
                                  "ask for (max_queue)", ("body", "n"))


def _gen_request(body: CompletionRequest | ChatCompletionRequest, ids: list[int], max_tokens: int, j: int,
                 logprobs: int | None) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids=ids, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=max(body.top_k, 0), seed=None if body.seed is None else body.seed + j, stop=body.stop_list,
        logprobs=logprobs)


#: Tokens of context kept to decode the next streamed delta's token strings (enough for any multi-byte character).
_CONTEXT_TOKENS = 8


def _generated(result: GenerationResult) -> _Scored:
    return _Scored(list(result.token_ids), list(result.token_logprobs or []), list(result.top_logprobs or []))


def _joined(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=[t for p in parts for t in p.tokens],
                              token_logprobs=[t for p in parts for t in p.token_logprobs],
                              top_logprobs=[t for p in parts for t in p.top_logprobs],
                              text_offset=[t for p in parts for t in p.text_offset])


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def _sse_error(exc: BaseException) -> str:
    message = exc.message if isinstance(exc, ApiError) else f"{type(exc).__name__}: {exc}"
    return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


async def _merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
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


# --------------------------------------------------------------------------------------------- models


def list_models(services: Services) -> ModelList:
    root = services.loaded.model_id
    limit = _max_positions(services)
    cards = [ModelCard(id="base", created=_STARTED, root=root, max_model_len=limit)]
    cards += [ModelCard(id=p.name, created=int(p.created_at), root=root, parent="base", max_model_len=limit,
                        description=p.description or None) for p in services.profiles.list()]
    return ModelList(data=cards)


def get_model(services: Services, name: str) -> ModelCard:
    for card in list_models(services).data:
        if card.id == name:
            return card
    known = ", ".join(c.id for c in list_models(services).data)
    raise OpenAIApiError(404, f"The model {name!r} does not exist; known models: {known}", ("path", "model"),
                         code="model_not_found")


# --------------------------------------------------------------------------------------------- completions


@dataclass
class _Scored:
    """Tokens with their log-prob (None: unconditioned first token) and alternatives (id -> log-prob)."""

    ids: list[int]
    logprobs: list[float | None]
    tops: list[dict[int, float] | None]

    def __add__(self, other: _Scored) -> _Scored:
        return _Scored(self.ids + other.ids, self.logprobs + other.logprobs, self.tops + other.tops)


@dataclass
class _Choice:
    prompt_index: int
    j: int
    result: GenerationResult
    gen: _Scored | None = None  # scored generated tokens (EOS included), when logprobs were asked for
    prompt: _Scored | None = None  # scored prompt tokens, with echo + logprobs


class _Completion:
    """A validated completion request, ready to run."""

    def __init__(self, services: Services, request: Request, body: CompletionRequest) -> None:
        self.services, self.request, self.body = services, request, body
        self.profile = resolve_model(services, request, body.model)
        self.resolved = services.engine.resolve(self.profile)
        self.prompts = _prompt_ids(services, body.prompt)
        limit = services.settings.max_new_tokens
        self.max_tokens = body.max_tokens if body.max_tokens is not None else min(DEFAULT_COMPLETION_TOKENS, limit)
        check_new_tokens(services, self.max_tokens, ("body", "max_tokens"))
        for ids in self.prompts:
            _check_context(services, len(ids), self.max_tokens, "max_tokens")
        _check_batch(services, len(self.prompts) * body.n)
        self.tt = token_text(services)
        self.engine = services.engine
        self.want_logprobs = body.logprobs is not None
        self.top_n = body.logprobs or 0
        self.eos_ids = set(services.scorer.eos_token_ids)
        eos = services.loaded.tokenizer.eos_token_id
        self.eos_filler = eos if eos in self.eos_ids else (min(self.eos_ids) if self.eos_ids else None)
        self.id = _new_id("cmpl")
        self.created = int(time.time())

    # ---- running

    @property
    def fast_path(self) -> bool:
        """lm-eval's loglikelihood call: greedy, one token, echo + logprobs -> one scoring pass."""
        b = self.body
        return b.echo and self.want_logprobs and b.temperature == 0 and self.max_tokens == 1

    def requests(self) -> list[GenerationRequest]:
        # With echo the generated tokens are re-scored together with the prompt, so no logprobs here.
        lp = self.top_n if self.want_logprobs and not self.body.echo else None
        return [_gen_request(self.body, ids, self.max_tokens, j, lp)
                for ids in self.prompts for j in range(self.body.n)]

    def _pairs(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(len(self.prompts)) for j in range(self.body.n)]

    async def _prompt_logprobs(self, seqs: list[list[int]], top_n: int) -> list[PromptLogprobs]:
        served = await self.engine.prompt_logprobs(self.resolved, seqs, top_n,
                                                   is_disconnected=self.request.is_disconnected)
        return served.value

    async def run(self) -> list[_Choice]:
        if self.max_tokens == 0:
            choices = [_Choice(i, j, GenerationResult("", [], "length", len(self.prompts[i])), gen=_Scored([], [], []))
                       for i, j in self._pairs()]
        elif self.fast_path:
            choices = await self._run_fast()
        else:
            served = await self.engine.generate(self.resolved, self.requests(),
                                                is_disconnected=self.request.is_disconnected)
            choices = [_Choice(i, j, r) for (i, j), r in zip(self._pairs(), served.value, strict=True)]
        await self.score(choices)
        return choices

    async def _run_fast(self) -> list[_Choice]:
        filler = self.eos_filler if self.eos_filler is not None else self.prompts[0][0]
        scored = await self._prompt_logprobs([ids + [filler] for ids in self.prompts], max(self.top_n, 1))
        choices = []
        for i, (ids, s) in enumerate(zip(self.prompts, scored, strict=True)):
            last = s.top_logprobs[-1] or {}
            token = max(last, key=last.__getitem__)
            gen = _Scored([token], [last[token]], [last])
            prompt = _Scored(ids, s.token_logprobs[:-1], s.top_logprobs[:-1])
            if token in self.eos_ids:
                result = GenerationResult("", [], "stop", len(ids))
            else:
                text = "".join(self.tt.pieces([token], context=ids[-1:], skip_special=True))
                cut = min((k for k in (text.find(x) for x in self.body.stop_list) if k >= 0), default=-1)
                result = GenerationResult(text if cut < 0 else text[:cut], [token],
                                          "stop" if cut >= 0 else "length", len(ids))
            choices += [_Choice(i, j, result, gen=gen, prompt=prompt) for j in range(self.body.n)]
        return choices

    def _ended_by_eos(self, c: _Choice) -> bool:
        r = c.result
        if r.finish_reason != "stop" or self.eos_filler is None:
            return False
        full = "".join(self.tt.pieces(r.token_ids, context=self.prompts[c.prompt_index][-1:], skip_special=True))
        return not any(s in full for s in self.body.stop_list)

    async def score(self, choices: list[_Choice]) -> None:
        """Fill in log-probs: the echoed prompt and, if missing, generated tokens and an ending EOS."""
        if not self.want_logprobs:
            return
        todo = [c for c in choices if c.gen is None or (self.body.echo and c.prompt is None)]
        if not todo:
            return
        if self.body.echo:
            # Prompt + generated (+ EOS) in one batched scoring pass.
            eos = [self._ended_by_eos(c) for c in todo]
            seqs = [self.prompts[c.prompt_index] + c.result.token_ids + ([self.eos_filler] if e else [])
                    for c, e in zip(todo, eos)]
            top_n = max(self.top_n, 1) if any(eos) else self.top_n
            scored = await self._prompt_logprobs(seqs, top_n)
            for c, e, s in zip(todo, eos, scored, strict=True):
                n = len(self.prompts[c.prompt_index])
                c.prompt = _Scored(s.token_ids[:n], s.token_logprobs[:n], s.top_logprobs[:n])
                c.gen = _Scored(s.token_ids[n:], s.token_logprobs[n:], s.top_logprobs[n:])
                if e:
                    self._pick_eos(c.gen)
            return
        for c in todo:
            c.gen = _generated(c.result)
        await self._append_eos(todo)

    async def _append_eos(self, choices: list[_Choice]) -> None:
        """Add the ending EOS (scored in one more pass) to the generated log-probs of choices it ended."""
        ended = [c for c in choices if self._ended_by_eos(c)]
        if ended:  # one more pass for the distribution after the last generated token
            seqs = [self.prompts[c.prompt_index] + c.result.token_ids + [self.eos_filler] for c in ended]
            scored = await self._prompt_logprobs(seqs, max(self.top_n, 1))
            for c, s in zip(ended, scored, strict=True):
                eos = _Scored(s.token_ids[-1:], s.token_logprobs[-1:], s.top_logprobs[-1:])
                self._pick_eos(eos)
                c.gen = c.gen + eos  # type: ignore[operator]

    def _pick_eos(self, gen: _Scored) -> None:
        """The scored filler EOS becomes the EOS the model prefers there (greedy picks the top one)."""
        top = gen.tops[-1] or {}
        best = max(top, key=top.__getitem__) if top else None
        if best is not None and best in self.eos_ids:
            gen.ids[-1], gen.logprobs[-1] = best, top[best]

    # ---- response layout

    def logprobs_of(self, c: _Choice) -> CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        parts = []
        text_len = 0
        if self.body.echo and c.prompt is not None:
            parts.append(self._entries(c.prompt, context=(), offset=0, generated=False))
            text_len = sum(len(p) for p in parts[0].tokens)
        ids = self.prompts[c.prompt_index]
        parts.append(self._entries(c.gen or _Scored([], [], []), context=ids[-1:], offset=text_len,
                                   end=text_len + len(c.result.text)))
        return _joined(parts)

    def _entries(self, scored: _Scored, *, context: Sequence[int], offset: int, generated: bool = True,
                 end: int | None = None) -> CompletionLogprobs:
        """Log-prob entries of ``scored`` tokens whose text starts at character ``offset`` of the choice's text
        (offsets capped at ``end``: tokens past a stop string point at the text's end)."""
        pieces = self.tt.pieces(scored.ids, context=context, skip_special=generated)
        offsets = []
        pos = offset
        for p in pieces:
            offsets.append(pos if end is None else min(pos, end))
            pos += len(p)
        tops = [None if lp is None else self._top(t, lp, top) for t, lp, top in
                zip(scored.ids, scored.logprobs, scored.tops)]
        tokens = self.tt.token_strings(scored.ids, pieces) if generated else pieces
        return CompletionLogprobs(tokens=tokens, token_logprobs=scored.logprobs, top_logprobs=tops,
                                  text_offset=offsets)

    def _top(self, token: int, logprob: float, top: dict[int, float] | None) -> dict[str, float]:
        """The top-N alternatives plus the chosen token (OpenAI: up to logprobs + 1 entries)."""
        best = sorted((top or {}).items(), key=lambda kv: -kv[1])[: self.top_n]
        out: dict[str, float] = {}
        for t, lp in [*best, (token, logprob)]:
            key = self.tt.single(t)
            if key not in out or lp > out[key]:
                out[key] = lp
        return out

    def echo_text(self, prompt_index: int) -> str:
        return "".join(self.tt.pieces(self.prompts[prompt_index])) if self.body.echo else ""

    def usage(self, choices: list[_Choice]) -> Usage:
        prompt = sum(len(ids) for ids in self.prompts)
        completion = sum(len(c.result.token_ids) for c in choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def response(self, choices: list[_Choice]) -> CompletionResponse:
        out = []
        for idx, c in enumerate(choices):
            out.append(CompletionChoice(index=idx, text=self.echo_text(c.prompt_index) + c.result.text,
                                        logprobs=self.logprobs_of(c), finish_reason=_finish(c.result.finish_reason)))
        return CompletionResponse(id=self.id, created=self.created, model=self.body.model or self.profile,
                                  choices=out, usage=self.usage(choices), system_fingerprint=self.resolved.stamp.hash)

    # ---- streaming

    def _chunk(self, index: int, text: str, logprobs: CompletionLogprobs | None = None,
               finish: str | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.body.model or self.profile,
                                  choices=[CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                            finish_reason=finish)],
                                  system_fingerprint=self.resolved.stamp.hash)

    def stream_requests(self) -> list[GenerationRequest]:
        """Streamed choices carry their log-probs with each delta, so they are recorded while generating."""
        lp = self.top_n if self.want_logprobs else None
        return [_gen_request(self.body, ids, self.max_tokens, j, lp)
                for ids in self.prompts for j in range(self.body.n)]

    async def stream(self) -> AsyncIterator[str]:
        """SSE lines: per choice the echoed prompt (with its log-probs), text deltas (each with the log-probs of
        its tokens), a last chunk with finish_reason (and the log-prob of an ending EOS), then an optional usage
        chunk and ``[DONE]``."""
        pairs = self._pairs()
        finals: dict[int, _Choice] = {}
        try:
            if self.max_tokens == 0:
                if self.body.echo:
                    for idx, (i, _) in enumerate(pairs):
                        if text := self.echo_text(i):
                            yield _sse(self._chunk(idx, text))
                choices = await self.run()
                for idx, c in enumerate(choices):
                    finals[idx] = c
                    yield _sse(self._chunk(idx, "", self.logprobs_of(c), _finish(c.result.finish_reason)))
            else:
                async for line in self._stream_generated(pairs, finals):
                    yield line
            if self.body.include_usage:
                usage = self.usage([finals[k] for k in sorted(finals)])
                yield _sse(CompletionResponse(id=self.id, created=self.created, model=self.body.model or self.profile,
                                              choices=[], usage=usage, system_fingerprint=self.resolved.stamp.hash))
        except Exception as exc:  # noqa: BLE001 - headers are sent; report in the stream
            yield _sse_error(exc)
        yield "data: [DONE]\n\n"

    async def _stream_generated(self, pairs: list[tuple[int, int]], finals: dict[int, _Choice]) -> AsyncIterator[str]:
        prompts: dict[int, _Scored] = {}
        if self.body.echo and self.want_logprobs:
            scored = await self._prompt_logprobs(self.prompts, self.top_n)
            prompts = {i: _Scored(s.token_ids, s.token_logprobs, s.top_logprobs) for i, s in enumerate(scored)}
        offsets = [0] * len(pairs)  # characters of each choice's text sent so far
        contexts = [self.prompts[i][-1:] for i, _ in pairs]  # tokens that precede the next delta's tokens
        if self.body.echo:
            for idx, (i, _) in enumerate(pairs):
                text = self.echo_text(i)
                offsets[idx] = len(text)
                lp = self._entries(prompts[i], context=(), offset=0, generated=False) if i in prompts else None
                if text or lp is not None:
                    yield _sse(self._chunk(idx, text, lp))
        streams = [self.engine.generate_stream(self.resolved, req) for req in self.stream_requests()]
        async for idx, item in _merge(streams):
            if isinstance(item, str):
                if item:
                    yield _sse(self._chunk(idx, item))
                continue
            if isinstance(item, GenerationDelta):
                scored = _Scored(item.token_ids, list(item.token_logprobs or []), list(item.top_logprobs or []))
                yield _sse(self._chunk(idx, item.text, self._entries(scored, context=contexts[idx],
                                                                     offset=offsets[idx])))
                offsets[idx] += len(item.text)
                contexts[idx] = (contexts[idx] + item.token_ids)[-_CONTEXT_TOKENS:]
                continue
            i, j = pairs[idx]
            c = finals[idx] = _Choice(i, j, item, gen=_generated(item), prompt=prompts.get(i))
            eos = None
            if self.want_logprobs:
                n = len(c.gen.ids)  # type: ignore[union-attr]
                await self._append_eos([c])
                gen = c.gen or _Scored([], [], [])
                if len(gen.ids) > n:
                    eos = self._entries(_Scored(gen.ids[n:], gen.logprobs[n:], gen.tops[n:]),
                                        context=contexts[idx], offset=offsets[idx])
            yield _sse(self._chunk(idx, "", eos, _finish(item.finish_reason)))


async def create_completion(services: Services, request: Request,
                            body: CompletionRequest) -> tuple[CompletionResponse | AsyncIterator[str], str]:
    """Validate, then either run to a response or hand back the SSE stream; with the X-Laser-Profile value."""
    job = _Completion(services, request, body)
    await profile_ready(services, job.profile)
    if body.stream:
        services.engine.check_capacity()  # 429 while a status can still be sent
        return job.stream(), job.resolved.stamp.header
    choices = await job.run()
    response = await asyncio.to_thread(job.response, choices) if body.echo else job.response(choices)
    return response, job.resolved.stamp.header


# --------------------------------------------------------------------------------------------- chat


def render_chat(services: Services, messages: list[Any], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, extra: dict[str, Any] | None = None) -> list[int]:
    """Token ids of the chat as the model's chat template renders it (no extra special tokens)."""
    tokenizer = services.loaded.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIApiError(400, f"model {services.loaded.model_id!r} has no chat template; use /v1/completions",
                             ("body", "messages"))
    try:
        text = tokenizer.apply_chat_template(
            [m.as_template_input() for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **(extra or {}))
    except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
        raise OpenAIApiError(400, f"chat template failed: {exc}", ("body", "messages")) from None
    return list(tokenizer(text, add_special_tokens=False).input_ids)


class _Chat:
    def __init__(self, services: Services, request: Request, body: ChatCompletionRequest) -> None:
        self.services, self.request, self.body = services, request, body
        self.profile = resolve_model(services, request, body.model)
        self.resolved = services.engine.resolve(self.profile)
        check_prompt_chars(services, "".join(m.as_template_input()["content"] for m in body.messages),
                           ("body", "messages"), "chat")
        self.ids = render_chat(services, body.messages, add_generation_prompt=body.add_generation_prompt,
                               continue_final_message=body.continue_final_message,
                               extra=body.chat_template_kwargs)
        check_prompt_tokens(services, len(self.ids), ("body", "messages"))
        requested = body.requested_max_tokens
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        limit = services.settings.max_new_tokens
        if requested is None:
            room = _max_positions(services)
            self.max_tokens = limit if room is None else min(limit, room - len(self.ids))
            if self.max_tokens <= 0:
                raise OpenAIApiError(400, f"the chat ({len(self.ids)} tokens) fills the model's context",
                                     ("body", "messages"), code="context_length_exceeded")
        else:
            self.max_tokens = requested
            check_new_tokens(services, requested, ("body", field))
            _check_context(services, len(self.ids), requested, field)
        _check_batch(services, body.n)
        self.tt = token_text(services)
        self.top_n = (body.top_logprobs or 0) if body.logprobs else None
        self.id = _new_id("chatcmpl")
        self.created = int(time.time())
        self.model = body.model or self.profile

    def requests(self) -> list[GenerationRequest]:
        return [_gen_request(self.body, self.ids, self.max_tokens, j, self.top_n) for j in range(self.body.n)]

    def logprobs_of(self, r: GenerationResult) -> ChatChoiceLogprobs | None:
        if self.top_n is None:
            return None
        return self._content(r.token_ids, r.token_logprobs or [], r.top_logprobs or [], context=self.ids[-1:])

    def _content(self, ids: Sequence[int], logprobs: Sequence[float], tops: Sequence[dict[int, float]], *,
                 context: Sequence[int]) -> ChatChoiceLogprobs:
        """Per-token entries of ``ids`` (decoded after ``context``)."""
        pieces = self.tt.pieces(ids, context=context, skip_special=True)
        content = []
        for text, lp, top in zip(self.tt.token_strings(ids, pieces), logprobs, tops):
            alts = sorted(top.items(), key=lambda kv: -kv[1])[: self.top_n]
            content.append(ChatTokenLogprob(
                token=text, logprob=lp, bytes=list(text.encode()),
                top_logprobs=[TopLogprob(token=self.tt.single(t), logprob=v, bytes=list(self.tt.single(t).encode()))
                              for t, v in alts]))
        return ChatChoiceLogprobs(content=content)

    def usage(self, results: list[GenerationResult]) -> Usage:
        completion = sum(len(r.token_ids) for r in results)
        return Usage(prompt_tokens=len(self.ids), completion_tokens=completion,
                     total_tokens=len(self.ids) + completion)

    def response(self, results: list[GenerationResult]) -> ChatCompletionResponse:
        choices = [ChatChoice(index=j, message=AssistantMessage(content=r.text), logprobs=self.logprobs_of(r),
                              finish_reason=_finish(r.finish_reason)) for j, r in enumerate(results)]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=self.usage(results), system_fingerprint=self.resolved.stamp.hash)

    def _chunk(self, choices: list[ChatStreamChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage,
                                   system_fingerprint=self.resolved.stamp.hash)

    async def stream(self) -> AsyncIterator[str]:
        """SSE lines: per choice a role chunk, content deltas (each with the log-probs of its tokens when asked
        for), a last chunk with finish_reason, then an optional usage chunk and ``[DONE]``."""
        results: dict[int, GenerationResult] = {}
        contexts = [self.ids[-1:] for _ in range(self.body.n)]
        try:
            for j in range(self.body.n):
                yield _sse(self._chunk([ChatStreamChoice(index=j, delta=ChatDelta(role="assistant", content=""))]))
            streams = [self.services.engine.generate_stream(self.resolved, req) for req in self.requests()]
            async for j, item in _merge(streams):
                if isinstance(item, str):
                    if item:
                        yield _sse(self._chunk([ChatStreamChoice(index=j, delta=ChatDelta(content=item))]))
                    continue
                if isinstance(item, GenerationDelta):
                    logprobs = self._content(item.token_ids, item.token_logprobs or [], item.top_logprobs or [],
                                             context=contexts[j])
                    contexts[j] = (contexts[j] + item.token_ids)[-_CONTEXT_TOKENS:]
                    yield _sse(self._chunk([ChatStreamChoice(index=j, delta=ChatDelta(content=item.text),
                                                             logprobs=logprobs)]))
                    continue
                results[j] = item
                yield _sse(self._chunk([ChatStreamChoice(index=j, delta=ChatDelta(),
                                                         finish_reason=_finish(item.finish_reason))]))
            if self.body.include_usage:
                yield _sse(self._chunk([], self.usage([results[k] for k in sorted(results)])))
        except Exception as exc:  # noqa: BLE001 - headers are sent; report in the stream
            yield _sse_error(exc)
        yield "data: [DONE]\n\n"


async def create_chat_completion(services: Services, request: Request, body: ChatCompletionRequest
                                 ) -> tuple[ChatCompletionResponse | AsyncIterator[str], str]:
    """Validate, then either run to a response or hand back the SSE stream; with the X-Laser-Profile value."""
    job = _Chat(services, request, body)
    await profile_ready(services, job.profile)
    if body.stream:
        services.engine.check_capacity()  # 429 while a status can still be sent
        return job.stream(), job.resolved.stamp.header
    served = await services.engine.generate(job.resolved, job.requests(), is_disconnected=request.is_disconnected)
    return job.response(served.value), job.resolved.stamp.header


# --------------------------------------------------------------------------------------------- tokenizer


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
        ids = services.scorer.encode(body.prompt or "")
    elif body.prompt:
        ids = list(services.loaded.tokenizer(body.prompt, add_special_tokens=False).input_ids)
    else:
        ids = []
    check_prompt_tokens(services, len(ids), ("body", "prompt"))
    return _tokenized(services, ids, body.return_token_strs)


def _tokenized(services: Services, ids: list[int], with_strings: bool) -> TokenizeResponse:
    strs = None
    if with_strings:
        tt = token_text(services)
        strs = tt.token_strings(ids, tt.pieces(ids))
    return TokenizeResponse(count=len(ids), max_model_len=_max_positions(services), tokens=ids, token_strs=strs)


def detokenize(services: Services, request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
    _check_optional_model(services, request, body.model)
    vocab = vocab_size(services)
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise OpenAIApiError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", ("body", "tokens"))
    return DetokenizeResponse(prompt=services.scorer.decode(body.tokens))


def tokenizer_info(services: Services) -> TokenizerInfo:
    tok = services.loaded.tokenizer
    return TokenizerInfo(
        tokenizer_class=type(tok).__name__, bos_token=tok.bos_token, eos_token=tok.eos_token,
        pad_token=tok.pad_token, unk_token=tok.unk_token, chat_template=getattr(tok, "chat_template", None),
        model_max_length=_max_positions(services), vocab_size=len(tok),
        add_bos_token=bool(services.scorer.prefix_ids))


__all__ = [
    "OpenAIApiError", "TokenText", "create_chat_completion", "create_completion", "detokenize", "get_model",
    "list_models", "render_chat", "resolve_model", "tokenize", "tokenizer_info",
]
