"""The OpenAPI schema tells the truth: schemathesis fuzzes the real app (a tiny model behind uvicorn) with every
check, in its fuzzing and stateful phases, with API keys unset and set, and finds nothing.

The run is bounded and seeded by the project's ``schemathesis.toml`` (which also lists the deliberate deviations,
each with its reason); a failure prints schemathesis's report with the reproducing curl command.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import start_server, tiny_loaded

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "schemathesis.toml"
ADMIN_KEY = "st-admin-key"
#: Small limits keep every generated request cheap and let the schema state them (max_new_tokens is a maximum).
LIMITS = {"max_new_tokens": 16, "max_prompt_tokens": 64}
#: Every check runs (schemathesis 4 enables all by default). Not ``--checks all``: a CLI option outranks the
#: per-operation settings of schemathesis.toml, so it would switch back on the checks an operation turns off there.
CHECKS = tuple(os.environ.get("ST_CHECKS", "").split())


def _schemathesis(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
           "--config-file", str(CONFIG), "--no-color", "run", f"{url}/openapi.json", *CHECKS,
           "--phases", "fuzzing,stateful", "--workers", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "SCHEMATHESIS_HOOKS": ""})


@pytest.mark.parametrize("keys", [False, True], ids=["keys-unset", "keys-set"])
def test_schemathesis_finds_no_failure(tmp_path: Path, keys: bool) -> None:
    settings = dict(LIMITS, admin_api_key=ADMIN_KEY, api_key="st-inference-key") if keys else dict(LIMITS)
    srv = start_server(tmp_path, tiny_loaded(), **settings)
    try:
        extra = ("--header", f"Authorization: Bearer {ADMIN_KEY}") if keys else ()
        result = _schemathesis(srv.url, *extra)
        assert srv.client.get("/health").status_code == 200
    finally:
        srv.stop()
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-20000:]
    counts = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", report)
    assert counts and len(set(counts.groups())) == 1, report[-5000:]  # every operation was exercised
