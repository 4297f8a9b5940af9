"""``/v1/chat/completions``: the model's chat template, then generation with per-token log-probs, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from fastapi import Request

from laser_ops.scoring import GenerationDelta, GenerationRequest, GenerationResult
from server import sse
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
    TopLogprob,
    Usage,
)
from server.serving.common import check_new_tokens, check_prompt_chars, check_prompt_tokens, profile_ready
from server.state import Services
from server.serving.openai.common import (
    CONTEXT_TOKENS,
    OpenAIApiError,
    check_batch,
    check_context,
    gen_request,
    max_positions,
    merge_streams,
    new_id,
    openai_finish,
    render_chat,
    resolve_model,
    sse_error,
    token_text,
)


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
            room = max_positions(services)
            self.max_tokens = limit if room is None else min(limit, room - len(self.ids))
            if self.max_tokens <= 0:
                raise OpenAIApiError(400, f"the chat ({len(self.ids)} tokens) fills the model's context",
                                     ("body", "messages"), code="context_length_exceeded")
        else:
            self.max_tokens = requested
            check_new_tokens(services, requested, ("body", field))
            check_context(services, len(self.ids), requested, field)
        check_batch(services, body.n)
        self.tt = token_text(services)
        self.top_n = (body.top_logprobs or 0) if body.logprobs else None
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.model = body.model or self.profile

    def requests(self) -> list[GenerationRequest]:
        return [gen_request(self.body, self.ids, self.max_tokens, j, self.top_n) for j in range(self.body.n)]

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
                              finish_reason=openai_finish(r.finish_reason)) for j, r in enumerate(results)]
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
                yield sse.data(self._chunk([ChatStreamChoice(index=j, delta=ChatDelta(role="assistant", content=""))]))
            streams = [self.services.engine.generate_stream(self.resolved, req) for req in self.requests()]
            async for j, item in merge_streams(streams):
                if isinstance(item, str):
                    if item:
                        yield sse.data(self._chunk([ChatStreamChoice(index=j, delta=ChatDelta(content=item))]))
                    continue
                if isinstance(item, GenerationDelta):
                    logprobs = self._content(item.token_ids, item.token_logprobs or [], item.top_logprobs or [],
                                             context=contexts[j])
                    contexts[j] = (contexts[j] + item.token_ids)[-CONTEXT_TOKENS:]
                    yield sse.data(self._chunk([ChatStreamChoice(index=j, delta=ChatDelta(content=item.text),
                                                             logprobs=logprobs)]))
                    continue
                results[j] = item
                yield sse.data(self._chunk([ChatStreamChoice(index=j, delta=ChatDelta(),
                                                         finish_reason=openai_finish(item.finish_reason))]))
            if self.body.include_usage:
                yield sse.data(self._chunk([], self.usage([results[k] for k in sorted(results)])))
        except Exception as exc:  # noqa: BLE001 - headers are sent; report in the stream
            yield sse_error(exc)
        yield sse.DONE


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
