"""The UI's static files: served at /ui with a strict CSP and no key, shipped as package data, and wired to
routes that exist (a guard against API drift: every route api.js calls must be in the OpenAPI schema)."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

from server.routes.ui import UI_DIR
from tests.server.conftest import LiveServer, start_server, tiny_loaded

ROOT = Path(__file__).resolve().parents[3]
JS = sorted((UI_DIR / "js").glob("*.js"))


def test_ui_is_served_with_a_strict_csp_and_the_root_redirects_to_it(live: LiveServer) -> None:
    c = live.client
    for path in ("/", "/ui"):
        r = c.get(path, follow_redirects=False)
        assert r.status_code in (301, 302, 307, 308) and r.headers["location"].endswith("/ui/"), path
    page = c.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="js/app.js"></script>' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for module in JS:
        r = c.get(f"/ui/js/{module.name}")
        assert r.status_code == 200 and "javascript" in r.headers["content-type"], module.name
    assert c.get("/ui/nope.js").status_code == 404
    assert "/ui" not in c.get("/openapi.json").json()["paths"]


def test_ui_needs_no_key_but_the_api_behind_it_does(tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_loaded(), api_key="k", admin_api_key="a")
    try:
        assert srv.client.get("/ui/").status_code == 200
        assert srv.client.get("/ui/js/api.js").status_code == 200
        assert srv.client.get("/v1/profiles").status_code == 401
    finally:
        srv.stop()


def test_markup_has_no_inline_code_the_csp_would_block() -> None:
    html = (UI_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline <script>"
    assert not re.search(r"\sstyle=", html), "inline style attribute"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    for module in JS:
        assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML", module.read_text()), \
            f"{module.name}: build the DOM with dom.h (text stays text), not HTML strings"


def test_every_ui_file_is_package_data() -> None:
    """A wheel without the UI would serve 404s: each file must match a package-data pattern of ``server``."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["server"]
    package = ROOT / "server"
    files = [p.relative_to(package).as_posix() for p in UI_DIR.rglob("*") if p.is_file()]
    assert files
    missing = [f for f in files if not any(fnmatch.fnmatchcase(f, pat) and f.count("/") == pat.count("/")
                                           for pat in patterns)]
    assert missing == [], f"add to [tool.setuptools.package-data] server: {missing}"


def test_relative_imports_between_modules_resolve() -> None:
    for module in JS:
        for target in re.findall(r'from\s+"(\./[^"]+)"', module.read_text()):
            assert (module.parent / target).resolve().is_file(), f"{module.name} imports missing {target}"
    html = (UI_DIR / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^":#]+)"', html):
        assert (UI_DIR / ref).is_file(), f"index.html refers to missing {ref}"


def _api_calls() -> set[tuple[str, str]]:
    """(method, path with ``{}`` for each parameter) of every request api.js makes."""
    source = (UI_DIR / "js" / "api.js").read_text()
    calls = set()
    for method, path in re.findall(r'(?:request|openStream)\("([A-Z]+)",\s*[`"]([^`"]+)[`"]', source):
        calls.add((method.lower(), re.sub(r"\$\{[^}]+\}", "{}", path)))
    return calls


def test_every_route_the_ui_calls_exists_in_the_api(live: LiveServer) -> None:
    calls = _api_calls()
    assert ("post", "/v1/generate") in calls and ("get", "/v1/jobs/{}/events") in calls
    schema = live.client.get("/openapi.json").json()["paths"]
    normalized = {re.sub(r"\{[^}]+\}", "{}", p): ops for p, ops in schema.items()}
    for method, path in sorted(calls):
        ops = normalized.get(path)
        assert ops is not None and method in ops, f"the UI calls {method.upper()} {path}, which the API lacks"

