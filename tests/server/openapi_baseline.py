"""Write the OpenAPI baseline that ``test_openapi_compat.py`` compares against: ``python -m
tests.server.openapi_baseline`` (only to accept a deliberate break; say why in the commit)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from server.config import Settings
from server.main import create_app
from tests.server.conftest import tiny_loaded

DATA = Path(__file__).parent / "data"
#: The settings each baseline is taken with: API keys unset, and both keys set (security on every operation).
KEYS: dict[str, dict[str, str]] = {"open": {}, "keys": {"admin_api_key": "a", "api_key": "i"}}


def live_schema(data_dir: Path, keys: dict[str, str]) -> dict[str, Any]:
    """The schema a started server on a tiny Llama serves (limits from the loaded model included)."""
    app = create_app(Settings(data_dir=data_dir / "data", **keys), loaded=tiny_loaded())
    with TestClient(app) as client:
        return client.get("/openapi.json").json()


def main() -> None:
    for label, keys in KEYS.items():
        with tempfile.TemporaryDirectory() as tmp:
            schema = live_schema(Path(tmp), keys)
        (DATA / f"openapi_{label}.json").write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
