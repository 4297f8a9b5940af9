"""The engine under real concurrent HTTP load: isolation between profiles, batching, back-pressure."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx

from laser_ops.scoring import GenerationRequest, HFScorer
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from server.engine import Engine, UnknownProfile
from server.metrics import Metrics
from tests.server.conftest import ForwardGate, LiveServer, start_server, tiny_loaded, until

PROFILES = {
    "e1": [{"kind": "laser", "target": "fc_in", "layer": 1, "rank_fraction": 0.1}],
    "e2": [{"kind": "zero", "target": "fc_out", "layer": 0}],
}
PROMPTS = ["The capital of France is", "Rome is a city in", "A quick brown fox", "Question: Is grass red?"]


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_concurrent_requests_equal_solo_runs(live: LiveServer) -> None:
    """24 concurrent greedy requests over 3 profiles each answer exactly what the request answers alone."""
    c = live.client
    for name, spec in PROFILES.items():
        assert c.post("/v1/profiles", json={"name": name, "interventions": spec}).status_code == 201
    cases = [(p, prompt, n) for p in ("base", "e1", "e2") for prompt in PROMPTS for n in (6, 12)]
    assert len(cases) == 24

    def body(p: str, prompt: str, n: int) -> dict:
        return {"profile": p, "prompt": prompt, "max_new_tokens": n}

    solo = {}
    for case in cases:
        r = c.post("/v1/generate", json=body(*case))
        assert r.status_code == 200
        solo[case] = r.json()["choices"][0]["text"]
    # The profiles really differ, so a request computed with the wrong weights would show.
    for prompt in PROMPTS[:2]:
        assert len({solo[(p, prompt, 12)] for p in ("base", "e1", "e2")}) == 3

    engine = live.app.state.services.engine
    batches_before, mixed_before = engine.batches_run, engine.mixed_batches_run
    order = cases[::2] + cases[1::2]  # interleave profiles in arrival order

    async def fire() -> list[str]:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as ac:
            rs = await asyncio.gather(*(ac.post("/v1/generate", json=body(*case)) for case in order))
        assert all(r.status_code == 200 for r in rs)
        return [r.json()["choices"][0]["text"] for r in rs]

    for _ in range(2):
        texts = asyncio.run(fire())
        assert texts == [solo[case] for case in order]
    batches = engine.batches_run - batches_before
    assert batches < 2 * len(order), f"no batching happened: {batches} batches for {2 * len(order)} requests"
    assert engine.mixed_batches_run > mixed_before, "no batch mixed profiles: the per-row path went untested"
    m = c.get("/metrics").text  # batches are labelled by their live (first) profile
    assert _metric(m, 'laser_batch_size_sum{op="generate"') > _metric(m, 'laser_batch_size_count{op="generate"')


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

    got = asyncio.run(fire())
    for a, b in zip(got, solo * 2):
        assert [x["logprob"] for x in a] == [x["logprob"] for x in b] or \
            max(abs(x["logprob"] - y["logprob"]) for x, y in zip(a, b)) < 1e-4
        assert [x["is_greedy"] for x in a] == [x["is_greedy"] for x in b]


def test_overload_answers_429_with_retry_after(tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_loaded(), max_queue=1)
    engine = srv.app.state.services.engine
    gate = ForwardGate(srv.app.state.services.loaded.model)
    try:
        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:
                slow = asyncio.ensure_future(ac.post("/v1/generate", json={"prompt": "a", "max_new_tokens": 4}))
                await asyncio.to_thread(gate.entered.wait, 60)  # in flight: the queue is empty again
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
    """Queue each request only after the one before it is queued, so their arrival order is known."""
    tasks = []
    for coro in coros:
        depth = engine.queue_depth
        tasks.append(asyncio.create_task(coro))
        await until(lambda d=depth: engine.queue_depth > d, what="a request to queue")
    return tasks


def test_fairness_between_profiles() -> None:
    """A steady stream of one profile does not starve another: requests are served oldest first."""
    engine = _engine_with_profiles({"e1": PROFILES["e1"]})
    engine.max_batch_size = 2

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
        assert set(finished[:5]) >= {"b1", "b2", "b3", "b4"} and finished.index("e1") < min(
            finished.index(n) for n in ("b5", "b6", "b7", "b8")), finished
    finally:
        engine.stop()


def test_tasks_keep_the_active_profile(live: LiveServer) -> None:
    c = live.client
    assert c.post("/v1/profiles", json={"name": "e1", "interventions": PROFILES["e1"]}).status_code == 201
    assert c.post("/v1/generate", json={"profile": "e1", "prompt": "a", "max_new_tokens": 2}).status_code == 200
    assert c.get("/info").json()["active_profile"] == "e1"
    r = c.post("/v1/profiles?dry_run=true", json={"name": "d", "interventions": PROFILES["e2"]})
    assert r.status_code == 200
    assert c.get("/info").json()["active_profile"] == "e1"


def _bare_engine(**kw: object) -> Engine:
    loaded = tiny_loaded()
    swapper = WeightSwapper(loaded.model, svd_cache=SvdCache(loaded.fingerprint))
    engine = Engine(swapper, HFScorer(loaded.model, loaded.tokenizer), lambda name: [], Metrics(), **kw)
    engine.start()
    return engine


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
    """Right after an inference batch, a queued sweep step leaves the grace period to the next request."""
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


def test_one_profile_per_batch_when_mixing_is_off(tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_loaded(), mixed_batches=False)
    try:
        c = srv.client
        assert c.post("/v1/profiles", json={"name": "e1", "interventions": PROFILES["e1"]}).status_code == 201
        solo = {p: c.post("/v1/generate", json={"profile": p, "prompt": PROMPTS[0], "max_new_tokens": 8}).json()
                for p in ("base", "e1")}

        async def fire() -> list[dict]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:
                rs = await asyncio.gather(*(ac.post("/v1/generate", json={
                    "profile": p, "prompt": PROMPTS[0], "max_new_tokens": 8}) for p in ("base", "e1") * 6))
            return [r.json() for r in rs]

        for p, r in zip(("base", "e1") * 6, asyncio.run(fire()), strict=True):
            assert r["choices"][0]["text"] == solo[p]["choices"][0]["text"]
        assert srv.app.state.services.engine.mixed_batches_run == 0
    finally:
        srv.stop()


def _engine_with_profiles(profiles: dict[str, list[dict]]) -> Engine:
    loaded = tiny_loaded()
    swapper = WeightSwapper(loaded.model, svd_cache=SvdCache(loaded.fingerprint))
    engine = Engine(swapper, HFScorer(loaded.model, loaded.tokenizer), {"base": [], **profiles}.__getitem__,
                    Metrics())
    engine.start()
    return engine


def test_failed_activation_fails_only_its_own_profile_in_a_mixed_batch() -> None:
    """The head's profile vanished (deleted after submission): other profiles' rows of the batch still run."""
    engine = _engine_with_profiles({"e1": PROFILES["e1"]})

    async def scenario() -> list[object]:
        blocker, release = await _hold_owner(engine)  # the owner is busy: both requests below land in one batch
        gone, ok = await _submit_in_order(engine, [
            engine.generate("gone", [GenerationRequest(prompt="a", max_new_tokens=2)]),
            engine.generate("e1", [GenerationRequest(prompt="a", max_new_tokens=2)])])
        release.set()
        await blocker
        return await asyncio.gather(gone, ok, return_exceptions=True)

    try:
        gone, ok = asyncio.run(scenario())
        assert isinstance(gone, UnknownProfile)
        assert isinstance(ok, list) and len(ok) == 1 and ok[0].finish_reason == "length"
        assert engine.active_profile == "e1"
    finally:
        engine.stop()


def test_task_on_a_profile_that_leaves_other_weights_clears_the_active_profile() -> None:
    engine = _engine_with_profiles({"e1": PROFILES["e1"]})

    async def scenario() -> None:
        await engine.run_task(lambda s, c: s.apply(PROFILES["e2"]), profile="e1")

    try:
        asyncio.run(scenario())
        assert engine.active_profile is None  # e2's weights are live, not e1's
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
