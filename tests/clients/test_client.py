"""The Python client against a live server (every method, typed errors, streaming), plus retry and transport
behaviour on a mock transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from clients import (
    AsyncLaserClient,
    AuthenticationError,
    ConflictError,
    LaserClient,
    LaserConnectionError,
    LaserTimeoutError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    StreamError,
    UnprocessableError,
)
from laser_protocol.datasets import DatasetPublic
from laser_protocol.inference import GenerateResponse
from laser_protocol.jobs import JobProgress, JobPublic
from laser_protocol.profiles import ProfilePublic
from laser_protocol.system import Info
from tests.server.conftest import LiveServer, free_port, start_server, tiny_loaded

EDIT = [{"kind": "laser", "target": "fc_in", "layer": -1, "rank_fraction": 0.25}]
SMALL = dict(types=["fc_in"], layers=[1], rhos=[0.5, 0.1], validation_fraction=0.5)
ROWS = [{"input": f"{w} is a", "choices": ["city", "dog", "colour"], "answer": i % 3}
        for i, w in enumerate(["Paris", "Rome", "Rex", "Fido", "Blue", "Red", "Oslo", "Spot", "Green", "Lyon",
                               "Milan", "Max"])]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    s = start_server(tmp_path_factory.mktemp("client"), tiny_loaded())
    yield s
    s.stop()


@pytest.fixture
def c(srv: LiveServer) -> Iterator[LaserClient]:
    with LaserClient(srv.url) as client:
        yield client


def test_system_and_models(c: LaserClient) -> None:
    assert c.health().status == "ok"
    assert c.ready().ready is True
    info = c.info()
    assert isinstance(info, Info) and info.model_id == "tiny-llama" and "fc_in" in info.laser_types
    assert "laser_requests_total" in c.metrics() or "laser_" in c.metrics()
    ids = [card.id for card in c.list_models()]
    assert ids[0] == "base"
    assert c.get_model("base").parent is None
    with pytest.raises(NotFoundError) as e:  # OpenAI-shaped error body, same typed exception
        c.get_model("nope")
    assert e.value.status == 404 and "nope" in e.value.message


def test_profiles_and_errors(c: LaserClient) -> None:
    p = c.create_profile("cp", EDIT, description="test")
    assert isinstance(p, ProfilePublic) and p.matrices == 1 and p.interventions[0].target == "fc_in"
    assert c.get_profile("cp").description == "test"
    assert [x.name for x in c.list_profiles()][:1] == ["base"]
    with pytest.raises(ConflictError) as e:
        c.create_profile("cp", EDIT)
    assert e.value.status == 409 and "already exists" in e.value.message and e.value.loc == ["body", "name"]
    assert c.replace_profile("cp", EDIT * 1, description="v2").description == "v2"
    dry = c.dry_run_profile("cp", EDIT)
    assert dry.dry_run and dry.matrices[0].k is not None
    with pytest.raises(UnprocessableError) as e:
        c.create_profile("bad", [{"kind": "laser", "target": "fc_in", "layer": 99, "rank_fraction": 0.5}])
    assert e.value.status == 422 and e.value.loc[:2] == ["body", "interventions"] and "99" in e.value.message
    with pytest.raises(UnprocessableError):
        c.get_profile("bad name!")
    assert c.delete_profile("cp").deleted
    with pytest.raises(NotFoundError) as e:
        c.get_profile("cp")
    assert "cp" in str(e.value)


def test_generate_stream_score_compare(c: LaserClient) -> None:
    c.replace_profile("gen", EDIT)
    g = c.generate("Paris is", profile="gen", max_new_tokens=6)
    assert isinstance(g, GenerateResponse) and g.profile == "gen" and g.usage.completion_tokens <= 6
    many = c.generate(prompts=["a", "b"], max_new_tokens=2, stop=["zz"])
    assert [ch.index for ch in many.choices] == [0, 1]
    events = list(c.generate_stream("Paris is", profile="gen", max_new_tokens=6))
    assert "".join(ev.text for ev in events) == g.text
    assert events[-1].finish_reason in ("stop", "length") and events[-1].usage is not None
    it = c.generate_stream("Paris is", max_new_tokens=50)
    next(it)
    it.close()  # closing early closes the connection
    with pytest.raises(UnprocessableError) as e:
        c.generate("x", max_new_tokens=10**6)
    assert e.value.loc == ["body", "max_new_tokens"]
    with pytest.raises(NotFoundError):
        list(c.generate_stream("x", profile="missing"))
    with pytest.raises(ValueError):
        c.generate("a", prompts=["b"])

    s = c.score("The capital of France is", [" Paris", " Rome"], profile="gen")
    assert len(s.continuations) == 2 and s.argmax in (0, 1)
    ppl = c.score(text="The quick brown fox")
    assert ppl.perplexity is not None and ppl.perplexity.perplexity > 1
    cg = c.compare(["base", "gen"], "Paris is", max_new_tokens=6)
    assert cg.profiles == ["base", "gen"] and cg.generate[1].choices[0].text == g.text
    assert cg.diff.reference == "base"
    cs = c.compare(["base", "gen"], context="Paris is", continuations=[" a", " b"])
    assert cs.score is not None and len(cs.diff.score[0].logprob_deltas) == 2
    with pytest.raises(NotFoundError):
        c.compare(["base", "missing"], "x")


def test_datasets_sweep_wait_promote(c: LaserClient, tmp_path: Path) -> None:
    d = c.upload_dataset("toy", ROWS, description="toy")
    assert isinstance(d, DatasetPublic) and d.size == len(ROWS) and d.kind == "multiple_choice"
    file = tmp_path / "toy2.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert c.upload_dataset("toy2", file).size == len(ROWS)
    assert {"toy", "toy2"} <= {x.name for x in c.list_datasets()}
    assert c.get_dataset("toy").sample
    with pytest.raises(UnprocessableError) as e:
        c.upload_dataset("bad", "not json\n")
    assert e.value.status == 422 and e.value.errors
    with pytest.raises(NotFoundError):
        c.create_sweep("no-such-dataset", **SMALL)

    job = c.create_sweep("toy", **SMALL)
    assert isinstance(job, JobPublic) and job.dataset == "toy"
    seen: list[JobProgress] = []
    done = c.wait(job.id, on_progress=seen.append, timeout=120)
    assert done.state == "succeeded" and done.rows and done.best is not None
    assert seen and seen[-1].terminal and [e.done for e in seen] == sorted(e.done for e in seen)
    assert [e.state for e in c.job_events(job.id)] == ["succeeded"]  # a finished job: one state event
    assert job.id in [j.id for j in c.list_jobs()] and c.list_jobs(state="running") == []
    assert c.job_plot(job.id).startswith(b"\x89PNG")
    with pytest.raises(ConflictError):
        c.cancel_job(job.id)
    if done.best.interventions:
        p = c.promote(job.id, "won")
        assert p.name == "won" and p.interventions
        with pytest.raises(ConflictError):
            c.promote(job.id, "won")
        assert c.promote(job.id, "won", replace=True).name == "won"
    with pytest.raises(NotFoundError):
        c.get_job("nope")
    assert c.delete_job(job.id).deleted and job.id not in [j.id for j in c.list_jobs()]
    assert c.delete_dataset("toy2").deleted


def test_export_and_download(c: LaserClient, tmp_path: Path) -> None:
    c.replace_profile("exp", EDIT)
    report, folder = c.export("exp", tmp_path / "hf")
    assert report.name == "exp-dense" and folder == tmp_path / "hf"
    assert {f.name for f in report.files} == {p.name for p in folder.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, torch.nn.Module)
    with pytest.raises(ConflictError):
        c.export_profile("exp")
    with pytest.raises(FileExistsError):
        c.download_export("exp-dense", folder)
    assert c.download_export("exp-dense", folder, overwrite=True) == folder
    fact = c.export_profile("exp", mode="factored")
    assert fact.saved_bytes > 0 and fact.name in {e.name for e in c.list_exports()}
    assert c.get_export(fact.name).files == fact.files
    with pytest.raises(NotFoundError):
        c.export_profile("nope")
    assert c.delete_export(fact.name).deleted
    with pytest.raises(NotFoundError):
        c.get_export(fact.name)


def test_keys_from_arguments_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = start_server(tmp_path, tiny_loaded(), admin_api_key="adm", api_key="inf")
    try:
        monkeypatch.delenv("LASER_API_KEY", raising=False)
        monkeypatch.delenv("LASER_ADMIN_API_KEY", raising=False)
        with LaserClient(s.url) as anon:
            with pytest.raises(AuthenticationError) as e:
                anon.list_profiles()
            assert e.value.status == 401
            assert anon.health().status == "ok"  # open route
        with LaserClient(s.url, api_key="inf") as inf:
            assert inf.list_profiles()[0].name == "base"
            with pytest.raises(PermissionDeniedError):
                inf.create_profile("x", EDIT)
        monkeypatch.setenv("LASER_ADMIN_API_KEY", "adm")
        monkeypatch.setenv("LASER_URL", s.url)
        with LaserClient() as adm:  # URL and admin key from the environment; admin key stands in for inference
            assert adm.create_profile("x", EDIT).name == "x"
            assert adm.generate("hi", profile="x", max_new_tokens=1).profile == "x"
    finally:
        s.stop()


def test_async_client(srv: LiveServer, tmp_path: Path) -> None:
    async def run() -> None:
        async with AsyncLaserClient(srv.url) as ac:
            assert (await ac.info()).model_id == "tiny-llama"
            await ac.replace_profile("async", EDIT)
            g = await ac.generate("Paris is", profile="async", max_new_tokens=5)
            text = "".join([ev.text async for ev in ac.generate_stream("Paris is", profile="async",
                                                                      max_new_tokens=5)])
            assert text == g.text
            with pytest.raises(NotFoundError):
                await ac.get_profile("missing")
            await ac.upload_dataset("atoy", ROWS)
            job = await ac.create_sweep("atoy", **SMALL)
            seen: list[JobProgress] = []
            done = await ac.wait(job.id, on_progress=seen.append, timeout=120)
            assert done.state == "succeeded" and seen[-1].terminal
            report, folder = await ac.export("async", tmp_path / "a", mode="factored")
            assert report.saved_bytes > 0 and (folder / "laser_loader.py").exists()

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------- mock transport


def _retrying(statuses: list[tuple[int, dict]]) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status, headers = statuses[min(len(seen) - 1, len(statuses) - 1)]
        if status == 200:
            return httpx.Response(200, json={"status": "ok"})
        return httpx.Response(status, json={"detail": "queue full"}, headers=headers)

    return httpx.MockTransport(handler), seen


def test_429_is_retried_honouring_retry_after() -> None:
    transport, seen = _retrying([(429, {"Retry-After": "2"}), (429, {}), (200, {})])
    with LaserClient("http://x", transport=transport, backoff=0.25) as client:
        delays: list[float] = []
        client._sleep = delays.append
        assert client.health().status == "ok"
    assert len(seen) == 3 and delays[0] == 2.0 and 0.125 <= delays[1] <= 0.5  # Retry-After, then backoff


def test_429_gives_up_with_typed_error() -> None:
    transport, seen = _retrying([(429, {"Retry-After": "7"})])
    with LaserClient("http://x", transport=transport, max_retries=2) as client:
        client._sleep = lambda s: None
        with pytest.raises(RateLimitError) as e:
            client.health()
    assert len(seen) == 3 and e.value.status == 429 and e.value.retry_after == 7.0 and e.value.message == "queue full"


def test_async_retry_and_stream_error() -> None:
    transport, seen = _retrying([(429, {"Retry-After": "1"}), (200, {})])
    sse = b'data: {"profile": "base", "profile_hash": "0", "text": "a"}\n\ndata: {"error": "engine exploded"}\n\ndata: [DONE]\n\n'

    def stream_handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse, headers={"content-type": "text/event-stream"})

    async def run() -> None:
        async with AsyncLaserClient("http://x", transport=transport) as ac:
            slept: list[float] = []

            async def sleep(s: float) -> None:
                slept.append(s)

            ac._sleep = sleep
            assert (await ac.health()).status == "ok" and slept == [1.0]
        async with AsyncLaserClient("http://x", transport=httpx.MockTransport(stream_handler)) as ac:
            got = []
            with pytest.raises(StreamError, match="engine exploded"):
                async for ev in ac.generate_stream("x"):
                    got.append(ev.text)
            assert got == ["a"]

    asyncio.run(run())


def test_transport_failures_are_typed() -> None:
    with LaserClient(f"http://127.0.0.1:{free_port()}", timeout=2) as client:
        with pytest.raises(LaserConnectionError, match="cannot reach"):
            client.info()

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with LaserClient("http://x", transport=httpx.MockTransport(slow), timeout=0.1) as client:
        with pytest.raises(LaserTimeoutError):
            client.info()


def test_download_refuses_unsafe_names(tmp_path: Path) -> None:
    listing = {"name": "e", "mode": "dense", "bytes": 1, "files": [
        {"name": "../evil", "bytes": 1, "sha256": None, "url": "/v1/exports/e/files/../evil"}]}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=listing)

    with LaserClient("http://x", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ValueError, match="unsafe"):
            client.download_export("e", tmp_path / "out")
    assert not (tmp_path / "evil").exists()
