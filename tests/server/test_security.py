"""API keys (admin vs inference scope), open routes, CORS off by default, no paths from requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import LiveServer, start_server, tiny_loaded

P1 = [{"target": "fc_in", "layer": 1, "rank_fraction": 0.1}]
ADMIN = {"Authorization": "Bearer admin-secret"}
INFER = {"Authorization": "Bearer infer-secret"}
WRONG = {"Authorization": "Bearer nope"}


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[LiveServer]:
    srv = start_server(tmp_path, tiny_loaded(), admin_api_key="admin-secret", api_key="infer-secret")
    yield srv
    srv.stop()


def test_mutations_need_the_admin_key(keyed: LiveServer) -> None:
    c = keyed.client
    body = {"name": "p1", "interventions": P1}
    r = c.post("/v1/profiles", json=body)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert c.post("/v1/profiles", json=body, headers=WRONG).status_code == 401
    assert c.post("/v1/profiles", json=body, headers=INFER).status_code == 403
    assert c.post("/v1/profiles?dry_run=true", json=body, headers=INFER).status_code == 403
    assert c.post("/v1/profiles", json=body, headers=ADMIN).status_code == 201
    assert c.put("/v1/profiles/p1", json={"interventions": P1}, headers=INFER).status_code == 403
    assert c.put("/v1/profiles/p1", json={"interventions": P1}, headers=ADMIN).status_code == 200
    assert c.delete("/v1/profiles/p1").status_code == 401
    assert c.delete("/v1/profiles/p1", headers=INFER).status_code == 403
    assert c.delete("/v1/profiles/p1", headers=ADMIN).status_code == 200


def test_inference_needs_a_key(keyed: LiveServer) -> None:
    c = keyed.client
    gen = {"prompt": "a", "max_new_tokens": 2}
    score = {"context": "a", "continuations": [" b"]}
    cmp = {"profiles": ["base", "base2"], "score": score}
    for path, body in (("/v1/generate", gen), ("/v1/score", score), ("/v1/compare", cmp)):
        assert c.post(path, json=body).status_code == 401
        assert c.post(path, json=body, headers=WRONG).status_code == 401
    assert c.post("/v1/generate", json=gen, headers=INFER).status_code == 200
    assert c.post("/v1/generate", json=gen, headers=ADMIN).status_code == 200
    assert c.post("/v1/score", json=score, headers=INFER).status_code == 200
    assert c.get("/v1/profiles").status_code == 401
    assert c.get("/v1/profiles", headers=INFER).status_code == 200
    assert c.get("/v1/profiles/base", headers=INFER).status_code == 200


def test_health_ready_metrics_stay_open(keyed: LiveServer) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert keyed.client.get(path).status_code == 200


def test_openapi_declares_bearer_auth(keyed: LiveServer) -> None:
    spec = keyed.client.get("/openapi.json").json()
    assert set(spec["components"]["securitySchemes"]) == {"AdminKey", "InferenceKey"}
    assert spec["paths"]["/v1/generate"]["post"]["security"] == [{"InferenceKey": []}, {"AdminKey": []}]
    assert spec["paths"]["/v1/profiles"]["post"]["security"] == [{"AdminKey": []}]
    assert "401" in spec["paths"]["/v1/generate"]["post"]["responses"]
    assert "403" in spec["paths"]["/v1/profiles"]["post"]["responses"]
    assert "security" not in spec["paths"]["/health"]["get"]
    for op in (op for ops in spec["paths"].values() for op in ops.values()):  # a scheme, never a header
        assert not [p for p in op.get("parameters", []) if p["name"].lower() == "authorization"]


def test_openapi_without_keys_declares_no_security(live: LiveServer) -> None:
    spec = live.client.get("/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})
    assert not [op for ops in spec["paths"].values() for op in ops.values() if "security" in op or "401" in
                op["responses"]]


def test_only_the_admin_key_leaves_inference_open(tmp_path: Path) -> None:
    """--help: an unset inference key means inference is open, whatever the admin key."""
    srv = start_server(tmp_path, tiny_loaded(), admin_api_key="admin-secret")
    try:
        c = srv.client
        assert c.post("/v1/generate", json={"prompt": "a", "max_new_tokens": 1}).status_code == 200
        assert c.get("/v1/profiles").status_code == 200
        assert c.post("/v1/profiles", json={"name": "p", "interventions": P1}).status_code == 401
        assert c.post("/v1/profiles", json={"name": "p", "interventions": P1}, headers=WRONG).status_code == 401
        spec = c.get("/openapi.json").json()
        assert "security" not in spec["paths"]["/v1/generate"]["post"]
        assert spec["paths"]["/v1/profiles"]["post"]["security"] == [{"AdminKey": []}]
        assert set(spec["components"]["securitySchemes"]) == {"AdminKey"}
    finally:
        srv.stop()


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[" * 100_000])
def test_authentication_comes_before_the_body(keyed: LiveServer, body: bytes) -> None:
    """An unauthenticated request learns it needs a key, not what is wrong with its body."""
    headers = {"Content-Type": "application/json"}
    for path in ("/v1/profiles", "/v1/generate", "/v1/completions"):
        r = keyed.client.post(path, content=body, headers=headers)
        assert r.status_code == 401, (path, r.text)
    r = keyed.client.post("/v1/profiles", content=body, headers={**headers, **ADMIN})
    assert r.status_code == 400 and r.json()["detail"][0]["type"] == "json_invalid", r.text


def test_cors_off_by_default(live: LiveServer) -> None:
    r = live.client.options("/v1/generate", headers={"Origin": "https://evil.example",
                                                      "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = live.client.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_when_configured(tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_loaded(), cors_origins=["https://ok.example"])
    try:
        r = srv.client.options("/v1/generate", headers={"Origin": "https://ok.example",
                                                         "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "https://ok.example"
        r = srv.client.options("/v1/generate", headers={"Origin": "https://evil.example",
                                                         "Access-Control-Request-Method": "POST"})
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"
    finally:
        srv.stop()


def test_no_request_reaches_the_filesystem(live: LiveServer, tmp_path: Path) -> None:
    """Names are SQLite keys under a strict pattern; nothing a request sends becomes a path."""
    data_dir = Path(live.app.state.settings.data_dir)
    before = sorted(p.name for p in data_dir.rglob("*"))
    for name in ("../../escape", "/etc/passwd", "..", "a\\b", "nul\x00"):
        r = live.client.post("/v1/profiles", json={"name": name, "interventions": P1})
        assert r.status_code == 422
    ok = live.client.post("/v1/profiles", json={"name": "plain.name_1-x", "interventions": P1})
    assert ok.status_code == 201
    after = sorted(p.name for p in data_dir.rglob("*"))
    assert not [n for n in after if n not in before and not n.startswith("laser.sqlite3")]
    assert not (tmp_path.parent / "escape").exists()
    # Request models refuse unknown fields, so no 'path' or 'file' option can slip through.
    r = live.client.post("/v1/generate", json={"prompt": "a", "model_path": "/etc/passwd"})
    assert r.status_code == 422
