"""Native inference logic: generate (plain or streamed), score (log-probs or perplexity), compare (A/B).

Everything heavy runs on the engine's owner thread; this module only tokenizes, checks limits, submits
and shapes answers. Expected failures raise :class:`ApiError` naming the field.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import aclosing
from typing import Any, TypeVar

from fastapi import Request

from laser_ops.scoring import GenerationRequest, GenerationResult, LoglikelihoodResult, RollingResult
from server import sse
from server.engine import ProfileStamp, Served
from server.errors import ApiError
from laser_protocol.inference import (
    DEFAULT_MAX_NEW_TOKENS,
    CompareDiff,
    CompareRequest,
    CompareResponse,
    ContinuationScore,
    GenerateChoice,
    GenerateDiff,
    GenerateParams,
    GenerateRequest,
    GenerateResponse,
    GenerateStreamEvent,
    PerplexityScore,
    ScoreDiff,
    ScoreParams,
    ScoreRequest,
    ScoreResponse,
    StreamError,
    TextDiff,
    GenerateUsage,
)
from server.serving.common import (
    check_new_tokens,
    check_prompt_chars,
    check_prompt_tokens,
    profile_ready,
    resolve_profile,
)
from server.state import Services

T = TypeVar("T")
Disconnected = Callable[[], Awaitable[bool]] | None
Loc = tuple[str | int, ...]

def _encode(services: Services, text: str, loc: Loc) -> list[int]:
    """Token ids of a prompt, refusing oversize prompts (cheap length check first, then the real count)."""
    check_prompt_chars(services, text, loc)
    ids = services.engine.info.encode(text)
    check_prompt_tokens(services, len(ids), loc)
    return ids


def _check_positions(services: Services, n_prompt: int, max_new: int, loc: Loc) -> None:
    limit = services.engine.info.max_positions
    if limit is not None and n_prompt + max_new > limit:
        raise ApiError(422, f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new}) exceeds the model's "
                            f"{limit} positions", loc)


def _admit(services: Services) -> None:
    """429 before a stream starts (afterwards the status is already sent)."""
    services.engine.check_capacity()


# ---------------------------------------------------------------------------------------------- generate


def _generation_requests(services: Services, params: GenerateParams, loc: Loc) -> list[Any]:
    limit = services.settings.max_new_tokens
    max_new = min(DEFAULT_MAX_NEW_TOKENS, limit) if params.max_new_tokens is None else params.max_new_tokens
    check_new_tokens(services, max_new, (*loc, "max_new_tokens"))
    requests = []
    field = "prompt" if params.prompt is not None else "prompts"
    for i, text in enumerate(params.prompt_list):
        where = (*loc, field) if field == "prompt" else (*loc, field, i)
        ids = _encode(services, text, where)
        _check_positions(services, len(ids), max_new, where)
        requests.append(GenerationRequest(prompt_ids=ids, max_new_tokens=max_new, temperature=params.temperature,
                                          top_p=params.top_p, top_k=params.top_k, seed=params.seed,
                                          stop=list(params.stop or [])))
    return requests


def _usage(results: list[GenerationResult]) -> GenerateUsage:
    p = sum(r.n_prompt_tokens for r in results)
    c = sum(len(r.token_ids) for r in results)
    return GenerateUsage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _generate_response(served: Served[list[GenerationResult]]) -> GenerateResponse:
    results = served.value
    choices = [GenerateChoice(index=i, text=r.text, finish_reason=r.finish_reason, prompt_tokens=r.n_prompt_tokens,
                              completion_tokens=len(r.token_ids)) for i, r in enumerate(results)]
    return GenerateResponse(profile=served.profile.name, profile_hash=served.profile.hash, choices=choices,
                            usage=_usage(results))


async def _run_generate(services: Services, profile: str, params: GenerateParams, loc: Loc,
                        is_disconnected: Disconnected) -> GenerateResponse:
    requests = _generation_requests(services, params, loc)
    return _generate_response(await services.engine.generate(profile, requests, is_disconnected=is_disconnected))


async def generate(services: Services, request: Request, body: GenerateRequest) -> tuple[GenerateResponse, str]:
    """The response and its ``X-Laser-Profile`` header value."""
    profile = resolve_profile(services, request, body.profile)
    await profile_ready(services, profile)
    response = await _run_generate(services, profile, body, ("body",), request.is_disconnected)
    return response, stamp_header(response.profile, response.profile_hash)


async def generate_stream(services: Services, request: Request, body: GenerateRequest
                          ) -> tuple[AsyncIterator[sse.Event], str]:
    """Validate now (errors keep their 4xx status), then return the SSE events and the
    ``X-Laser-Profile`` header value (the profile is resolved before the first token).

    Events: a first ``data: {profile, profile_hash}`` (no text), then one per text delta, a final one
    with finish_reason and usage, then ``data: [DONE]``. Closing the iterator (client gone) cancels the
    request on the engine.
    """
    profile = resolve_profile(services, request, body.profile)
    [req] = _generation_requests(services, body, ("body",))
    await profile_ready(services, profile)
    _admit(services)
    resolved = services.engine.resolve(profile)
    stamp = resolved.stamp
    stream = services.engine.generate_stream(resolved, req)

    def event(**kw: Any) -> str:
        return sse.data(GenerateStreamEvent(profile=stamp.name, profile_hash=stamp.hash, **kw), exclude_none=True)

    async def events() -> AsyncIterator[sse.Event]:
        yield event()
        try:
            async with aclosing(stream):
                async for item in stream:
                    if isinstance(item, str):
                        yield event(text=item)
                    elif isinstance(item, GenerationResult):
                        yield event(finish_reason=item.finish_reason, usage=_usage([item]))
        except ApiError as e:
            yield sse.data(StreamError(error=e.message), exclude_none=True)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
            yield sse.data(StreamError(error=f"{type(e).__name__}: {e}"), exclude_none=True)
        yield sse.DONE

    return events(), stamp.header


# ---------------------------------------------------------------------------------------------- score


def _continuation_scores(params: ScoreParams, results: list[LoglikelihoodResult]) -> tuple[list[ContinuationScore], int]:
    scores = [ContinuationScore(continuation=c, logprob=r.logprob, n_tokens=r.n_tokens, is_greedy=r.is_greedy,
                                mean_logprob=r.logprob / r.n_tokens if r.n_tokens else None)
              for c, r in zip(params.continuations or [], results, strict=True)]
    keys = [r.logprob / max(r.n_tokens, 1) if params.normalize else r.logprob for r in results]
    best = max(range(len(keys)), key=lambda i: (keys[i], -i))
    return scores, best


async def _run_score(services: Services, profile: str, params: ScoreParams, loc: Loc,
                     is_disconnected: Disconnected) -> ScoreResponse:
    engine, text = services.engine, services.engine.info
    if params.text is not None:
        check_prompt_chars(services, params.text, (*loc, "text"), "text")
        check_prompt_tokens(services, len(text.encode(params.text)), (*loc, "text"))
        served = await engine.rolling(profile, [params.text], is_disconnected=is_disconnected)
        [rolled] = served.value
        assert isinstance(rolled, RollingResult)
        ppl = PerplexityScore(logprob=rolled.logprob, n_tokens=rolled.n_tokens,
                              perplexity=rolled.perplexity if rolled.n_tokens else None)
        return ScoreResponse(profile=served.profile.name, profile_hash=served.profile.hash, perplexity=ppl)
    context = params.context or ""
    _encode(services, context, (*loc, "context"))  # size checks before the pairs are built
    pairs = []
    for i, cont in enumerate(params.continuations or []):
        ctx_ids, cont_ids = text.encode_pair(context, cont)
        check_prompt_tokens(services, len(ctx_ids) + len(cont_ids), (*loc, "continuations", i))
        pairs.append((ctx_ids, cont_ids))
    served = await engine.loglikelihood(profile, pairs, is_disconnected=is_disconnected)
    scores, best = _continuation_scores(params, served.value)
    return ScoreResponse(profile=served.profile.name, profile_hash=served.profile.hash, continuations=scores,
                         argmax=best)


async def score(services: Services, request: Request, body: ScoreRequest) -> tuple[ScoreResponse, str]:
    """The response and its ``X-Laser-Profile`` header value."""
    profile = resolve_profile(services, request, body.profile)
    await profile_ready(services, profile)
    response = await _run_score(services, profile, body, ("body",), request.is_disconnected)
    return response, stamp_header(response.profile, response.profile_hash)


# ---------------------------------------------------------------------------------------------- compare


async def _gather(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; the first failure cancels the rest and is raised as itself."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _generate_diff(profiles: list[str], answers: list[GenerateResponse]) -> list[GenerateDiff]:
    ref = answers[0]
    out = []
    for name, ans in zip(profiles[1:], answers[1:], strict=True):
        changed = [TextDiff(index=i, reference=r.text, text=c.text, first_difference=_first_difference(r.text, c.text))
                   for i, (r, c) in enumerate(zip(ref.choices, ans.choices, strict=True)) if r.text != c.text]
        out.append(GenerateDiff(profile=name, changed=changed))
    return out


def _score_diff(profiles: list[str], answers: list[ScoreResponse]) -> list[ScoreDiff]:
    ref = answers[0]
    out = []
    for name, ans in zip(profiles[1:], answers[1:], strict=True):
        if ref.perplexity is not None and ans.perplexity is not None:
            a, b = ans.perplexity.perplexity, ref.perplexity.perplexity
            out.append(ScoreDiff(profile=name, perplexity_delta=a - b if a is not None and b is not None else None))
            continue
        deltas = [c.logprob - r.logprob for r, c in zip(ref.continuations or [], ans.continuations or [], strict=True)]
        out.append(ScoreDiff(profile=name, logprob_deltas=deltas, argmax=ans.argmax,
                             argmax_changed=ans.argmax != ref.argmax))
    return out


def stamp_header(name: str, profile_hash: str) -> str:
    """``X-Laser-Profile`` value: the profile and the hash of the interventions that computed the answer."""
    return ProfileStamp(name, profile_hash).header


async def compare(services: Services, request: Request, body: CompareRequest) -> tuple[CompareResponse, str]:
    profiles = [resolve_profile(services, request, p, loc=("body", "profiles", i)) for i, p in enumerate(body.profiles)]
    request.state.profile = "*"  # spans several profiles; the engine's own metrics carry each one
    for profile in profiles:
        await profile_ready(services, profile)
    disconnected = request.is_disconnected
    if body.generate is not None:
        params = body.generate
        gens = await _gather([_run_generate(services, p, params, ("body", "generate"), disconnected)
                              for p in profiles])
        gdiff = _generate_diff(profiles, gens)
        return CompareResponse(profiles=profiles, generate=gens, diff=CompareDiff(
            reference=profiles[0], generate=gdiff, any_changed=any(d.changed for d in gdiff))), \
            ", ".join(stamp_header(g.profile, g.profile_hash) for g in gens)
    assert body.score is not None
    scores = await _gather([_run_score(services, p, body.score, ("body", "score"), disconnected) for p in profiles])
    sdiff = _score_diff(profiles, scores)
    changed = any(d.argmax_changed or any(x != 0 for x in d.logprob_deltas or []) or (d.perplexity_delta or 0) != 0
                  for d in sdiff)
    return CompareResponse(profiles=profiles, score=scores, diff=CompareDiff(
        reference=profiles[0], score=sdiff, any_changed=changed)), \
        ", ".join(stamp_header(sc.profile, sc.profile_hash) for sc in scores)
