"""Bad input of every kind answers a clear 4xx, and the server stays healthy afterwards."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.server.conftest import LiveServer, start_server, tiny_loaded


@pytest.mark.parametrize(("path", "content", "status", "loc"), [
    ("/v1/generate", b"{not json", 400, ["body", 1]),
    ("/v1/generate", b"\xff\xfe", 400, ["body"]),
    ("/v1/generate", b"[" * 100_000, 400, ["body"]),
    ("/v1/generate", b"", 422, ["body"]),
    ("/v1/generate", b"[1, 2]", 422, ["body"]),
    ("/v1/generate", b'{"prompt": 5}', 422, ["body", "prompt"]),
    ("/v1/generate", b'{"prompt": "a", "max_new_tokens": "many"}', 422, ["body", "max_new_tokens"]),
    ("/v1/generate", b'{"prompt": "a", "max_new_tokens": -1}', 422, ["body", "max_new_tokens"]),
    ("/v1/generate", b'{"prompt": "a", "temperature": -1}', 422, ["body", "temperature"]),
    ("/v1/generate", b'{"prompt": "a", "top_p": 0}', 422, ["body", "top_p"]),
    ("/v1/generate", b'{"prompt": "a", "stop": ["", "x"]}', 422, ["body", "stop"]),
    ("/v1/generate", b'{"prompt": "a", "prompts": ["b"]}', 422, ["body"]),
    ("/v1/generate", b'{}', 422, ["body"]),
    ("/v1/generate", b'{"prompt": "a", "unknown_field": 1}', 422, ["body", "unknown_field"]),
    ("/v1/generate", b'{"prompt": "a", "profile": "../x"}', 422, ["body", "profile"]),
    ("/v1/generate", b'{"prompt": "a", "profile": "nope"}', 404, ["body", "profile"]),
    ("/v1/score", b'{"profile": "nope", "text": "a"}', 404, ["body", "profile"]),
    ("/v1/score", b'{"context": "a", "continuations": "b"}', 422, ["body", "continuations"]),
    ("/v1/profiles", b'{"name": "x", "interventions": "fc_in"}', 422, ["body", "interventions"]),
    ("/v1/profiles", b'{"name": "x", "interventions": [{"target": "fc_in", "layer": 1.5, "rank": 1}]}', 422,
     ["body", "interventions", 0, "layer"]),
])
def test_bad_requests_are_clear_4xx(live: LiveServer, path: str, content: bytes, status: int, loc) -> None:
    r = live.client.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail[0]["msg"]
    assert detail[0]["loc"][:len(loc)] == loc, detail
    assert live.client.get("/health").json() == {"status": "ok"}
    assert live.client.post("/v1/generate", json={"prompt": "ok", "max_new_tokens": 2}).status_code == 200


def test_unknown_route_and_method(live: LiveServer) -> None:
    assert live.client.get("/v1/nope").status_code == 404
    assert live.client.get("/v1/generate").status_code == 405
    assert live.client.delete("/v1/profiles").status_code == 405


def test_oversize_bodies(tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_loaded(), max_body_bytes=4096)
    try:
        big = {"prompt": "a" * 10_000}
        r = srv.client.post("/v1/generate", json=big)
        assert r.status_code == 413 and "max_body_bytes" in r.text

        def chunks():  # no Content-Length: the cap is enforced while reading
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"a" * 1000
            yield b'"}'

        r = srv.client.post("/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        m = srv.client.get("/metrics").text
        assert 'status="413"' in m
        assert srv.client.get("/health").status_code == 200
        assert srv.client.post("/v1/generate", json={"prompt": "ok", "max_new_tokens": 2}).status_code == 200
    finally:
        srv.stop()


def test_503_while_loading(tmp_path: Path) -> None:
    """Before the model is ready, inference answers 503 with Retry-After; health answers at once."""
    from server.config import Settings
    from server.main import create_app
    from tests.server.conftest import LiveServer as LS

    app = create_app(Settings(data_dir=tmp_path / "d", model=str(tmp_path / "missing")), load_in_background=True)
    srv = LS.start(app)
    try:
        assert srv.client.get("/health").status_code == 200
        r = srv.client.post("/v1/generate", json={"prompt": "a"})
        assert r.status_code == 503
        assert srv.client.get("/ready").status_code == 503
    finally:
        srv.stop()


_FASTAPI_SCHEMAS = ("HTTPValidationError", "ValidationError")
_NON_JSON = ("text/plain", "image/png", "application/octet-stream", "text/event-stream")


def test_openapi_schema_is_complete(live: LiveServer) -> None:
    """Every schema field has a description; every operation is documented, takes a model and answers one."""
    spec = live.client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("ProfileCreate", "GenerateRequest", "CompletionRequest", "ChatCompletionResponse", "SweepJobCreate",
                 "PromptFormat", "TokenizerInfo", "Info", "ErrorResponse"):
        assert name in schemas, name
    missing = [f"{name}.{field}" for name, schema in schemas.items() if name not in _FASTAPI_SCHEMAS
               for field, prop in schema.get("properties", {}).items() if not prop.get("description")]
    assert not missing, f"schema fields without a description: {missing}"
    refs = set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(spec)))
    dangling = [r for r in refs if r.removeprefix("#/components/schemas/") not in schemas]
    assert not dangling, dangling

    assert spec["paths"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            assert op.get("description") or op.get("summary"), where
            if method in ("post", "put") and not path.endswith("/cancel"):
                assert "requestBody" in op and "$ref" in json.dumps(op["requestBody"]), where
            ok = {code: r for code, r in op["responses"].items() if code.startswith("2")}
            assert ok, where
            for code, response in ok.items():
                content = response.get("content", {})
                assert content, (where, code)
                json_ref = "$ref" in json.dumps(content.get("application/json", {}))
                other = [m for m in content if m != "application/json"]
                assert json_ref or other, f"{where} {code} answers no JSON model nor a declared media type"
                assert all(m in _NON_JSON for m in other), (where, code, other)
                if not json_ref:  # non-JSON answers say what the bytes are
                    assert "application/json" not in content, (where, code)
                    assert response.get("description") not in (None, "", "Successful Response"), (where, code)
                if "text/event-stream" in content:  # SSE: the event payload model is named and its schema given
                    assert re.search(r"data: \{[A-Za-z]+\}", response.get("description", "")), where
                    assert content["text/event-stream"].get("schema"), where
    stream = spec["paths"]["/v1/generate"]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in stream
    for path, method, media in (("/metrics", "get", "text/plain"), ("/v1/jobs/{job_id}/plot.png", "get", "image/png"),
                                ("/v1/exports/{name}/files/{file}", "get", "application/octet-stream"),
                                ("/v1/jobs/{job_id}/events", "get", "text/event-stream"),
                                ("/v1/completions", "post", "text/event-stream"),
                                ("/v1/chat/completions", "post", "text/event-stream")):
        assert media in spec["paths"][path][method]["responses"]["200"]["content"], (path, media)
