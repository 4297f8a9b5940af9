"""Dataset routes over real HTTP: upload (JSONL, BIG-bench), bad rows by line, built-ins, durability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.server.conftest import LiveServer, start_server, tiny_loaded

MC_ROWS = [
    {"input": "Is Paris in France?", "choices": ["yes", "no"], "answer": 0},
    {"input": "Is Rome in France?", "choices": ["yes", "no"], "answer": "no"},
    {"input": "Capital of Italy?", "target_scores": {"Rome": 1, "Paris": 0}},
]
GEN_ROWS = [{"input": "The capital of France is", "targets": ["Paris"]},
            {"input": "The capital of Italy is", "target": "Rome"}]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def upload(c, name: str, rows: list[dict] | None = None, **kw):
    body = {"name": name, "format": "jsonl", "content": jsonl(rows or MC_ROWS), **kw}
    return c.post("/v1/datasets", json=body)


def test_upload_list_get_delete(live: LiveServer) -> None:
    c = live.client
    r = upload(c, "toy-mc", description="three rows")
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["name"], body["kind"], body["size"], body["builtin"]) == ("toy-mc", "multiple_choice", 3, False)
    assert body["sample"][0]["choices"] == ["yes", "no"] and body["sample"][1]["correct"] == [1]
    assert body["sample"][0]["prompt"].startswith("Is Paris in France?")

    names = [d["name"] for d in c.get("/v1/datasets").json()["data"]]
    assert names == ["epistemic_reasoning", "qa_wikidata", "toy-mc"]
    got = c.get("/v1/datasets/toy-mc").json()
    assert got["size"] == 3 and got["description"] == "three rows" and len(got["sample"]) == 3

    r = upload(c, "toy-gen", GEN_ROWS, prompt_template="Q: {input}\nA:")
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "generation"
    assert r.json()["sample"][0]["prompt"] == "Q: The capital of France is\nA:"
    assert r.json()["sample"][1]["targets"] == ["Rome"]

    assert c.delete("/v1/datasets/toy-mc").json() == {"name": "toy-mc", "deleted": True}
    assert c.get("/v1/datasets/toy-mc").status_code == 404
    assert c.delete("/v1/datasets/toy-mc").status_code == 404


def test_builtins_are_selectable_and_reserved(live: LiveServer) -> None:
    c = live.client
    ep = c.get("/v1/datasets/epistemic_reasoning").json()
    assert ep["builtin"] and ep["kind"] == "multiple_choice" and ep["size"] > 100
    assert ep["sample"][0]["prompt"].endswith("\nRelation: ")  # the task's own output prefix is honoured
    qa = c.get("/v1/datasets/qa_wikidata").json()
    assert qa["kind"] == "generation" and qa["builtin"]
    r = upload(c, "epistemic_reasoning")
    assert r.status_code == 409 and r.json()["detail"][0]["loc"] == ["body", "name"]
    assert c.delete("/v1/datasets/qa_wikidata").status_code == 409


def test_bad_rows_are_reported_by_line_and_nothing_is_stored(live: LiveServer) -> None:
    text = "\n".join([
        json.dumps(MC_ROWS[0]),
        "{not json",
        json.dumps({"input": "x", "choices": ["a", "b"], "answer": 5}),
        "",
        json.dumps({"choices": ["a", "b"], "answer": 0}),
        json.dumps(MC_ROWS[1]),
    ])
    r = live.client.post("/v1/datasets", json={"name": "bad", "format": "jsonl", "content": text})
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert [e["line"] for e in errors] == [2, 3, 5]
    assert "invalid JSON" in errors[0]["message"] and "out of range" in errors[1]["message"]
    assert "input" in errors[2]["message"]
    assert [d["loc"] for d in r.json()["detail"]] == [["body", "content", 2], ["body", "content", 3],
                                                      ["body", "content", 5]]
    assert live.client.get("/v1/datasets/bad").status_code == 404
    assert "bad" not in [d["name"] for d in live.client.get("/v1/datasets").json()["data"]]


def test_mixed_kinds_and_kind_mismatch(live: LiveServer) -> None:
    r = upload(live.client, "mixed", MC_ROWS + GEN_ROWS)
    assert r.status_code == 422 and "mixes" in r.text
    r = upload(live.client, "mc-as-gen", MC_ROWS, kind="generation")
    assert r.status_code == 422 and [e["line"] for e in r.json()["errors"]] == [1, 2, 3]


def test_bigbench_object_and_string(live: LiveServer) -> None:
    task = {"name": "t", "task_prefix": "Answer.\n", "example_input_prefix": "Question: ",
            "example_output_prefix": "\nAnswer:", "append_choices_to_input": False,
            "examples": [{"input": "2+2?", "target_scores": {"4": 1, "5": 0}},
                         {"input": "3+3?", "target_scores": {"6": 1, "7": 0}}]}
    c = live.client
    r = c.post("/v1/datasets", json={"name": "bb-obj", "format": "bigbench", "content": task})
    assert r.status_code == 201, r.text
    assert r.json()["sample"][0]["prompt"] == "Answer.\nQuestion: 2+2?\nAnswer:"
    r = c.post("/v1/datasets", json={"name": "bb-str", "format": "bigbench", "content": json.dumps(task),
                                     "prompt_template": "{input} ="})
    assert r.status_code == 201 and r.json()["sample"][1]["prompt"] == "Answer.\n3+3? ="
    bad = {**task, "examples": [task["examples"][0], {"input": "x"}, {"target": "y"}]}
    r = c.post("/v1/datasets", json={"name": "bb-bad", "format": "bigbench", "content": bad})
    assert r.status_code == 422 and [e["line"] for e in r.json()["errors"]] == [2, 3]
    r = c.post("/v1/datasets", json={"name": "bb-tpl", "format": "bigbench", "content": task,
                                     "prompt_template": "no placeholder"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt_template"]
    assert c.get("/v1/datasets/bb-tpl").status_code == 404


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "-x", "x" * 65, "sp ace"])
def test_unsafe_names_are_refused(live: LiveServer, name: str) -> None:
    r = upload(live.client, name)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]


def test_duplicate_upload_conflicts(live: LiveServer) -> None:
    assert upload(live.client, "dup").status_code == 201
    r = upload(live.client, "dup", GEN_ROWS)
    assert r.status_code == 409 and "already exists" in r.text
    assert live.client.get("/v1/datasets/dup").json()["kind"] == "multiple_choice"


def test_datasets_survive_restart(tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_loaded())
    try:
        assert upload(srv.client, "keep", GEN_ROWS).status_code == 201
    finally:
        srv.stop()
    srv = start_server(tmp_path, tiny_loaded())
    try:
        got = srv.client.get("/v1/datasets/keep").json()
        assert got["size"] == 2 and got["kind"] == "generation" and got["sample"][0]["targets"] == ["Paris"]
    finally:
        srv.stop()


def test_admin_key_guards_uploads(tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_loaded(), admin_api_key="adm", api_key="inf")
    try:
        c = srv.client
        assert upload(c, "x").status_code == 401
        r = c.post("/v1/datasets", json={"name": "x", "format": "jsonl", "content": jsonl(MC_ROWS)},
                   headers={"Authorization": "Bearer inf"})
        assert r.status_code == 403
        assert c.get("/v1/datasets", headers={"Authorization": "Bearer inf"}).status_code == 200
        r = c.post("/v1/datasets", json={"name": "x", "format": "jsonl", "content": jsonl(MC_ROWS)},
                   headers={"Authorization": "Bearer adm"})
        assert r.status_code == 201
    finally:
        srv.stop()
