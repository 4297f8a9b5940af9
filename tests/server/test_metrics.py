"""/metrics after real traffic: every series the serving spec lists, labelled per profile."""

from __future__ import annotations

import re

from tests.server.conftest import LiveServer

P1 = [{"target": "fc_in", "layer": 1, "rank_fraction": 0.1}]


def value(text: str, name: str, **labels: str) -> float:
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"([a-zA-Z_:]+)(\{(.*)\})? (.+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
            found = True
    assert found, f"no series {name} {labels}"
    return total


def test_per_profile_series_after_traffic(live: LiveServer) -> None:
    c = live.client
    assert c.post("/v1/profiles", json={"name": "p1", "interventions": P1}).status_code == 201
    for p in ("base", "p1", "base", "p1"):
        assert c.post("/v1/generate", json={"profile": p, "prompt": "Paris is", "max_new_tokens": 5}).status_code == 200
    with c.stream("POST", "/v1/generate", json={"profile": "p1", "prompt": "a", "max_new_tokens": 3,
                                                "stream": True}) as r:
        r.read()
    assert c.post("/v1/score", json={"profile": "p1", "context": "a", "continuations": [" b"]}).status_code == 200
    assert c.post("/v1/generate", json={"profile": "nope", "prompt": "a"}).status_code == 404
    m = c.get("/metrics").text

    for p in ("base", "p1"):
        assert value(m, "laser_requests_total", route="/v1/generate", status="200", profile=p, method="POST") >= 2
        assert value(m, "laser_request_duration_seconds_count", route="/v1/generate", profile=p) >= 2
        assert value(m, "laser_queue_duration_seconds_count", profile=p) >= 2
        assert value(m, "laser_inference_duration_seconds_count", profile=p, op="generate") >= 1
        assert value(m, "laser_time_to_first_token_seconds_count", profile=p) >= 2
        assert value(m, "laser_prompt_tokens_total", profile=p) > 0
        assert value(m, "laser_generated_tokens_total", profile=p) > 0
    assert value(m, "laser_requests_total", route="/v1/generate", status="404") == 1
    assert value(m, "laser_requests_total", route="/v1/score", profile="p1", status="200") == 1
    assert value(m, "laser_inference_duration_seconds_count", profile="p1", op="loglikelihood") == 1
    assert value(m, "laser_queue_depth") == 0 and value(m, "laser_running_rows") == 0
    # p1 was served per row from its compiled factors: the base weights stayed live, nothing was written.
    assert value(m, "laser_active_profile", profile="base") == 1
    assert value(m, "laser_weight_bytes_written_total") == 0
    assert value(m, "laser_profile_factor_bytes") > 0 and value(m, "laser_kv_cache_bytes") > 0
    assert value(m, "laser_batch_size_count", profile="all", op="decode") > 0


def test_streamed_request_is_timed_to_its_end(live: LiveServer) -> None:
    c = live.client
    with c.stream("POST", "/v1/generate", json={"prompt": "a", "max_new_tokens": 20, "stream": True}) as r:
        r.read()
    m = c.get("/metrics").text
    e2e = value(m, "laser_request_duration_seconds_sum", route="/v1/generate", profile="base")
    queue = value(m, "laser_queue_duration_seconds_sum", profile="base")
    infer = value(m, "laser_inference_duration_seconds_sum", profile="base")
    assert e2e >= infer and e2e >= queue


def test_unknown_profile_on_export_adds_no_profile_label(live: LiveServer) -> None:
    """A 404 for an unknown profile must not mint a metrics label from the request's raw input."""
    c = live.client
    assert c.post("/v1/profiles/no-such-profile-123/export", json={}).status_code == 404
    assert 'profile="no-such-profile-123"' not in c.get("/metrics").text
