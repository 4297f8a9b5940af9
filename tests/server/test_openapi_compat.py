"""The OpenAPI schema only grows: against the schema saved before the protocol package existed
(``tests/server/data/openapi_*.json``, laser-serve 0.1 on a tiny Llama, API keys unset and set), no path,
operation, parameter, response status, security requirement, schema, field or enum value has been removed, no
field changed its type, and no request gained a required field. Additions are fine.

To accept a deliberate break, regenerate the files (``python -m tests.server.openapi_baseline``) and say why in
the commit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests.server.openapi_baseline import DATA, KEYS, live_schema

METHODS = ("get", "put", "post", "delete", "patch")


def _resolve(schema: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node and len(node) == 1:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _types(node: Any) -> set[str]:
    """The JSON types and component names a property schema admits (through anyOf/oneOf)."""
    if not isinstance(node, dict):
        return set()
    out = {node["type"]} if isinstance(node.get("type"), str) else set(node.get("type") or [])
    if "$ref" in node:
        out.add(node["$ref"].rsplit("/", 1)[-1])
    for branch in (*node.get("anyOf", []), *node.get("oneOf", [])):
        out |= _types(branch)
    return out


def _enum(node: Any) -> set[Any]:
    if not isinstance(node, dict):
        return set()
    values = {json.dumps(v) for v in node.get("enum", [])}
    if "const" in node:
        values.add(json.dumps(node["const"]))
    for branch in (*node.get("anyOf", []), *node.get("oneOf", [])):
        values |= _enum(branch)
    return values


def _compare_object(where: str, old: dict[str, Any], new: dict[str, Any], problems: list[str], *,
                    request: bool) -> None:
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    for name, prop in old_props.items():
        if name not in new_props:
            problems.append(f"{where}: field {name!r} removed")
            continue
        lost = _types(prop) - _types(new_props[name])
        if lost:
            problems.append(f"{where}.{name}: no longer admits {sorted(lost)}")
        narrowed = _enum(prop) - _enum(new_props[name]) if _enum(new_props[name]) else set()
        if narrowed:
            problems.append(f"{where}.{name}: enum values removed {sorted(narrowed)}")
    if request:
        added = set(new.get("required", [])) - set(old.get("required", []))
        if added:
            problems.append(f"{where}: new required request field(s) {sorted(added)}")
    elif set(old.get("required", [])) - set(new.get("required", [])):
        problems.append(f"{where}: response field(s) no longer always present "
                        f"{sorted(set(old.get('required', [])) - set(new.get('required', [])))}")


def _request_schemas(schema: dict[str, Any]) -> set[str]:
    """Names of the components used in request bodies (and the components they reference)."""
    names: set[str] = set()
    todo = [json.dumps(op.get("requestBody", {})) for path in schema["paths"].values()
            for m, op in path.items() if m in METHODS]
    while todo:
        text = todo.pop()
        for part in text.split('"$ref": "#/components/schemas/')[1:]:
            name = part.split('"', 1)[0]
            if name not in names:
                names.add(name)
                todo.append(json.dumps(schema["components"]["schemas"].get(name, {})))
    return names


def removed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Everything ``old`` offered that ``new`` no longer does."""
    problems: list[str] = []
    for path, ops in old["paths"].items():
        if path not in new["paths"]:
            problems.append(f"path {path} removed")
            continue
        for method, op in ops.items():
            if method not in METHODS:
                continue
            new_op = new["paths"][path].get(method)
            where = f"{method.upper()} {path}"
            if new_op is None:
                problems.append(f"operation {where} removed")
                continue
            if op.get("operationId") != new_op.get("operationId"):
                problems.append(f"{where}: operationId {op.get('operationId')} -> {new_op.get('operationId')}")
            params = {(p["name"], p["in"]) for p in new_op.get("parameters", [])}
            for p in op.get("parameters", []):
                if (p["name"], p["in"]) not in params:
                    problems.append(f"{where}: parameter {p['in']}:{p['name']} removed")
            for status, response in op.get("responses", {}).items():
                if status not in new_op.get("responses", {}):
                    problems.append(f"{where}: response {status} removed")
                    continue
                gone = set(response.get("content", {})) - set(new_op["responses"][status].get("content", {}))
                if gone:
                    problems.append(f"{where}: response {status} content {sorted(gone)} removed")
            if "requestBody" in op:
                if "requestBody" not in new_op:
                    problems.append(f"{where}: request body removed")
                elif set(op["requestBody"]["content"]) - set(new_op["requestBody"]["content"]):
                    problems.append(f"{where}: request content type removed")
            if op.get("security") != new_op.get("security"):
                problems.append(f"{where}: security {op.get('security')} -> {new_op.get('security')}")
    requests = _request_schemas(new)
    old_schemas, new_schemas = old["components"]["schemas"], new["components"]["schemas"]
    for name, sch in old_schemas.items():
        if name not in new_schemas:
            problems.append(f"schema {name} removed")
            continue
        _compare_object(name, _resolve(old, sch), _resolve(new, new_schemas[name]), problems,
                        request=name in requests)
    return problems


@pytest.mark.parametrize("label", list(KEYS))
def test_openapi_schema_only_grows(tmp_path: Path, label: str) -> None:
    old = json.loads((DATA / f"openapi_{label}.json").read_text())
    new = live_schema(tmp_path, KEYS[label])
    problems = removed(old, new)
    assert not problems, "\n".join(problems)


def test_the_diff_sees_a_removed_field(tmp_path: Path) -> None:
    old = json.loads((DATA / "openapi_open.json").read_text())
    new = json.loads(json.dumps(old))
    del new["components"]["schemas"]["GenerateResponse"]["properties"]["usage"]
    new["components"]["schemas"]["GenerateParams"]["required"] = ["prompt"]
    del new["paths"]["/v1/score"]
    problems = removed(old, new)
    assert "GenerateResponse: field 'usage' removed" in problems
    assert "path /v1/score removed" in problems
    assert any("new required request field(s) ['prompt']" in p for p in problems)
