"""The serving engine: continuous batching, per-row profiles, isolation, back-pressure, tasks, fairness.

Engine-level tests drive :class:`server.engine.Engine` directly on tiny models (one per architecture
where the behaviour depends on the model); HTTP tests run a real server. Every ordering is made
with events, gates on the model's forward pass, or polling with a deadline, never with sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from laser_ops.interventions import InterventionError
from laser_ops.scoring import GenerationRequest, HFScorer
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.testing import CAUSAL_ARCHS, make_tiny_model, tiny_tokenizer
from server.engine import Engine, EngineStopped, RequestCancelled, UnknownProfile
from server.metrics import Metrics
from tests.server.conftest import ForwardGate, LiveServer, start_server, tiny_loaded, until

PROFILES = {
    "e1": [{"kind": "laser", "target": "fc_in", "layer": 1, "rank_fraction": 0.1}],
    "e2": [{"kind": "zero", "target": "fc_out", "layer": 0}],
    "e3": [{"kind": "keep_bottom", "target": "attn", "layer": 0, "rank": 2},
           {"kind": "prune_magnitude", "target": "fc_out", "layer": 2, "sparsity": 0.5}],
}
PROMPTS = ["The capital of France is", "Rome is a city in", "A quick brown fox", "Question: Is grass red?"]


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _engine(arch: str = "llama", profiles: dict[str, list[dict]] | None = None, **kw: object) -> Engine:
    """An engine on a tiny model whose profiles are looked up in ``profiles`` (live: tests may update it)."""
    model = make_tiny_model(arch)
    swapper = WeightSwapper(model, svd_cache=SvdCache("tiny"))
    table = PROFILES if profiles is None else profiles

    def resolve(name: str) -> list[dict]:
        return [] if name == "base" else table[name]

    engine = Engine(swapper, HFScorer(model, tiny_tokenizer()), resolve, Metrics(), **kw)
    engine.start()
    return engine


def _req(prompt: str, n: int = 8, **kw: object) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_new_tokens=n, logprobs=0, **kw)


async def _hold_owner(engine: Engine) -> tuple[asyncio.Task[object], threading.Event]:
    """Occupy the owner thread with a task until the returned event is set; returns once it is inside."""
    inside, release = threading.Event(), threading.Event()

    def block(swapper: object, scorer: object) -> None:
        inside.set()
        if not release.wait(60):
            raise TimeoutError("the test never released the owner thread")

    blocker = asyncio.create_task(engine.run_task(block))
    await asyncio.to_thread(inside.wait, 60)
    return blocker, release


async def _submit_in_order(engine: Engine, coros: list) -> list[asyncio.Task]:
    """Queue each request only after the one before it reached the engine, so arrival order is known."""
    tasks = []
    for coro in coros:
        seen = engine.submitted
        tasks.append(asyncio.create_task(coro))
        await until(lambda s=seen: engine.submitted > s, what="a request to reach the engine")
    return tasks


# ---------------------------------------------------------------------------------------------- isolation


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_concurrent_mixed_profile_requests_equal_solo_runs(arch: str) -> None:
    """Every architecture: requests of four profiles, all at once, answer exactly what each answers alone
    (token ids; log-probs within 1e-5), and serving them writes no weight byte."""
    engine = _engine(arch)
    cases = [(p, prompt) for prompt in PROMPTS[:3] for p in ("base", "e1", "e2", "e3")]

    async def run() -> tuple[dict, list]:
        solo = {}
        for case in cases:
            solo[case] = (await engine.generate(case[0], [_req(case[1])])).value[0]
        written = engine.swapper.bytes_written
        together = await asyncio.gather(*(engine.generate(p, [_req(prompt)]) for p, prompt in cases))
        assert engine.swapper.bytes_written == written, "serving profiles must not write weights"
        return solo, [s.value[0] for s in together]

    try:
        solo, together = asyncio.run(run())
        for prompt in PROMPTS[:2]:  # the profiles really differ, so a row computed with the wrong weights shows
            assert len({tuple(solo[(p, prompt)].token_ids) for p in ("base", "e1", "e2", "e3")}) == 4
        for case, got in zip(cases, together, strict=True):
            assert got.token_ids == solo[case].token_ids, case
            assert got.token_logprobs == pytest.approx(solo[case].token_logprobs, abs=1e-5)
        assert engine.mixed_steps > 0 and engine.max_rows_in_step > 4, "rows of several profiles shared steps"
        assert engine.active_profile == "base"
    finally:
        engine.stop()


def test_rows_joining_and_leaving_mid_decode_change_nothing_for_the_others() -> None:
    engine = _engine()
    gate = ForwardGate(engine.swapper.model)
    gate.open()

    async def run() -> tuple:
        long_alone = (await engine.generate("e1", [_req(PROMPTS[0], 40)])).value[0]
        shorts_alone = [(await engine.generate(p, [_req(PROMPTS[1], 3)])).value[0] for p in ("base", "e2")]
        gate.close(free_passes=4)  # the long row's prompt and first decode steps go through, then it waits
        long_task = asyncio.create_task(engine.generate("e1", [_req(PROMPTS[0], 40)]))
        await asyncio.to_thread(gate.entered.wait, 60)
        # Mid-decode: two short rows of other profiles join, run to their end and leave.
        shorts = await _submit_in_order(engine, [engine.generate(p, [_req(PROMPTS[1], 3)]) for p in ("base", "e2")])
        gate.open()
        done_shorts = [(await t).value[0] for t in shorts]
        return long_alone, shorts_alone, (await long_task).value[0], done_shorts

    try:
        long_alone, shorts_alone, long_mixed, shorts = asyncio.run(run())
        assert long_mixed.token_ids == long_alone.token_ids
        assert long_mixed.token_logprobs == pytest.approx(long_alone.token_logprobs, abs=1e-5)
        assert [s.token_ids for s in shorts] == [s.token_ids for s in shorts_alone]
        assert engine.max_rows_in_step >= 3  # they really shared steps with the long row
    finally:
        gate.remove()
        engine.stop()


def test_seeded_sampling_alone_equals_batched() -> None:
    engine = _engine()

    def sampled(seed: int) -> GenerationRequest:
        return GenerationRequest(prompt=PROMPTS[0], max_new_tokens=12, temperature=0.9, top_p=0.95, top_k=20,
                                 seed=seed)

    async def run() -> tuple:
        alone = [(await engine.generate("e1", [sampled(s)])).value[0] for s in (1, 2)]
        crowd = await asyncio.gather(engine.generate("base", [_req(PROMPTS[1], 20)]),
                                     engine.generate("e1", [sampled(1)]), engine.generate("e2", [sampled(7)]),
                                     engine.generate("e1", [sampled(2)]))
        return alone, [c.value[0] for c in crowd]

    try:
        alone, crowd = asyncio.run(run())
        assert [crowd[1].token_ids, crowd[3].token_ids] == [a.token_ids for a in alone]
        assert alone[0].token_ids != alone[1].token_ids  # the seed matters
    finally:
        engine.stop()


# ---------------------------------------------------------------------------------------------- cancel, limits


def test_cancel_mid_decode_frees_the_row() -> None:
    engine = _engine()
    gate = ForwardGate(engine.swapper.model, free_passes=3)

    async def run() -> object:
        task = asyncio.create_task(engine.generate("e1", [_req(PROMPTS[0], 200)]))
        await asyncio.to_thread(gate.entered.wait, 60)  # decoding, held at the gate
        assert engine.running_rows == 1
        task.cancel()
        gate.open()
        await until(lambda: engine.running_rows == 0, what="the cancelled row to leave the batch")
        with pytest.raises(asyncio.CancelledError):
            await task
        return (await engine.generate("base", [_req(PROMPTS[1], 2)])).value[0]

    try:
        after = asyncio.run(run())
        assert len(after.token_ids) == 2  # the engine serves on
        assert gate.passes < 20  # the 200-token request stopped at the next step
    finally:
        gate.remove()
        engine.stop()


def test_overload_answers_429_with_retry_after(tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_loaded(), max_queue=1, max_running=1, max_batch_tokens=64)
    engine = srv.app.state.services.engine
    gate = ForwardGate(srv.app.state.services.engine.swapper.model)
    try:
        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:
                slow = asyncio.ensure_future(ac.post("/v1/generate", json={"prompt": "a", "max_new_tokens": 4}))
                await asyncio.to_thread(gate.entered.wait, 60)  # running: the queue is empty again
                queued = asyncio.ensure_future(ac.post("/v1/generate", json={"prompt": "b", "max_new_tokens": 2}))
                await until(lambda: engine.queue_depth == 1, what="the second request to queue")
                over = await ac.post("/v1/generate", json={"prompt": "c", "max_new_tokens": 2})
                stream = await ac.post("/v1/generate", json={"prompt": "c", "max_new_tokens": 2, "stream": True})
                gate.open()
                return [await slow, await queued, over, stream]

        slow, queued, over, stream = asyncio.run(fire())
        assert slow.status_code == 200 and queued.status_code == 200
        for r in (over, stream):
            assert r.status_code == 429, r.text
            assert int(r.headers["Retry-After"]) >= 1
        m = srv.client.get("/metrics").text
        assert _metric(m, 'laser_rejected_requests_total{profile="base"}') >= 1
        assert 'status="429"' in m
        assert srv.client.post("/v1/generate", json={"prompt": "d", "max_new_tokens": 2}).status_code == 200
    finally:
        gate.remove()
        srv.stop()


def test_fairness_between_profiles() -> None:
    """A steady stream of one profile does not starve another: rows are admitted oldest first."""
    engine = _engine(max_running=2, max_batch_tokens=64)

    def req(profile: str) -> object:
        return engine.generate(profile, [GenerationRequest(prompt="a", max_new_tokens=3)])

    async def scenario() -> list[str]:
        blocker, release = await _hold_owner(engine)
        names = ["b1", "b2", "b3", "b4", "e1", "b5", "b6", "b7", "b8"]
        tasks = await _submit_in_order(engine, [req("e1" if n == "e1" else "base") for n in names])
        finished: list[str] = []
        for name, task in zip(names, tasks):
            task.add_done_callback(lambda t, n=name: finished.append(n))
        release.set()
        await asyncio.gather(blocker, *tasks)
        return finished

    try:
        finished = asyncio.run(scenario())
        assert set(finished[:4]) == {"b1", "b2", "b3", "b4"}, finished
        assert finished.index("e1") < min(finished.index(n) for n in ("b5", "b6", "b7", "b8")), finished
    finally:
        engine.stop()


def test_a_short_request_joins_a_long_one_instead_of_waiting_for_it() -> None:
    engine = _engine()
    gate = ForwardGate(engine.swapper.model, free_passes=3)

    async def run() -> tuple[str, list[str]]:
        order: list[str] = []
        long_task = asyncio.create_task(engine.generate("base", [_req(PROMPTS[0], 120)]))
        long_task.add_done_callback(lambda t: order.append("long"))
        await asyncio.to_thread(gate.entered.wait, 60)
        [short] = await _submit_in_order(engine, [engine.generate("e1", [_req(PROMPTS[1], 4)])])
        short.add_done_callback(lambda t: order.append("short"))
        gate.open()
        await asyncio.gather(long_task, short)
        return (await long_task).value[0].finish_reason, order

    try:
        reason, order = asyncio.run(run())
        assert reason == "length" and order == ["short", "long"]
    finally:
        gate.remove()
        engine.stop()


# ---------------------------------------------------------------------------------------------- profiles


def test_unknown_profile_is_refused_at_submission() -> None:
    engine = _engine()
    try:
        with pytest.raises(UnknownProfile):
            asyncio.run(engine.generate("gone", [_req("a")]))
    finally:
        engine.stop()


def test_a_profile_that_fails_to_compile_fails_only_its_own_requests() -> None:
    engine = _engine(profiles={"bad": [{"target": "fc_in", "layer": 99, "rank": 1}], **PROFILES})

    async def run() -> list:
        return await asyncio.gather(engine.generate("bad", [_req("a", 2)]), engine.generate("e1", [_req("a", 2)]),
                                    return_exceptions=True)

    try:
        bad, ok = asyncio.run(run())
        assert isinstance(bad, InterventionError) and bad.loc == (0, "layer")
        assert ok.value[0].finish_reason == "length" and ok.profile.name == "e1"
    finally:
        engine.stop()


def test_profiles_compile_off_the_owner_thread() -> None:
    """While a profile's SVDs are being computed, other requests are served."""
    engine = _engine()
    svd_get = engine.swapper.svd_cache.get
    inside, release = threading.Event(), threading.Event()

    def slow_get(*args: object, **kw: object) -> object:
        inside.set()
        if not release.wait(60):
            raise TimeoutError("never released")
        return svd_get(*args, **kw)

    engine.swapper.svd_cache.get = slow_get  # type: ignore[method-assign]

    async def run() -> tuple:
        edited = asyncio.create_task(engine.generate("e1", [_req("a", 2)]))
        await asyncio.to_thread(inside.wait, 60)  # e1's decomposition is in progress on the compile worker
        base = await engine.generate("base", [_req("a", 2)])  # served meanwhile
        assert not edited.done()
        release.set()
        return base, await edited

    try:
        base, edited = asyncio.run(run())
        assert base.profile.name == "base" and edited.profile.name == "e1"
        assert edited.profile.hash != base.profile.hash
    finally:
        engine.stop()


def test_every_answer_is_stamped_with_the_weights_that_made_it() -> None:
    specs = dict(PROFILES)
    engine = _engine(profiles=specs)

    async def run() -> tuple:
        first = await engine.loglikelihood("e1", [([3, 4, 5], [6])])
        specs["e1"] = PROFILES["e2"]  # the profile is updated: new answers carry the new hash
        second = await engine.loglikelihood("e1", [([3, 4, 5], [6])])
        e2 = await engine.loglikelihood("e2", [([3, 4, 5], [6])])
        return first, second, e2

    try:
        first, second, e2 = asyncio.run(run())
        assert first.profile.name == second.profile.name == "e1"
        assert first.profile.hash != second.profile.hash == e2.profile.hash
        assert second.value[0].logprob == pytest.approx(e2.value[0].logprob, abs=1e-6)
    finally:
        engine.stop()


def test_scoring_of_concurrent_requests_shares_steps_and_equals_solo() -> None:
    engine = _engine()
    ctx = list(range(10, 30))
    pairs = [(ctx, [40, 41]), (ctx, [42]), (ctx, [43, 44, 45])]

    async def run() -> tuple:
        solo = [(await engine.loglikelihood(p, pairs)).value for p in ("base", "e1", "e3")]
        await engine.prompt_logprobs("e2", [[1]], 0)  # e2 compiled before the measured part
        blocker, release = await _hold_owner(engine)  # all five arrive before the next step
        tasks = await _submit_in_order(engine, [
            *(engine.loglikelihood(p, pairs) for p in ("base", "e1", "e3")),
            engine.prompt_logprobs("e2", [ctx + [40]], 2),
            engine.rolling("e1", ["A quick brown fox jumps over the lazy dog"])])
        steps = engine.steps_run
        release.set()
        await blocker
        together = await asyncio.gather(*tasks)
        return solo, together, engine.steps_run - steps

    try:
        solo, together, steps = asyncio.run(run())
        for want, got in zip(solo, together[:3], strict=True):
            assert [r.logprob for r in got.value] == pytest.approx([r.logprob for r in want], abs=1e-5)
            assert [r.is_greedy for r in got.value] == [r.is_greedy for r in want]
        assert len(together[3].value[0].token_logprobs) == len(ctx) + 1
        assert together[4].value[0].n_tokens > 0
        assert steps <= 3, f"five scoring requests took {steps} steps: they did not share forward passes"
    finally:
        engine.stop()


# ---------------------------------------------------------------------------------------------- HTTP


def test_concurrent_http_requests_equal_solo_runs(live: LiveServer) -> None:
    """24 concurrent greedy requests over 3 profiles each answer exactly what the request answers alone."""
    c = live.client
    for name in ("e1", "e2"):
        assert c.post("/v1/profiles", json={"name": name, "interventions": PROFILES[name]}).status_code == 201
    cases = [(p, prompt, n) for p in ("base", "e1", "e2") for prompt in PROMPTS for n in (6, 12)]

    def body(p: str, prompt: str, n: int) -> dict:
        return {"profile": p, "prompt": prompt, "max_new_tokens": n}

    solo = {}
    for case in cases:
        r = c.post("/v1/generate", json=body(*case))
        assert r.status_code == 200
        solo[case] = r.json()["choices"][0]["text"]
    engine = live.app.state.services.engine
    order = cases[::2] + cases[1::2]  # interleave profiles in arrival order

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/v1/generate", json=body(*case)) for case in order))

    steps = engine.steps_run
    rs = asyncio.run(fire())
    assert all(r.status_code == 200 for r in rs)
    assert [r.json()["choices"][0]["text"] for r in rs] == [solo[case] for case in order]
    assert all(r.headers["X-Laser-Profile"] == f'{case[0]}; hash={r.json()["profile_hash"]}'
               for r, case in zip(rs, order, strict=True))
    assert engine.steps_run - steps < sum(n + 1 for _, _, n in order), "no batching happened"
    assert engine.mixed_steps > 0


def test_scores_under_concurrency_equal_solo(live: LiveServer) -> None:
    c = live.client
    assert c.post("/v1/profiles", json={"name": "e1", "interventions": PROFILES["e1"]}).status_code == 201
    reqs = [{"profile": p, "context": ctx, "continuations": [" Paris", " Rome", " yes"]}
            for p in ("base", "e1") for ctx in PROMPTS]
    solo = [c.post("/v1/score", json=r).json()["continuations"] for r in reqs]

    async def fire() -> list:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as ac:
            rs = await asyncio.gather(*(ac.post("/v1/score", json=r) for r in reqs * 2))
        return [r.json()["continuations"] for r in rs]

    for a, b in zip(asyncio.run(fire()), solo * 2):
        assert [x["logprob"] for x in a] == pytest.approx([x["logprob"] for x in b], abs=1e-5)
        assert [x["is_greedy"] for x in a] == [x["is_greedy"] for x in b]


def test_tasks_leave_the_base_weights_live(live: LiveServer) -> None:
    c = live.client
    assert c.post("/v1/profiles", json={"name": "e1", "interventions": PROFILES["e1"]}).status_code == 201
    assert c.post("/v1/generate", json={"profile": "e1", "prompt": "a", "max_new_tokens": 2}).status_code == 200
    assert c.get("/info").json()["active_profile"] == "base"  # e1 was served per row
    r = c.post("/v1/profiles?dry_run=true", json={"name": "d", "interventions": PROFILES["e2"]})
    assert r.status_code == 200
    assert c.get("/info").json()["active_profile"] == "base"


# ---------------------------------------------------------------------------------------------- tasks


def test_a_task_that_leaves_edits_live_is_undone_before_serving() -> None:
    engine = _engine()

    async def run() -> tuple:
        before = (await engine.generate("base", [_req(PROMPTS[0])])).value[0]
        await engine.run_task(lambda s, c: s.apply(PROFILES["e2"]))
        after = (await engine.generate("base", [_req(PROMPTS[0])])).value[0]
        return before, after

    try:
        before, after = asyncio.run(run())
        assert after.token_ids == before.token_ids and engine.swapper.is_base
        assert engine.active_profile == "base"
    finally:
        engine.stop()


def test_a_chunked_task_lets_serving_steps_run_between_its_chunks() -> None:
    engine = _engine()
    tokens_at_chunk: list[int] = []
    streamed: list[str] = []

    def chunked(swapper: WeightSwapper, scorer: HFScorer) -> object:
        for _ in range(4):
            tokens_at_chunk.append(len(streamed))
            yield
        return "done"

    async def run() -> str:
        gen = asyncio.create_task(engine.generate("e1", [_req(PROMPTS[0], 30, on_text=streamed.append)]))
        await until(lambda: streamed, what="the generation to start streaming")
        result = await engine.run_task(chunked)
        await gen
        return result

    try:
        assert asyncio.run(run()) == "done"
        assert tokens_at_chunk == sorted(tokens_at_chunk) and tokens_at_chunk[-1] > tokens_at_chunk[0], \
            "decode steps must run between a task's chunks"
    finally:
        engine.stop()


def _bare_engine(**kw: object) -> Engine:
    return _engine(profiles={}, **kw)


async def _order_of(engine: Engine, background_first: bool) -> list[str]:
    """Queue a background task and an inference task while the owner is busy; return the run order."""
    order: list[str] = []
    blocker, release = await _hold_owner(engine)
    jobs = [("bg", True), ("fg", False)] if background_first else [("fg", False), ("bg", True)]
    tasks = await _submit_in_order(engine, [
        engine.run_task(lambda s, c, n=name: order.append(n), background=background) for name, background in jobs])
    release.set()
    await asyncio.gather(blocker, *tasks)
    return order


def test_background_tasks_yield_to_inference() -> None:
    engine = _bare_engine(background_grace_s=0.0)
    try:
        assert asyncio.run(_order_of(engine, background_first=True)) == ["fg", "bg"]
    finally:
        engine.stop()


def test_background_tasks_are_not_starved() -> None:
    engine = _bare_engine(background_max_wait_s=0.0)  # waited long enough at once: plain FIFO
    try:
        assert asyncio.run(_order_of(engine, background_first=True)) == ["bg", "fg"]
    finally:
        engine.stop()


def test_background_task_waits_for_a_closed_loop_client() -> None:
    """Right after inference, a queued sweep step leaves the grace period to the client's next request."""
    engine = _bare_engine(background_grace_s=60.0)  # far longer than any client's think time

    async def scenario() -> list[str]:
        order: list[str] = []
        await engine.run_task(lambda s, c: order.append("fg1"))
        [bg] = await _submit_in_order(engine, [engine.run_task(lambda s, c: order.append("bg"), background=True)])
        await engine.run_task(lambda s, c: order.append("fg2"))  # the client's next request, within the grace
        engine.background_grace_s = 0.0  # the client went quiet: the next wake-up runs the step
        await engine.run_task(lambda s, c: order.append("fg3"))
        await bg
        return order

    try:
        assert asyncio.run(scenario()) == ["fg1", "fg2", "fg3", "bg"]
    finally:
        engine.stop()


def test_cancelled_task_is_dropped() -> None:
    engine = _bare_engine()
    ran: list[str] = []

    async def run() -> None:
        blocker, release = await _hold_owner(engine)
        cancel = threading.Event()
        [task] = await _submit_in_order(engine, [engine.run_task(lambda s, c: ran.append("x"), cancelled=cancel)])
        cancel.set()
        release.set()
        await blocker
        with pytest.raises(RequestCancelled):
            await task

    try:
        asyncio.run(run())
        assert ran == []
    finally:
        engine.stop()


def test_owner_thread_survives_results_for_a_closed_event_loop() -> None:
    engine = _bare_engine()
    holder: list[threading.Event] = []

    async def abandon() -> None:
        _, release = await _hold_owner(engine)  # the owner runs it; its loop closes before the result comes back
        holder.append(release)
        await _submit_in_order(engine, [engine.run_task(lambda s, c: 1)])

    try:
        asyncio.run(abandon())
        holder[0].set()
        assert asyncio.run(asyncio.wait_for(engine.run_task(lambda s, c: 2), 60)) == 2
    finally:
        engine.stop()


def test_stop_ends_a_chunked_task_at_its_chunk_boundary() -> None:
    """Shutdown (SIGTERM) does not wait for a whole sweep step: it stops after the chunk in progress."""
    engine = _bare_engine(background_grace_s=0.0)
    inside, release, closed = threading.Event(), threading.Event(), threading.Event()
    chunks: list[int] = []

    def step(swapper: WeightSwapper, scorer: HFScorer) -> object:
        try:
            for i in range(100):
                chunks.append(i)
                if i == 1:
                    inside.set()
                    release.wait(60)
                yield
        except GeneratorExit:
            closed.set()
            raise
        return "all chunks"

    async def run() -> None:
        task = asyncio.create_task(engine.run_task(step, background=True))
        await asyncio.to_thread(inside.wait, 60)  # the second chunk is running
        stopper = threading.Thread(target=engine.stop)
        stopper.start()
        release.set()
        await asyncio.to_thread(stopper.join, 60)
        with pytest.raises(EngineStopped):
            await task

    asyncio.run(run())
    assert chunks == [0, 1] and closed.is_set()
