"""``/v1/completions``: generation, echo and log-probs in the layout lm-evaluation-harness reads (see the package
docstring), streamed or not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastapi import Request

from laser_ops.scoring import GenerationDelta, GenerationRequest, GenerationResult, PromptLogprobs
from server import sse
from laser_protocol.openai import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from server.serving.common import check_new_tokens, profile_ready
from server.state import Services
from server.serving.openai.common import (
    CONTEXT_TOKENS,
    DEFAULT_COMPLETION_TOKENS,
    check_batch,
    check_context,
    gen_request,
    merge_streams,
    new_id,
    openai_finish,
    prompt_ids,
    resolve_model,
    sse_error,
    token_text,
)


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


def _generated(result: GenerationResult) -> _Scored:
    return _Scored(list(result.token_ids), list(result.token_logprobs or []), list(result.top_logprobs or []))


def _joined(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=[t for p in parts for t in p.tokens],
                              token_logprobs=[t for p in parts for t in p.token_logprobs],
                              top_logprobs=[t for p in parts for t in p.top_logprobs],
                              text_offset=[t for p in parts for t in p.text_offset])


class _Completion:
    """A validated completion request, ready to run."""

    def __init__(self, services: Services, request: Request, body: CompletionRequest) -> None:
        self.services, self.request, self.body = services, request, body
        self.profile = resolve_model(services, request, body.model)
        self.resolved = services.engine.resolve(self.profile)
        self.prompts = prompt_ids(services, body.prompt)
        limit = services.settings.max_new_tokens
        self.max_tokens = body.max_tokens if body.max_tokens is not None else min(DEFAULT_COMPLETION_TOKENS, limit)
        check_new_tokens(services, self.max_tokens, ("body", "max_tokens"))
        for ids in self.prompts:
            check_context(services, len(ids), self.max_tokens, "max_tokens")
        check_batch(services, len(self.prompts) * body.n)
        self.tt = token_text(services)
        self.engine = services.engine
        self.want_logprobs = body.logprobs is not None
        self.top_n = body.logprobs or 0
        self.eos_ids = set(services.engine.info.eos_token_ids)
        eos = services.engine.info.tokenizer.eos_token_id
        self.eos_filler = eos if eos in self.eos_ids else (min(self.eos_ids) if self.eos_ids else None)
        self.id = new_id("cmpl")
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
        return [gen_request(self.body, ids, self.max_tokens, j, lp)
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
                                        logprobs=self.logprobs_of(c), finish_reason=openai_finish(c.result.finish_reason)))
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
        return [gen_request(self.body, ids, self.max_tokens, j, lp)
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
                            yield sse.data(self._chunk(idx, text))
                choices = await self.run()
                for idx, c in enumerate(choices):
                    finals[idx] = c
                    yield sse.data(self._chunk(idx, "", self.logprobs_of(c), openai_finish(c.result.finish_reason)))
            else:
                async for line in self._stream_generated(pairs, finals):
                    yield line
            if self.body.include_usage:
                usage = self.usage([finals[k] for k in sorted(finals)])
                yield sse.data(CompletionResponse(id=self.id, created=self.created, model=self.body.model or self.profile,
                                              choices=[], usage=usage, system_fingerprint=self.resolved.stamp.hash))
        except Exception as exc:  # noqa: BLE001 - headers are sent; report in the stream
            yield sse_error(exc)
        yield sse.DONE

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
                    yield sse.data(self._chunk(idx, text, lp))
        streams = [self.engine.generate_stream(self.resolved, req) for req in self.stream_requests()]
        async for idx, item in merge_streams(streams):
            if isinstance(item, str):
                if item:
                    yield sse.data(self._chunk(idx, item))
                continue
            if isinstance(item, GenerationDelta):
                scored = _Scored(item.token_ids, list(item.token_logprobs or []), list(item.top_logprobs or []))
                yield sse.data(self._chunk(idx, item.text, self._entries(scored, context=contexts[idx],
                                                                     offset=offsets[idx])))
                offsets[idx] += len(item.text)
                contexts[idx] = (contexts[idx] + item.token_ids)[-CONTEXT_TOKENS:]
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
            yield sse.data(self._chunk(idx, "", eos, openai_finish(item.finish_reason)))


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
