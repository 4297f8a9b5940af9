"""The application state is typed and holds no model: serving modules ask the engine (``engine.info`` for facts,
submitted work for computation), so the engine's owner thread is the only code that touches weights."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from server.state import Services

SERVER = Path(__file__).resolve().parents[2] / "server"


def test_services_fields_are_named_and_hold_no_model() -> None:
    names = {f.name for f in dataclasses.fields(Services)}
    assert {"settings", "engine", "db", "profiles", "datasets", "metrics", "jobs"} <= names
    assert not names & {"loaded", "model", "scorer", "swapper", "extras"}


def test_serving_modules_do_not_reach_into_the_engine() -> None:
    """Routes and serving logic use the engine's public surface only, never the model behind it."""
    pattern = re.compile(r"\.(swapper|scorer|batch|router)\b|\.loaded\b|get_input_embeddings")
    offenders = [f"{path.relative_to(SERVER)}:{i}: {line.strip()}"
                 for folder in ("serving", "routes") for path in sorted((SERVER / folder).rglob("*.py"))
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
