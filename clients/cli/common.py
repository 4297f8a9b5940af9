"""What every ``laser`` command shares: the typer apps, the global options, the client they build, output helpers.

Every read command takes ``--json`` (plain JSON on stdout, for scripts). The server, keys and timeout
come from global options or the environment: ``LASER_URL`` (default http://127.0.0.1:8000),
``LASER_API_KEY``, ``LASER_ADMIN_API_KEY``, ``LASER_TIMEOUT``. Errors print the server's message on
stderr and exit 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel
from rich.console import Console

from clients.errors import APIError, LaserError
from clients.sync import LaserClient

app = typer.Typer(name="laser", no_args_is_help=True, rich_markup_mode="rich", add_completion=False,
                  help="Drive a [bold]laser-serve[/] server: profiles, inference, A/B, sweeps, export.\n\n"
                       "Examples:\n\n"
                       "  laser info\n\n"
                       "  laser profiles create late-fc -e laser:fc_in:-2:0.01\n\n"
                       "  laser ab --profiles base,late-fc \"The capital of France is\"\n\n"
                       "  laser sweep --dataset epistemic_reasoning --types fc_in --layers=-1,-2 --watch")
profiles_app = typer.Typer(no_args_is_help=True, help="Named edit profiles: ls, show, create, rm.")
datasets_app = typer.Typer(no_args_is_help=True, help="Evaluation datasets for sweeps: ls, show, upload, rm.")
jobs_app = typer.Typer(no_args_is_help=True, help="Sweep jobs: ls, show, examples, cancel, rm.")
app.add_typer(profiles_app, name="profiles")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of tables.")]
ProfileOpt = Annotated[Optional[str], typer.Option("--profile", "-p", help="Profile (default: the server's).")]


class _State:
    url: str | None = None
    api_key: str | None = None
    admin_api_key: str | None = None
    timeout: float = 60.0


_state = _State()


def console() -> Console:
    return Console(soft_wrap=False, highlight=False)


def err_console() -> Console:
    return Console(stderr=True, highlight=False)


@contextmanager
def client() -> Iterator[LaserClient]:
    """A client from the global options; LaserError -> message on stderr, exit 1."""
    try:
        with LaserClient(_state.url, api_key=_state.api_key, admin_api_key=_state.admin_api_key,
                         timeout=_state.timeout) as c:
            yield c
    except APIError as e:
        err_console().print(f"[red]error {e.status}:[/] {e.message}", markup=True)
        raise typer.Exit(1) from None
    except (LaserError, FileExistsError, ValueError) as e:
        err_console().print(f"[red]error:[/] {e}", markup=True)
        raise typer.Exit(1) from None


def emit_json(value: Any) -> None:
    """JSON on stdout, plain (no rich markup or wrapping)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    typer.echo(json.dumps(value, indent=2))


def csv_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def fmt_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@app.callback()
def main(
    url: Annotated[Optional[str], typer.Option("--url", envvar="LASER_URL",
                                               help="Server URL (default http://127.0.0.1:8000).")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LASER_API_KEY",
                                                   help="Inference key.", show_default=False)] = None,
    admin_api_key: Annotated[Optional[str], typer.Option("--admin-api-key", envvar="LASER_ADMIN_API_KEY",
                                                         help="Admin key (mutations, export).",
                                                         show_default=False)] = None,
    timeout: Annotated[float, typer.Option("--timeout", envvar="LASER_TIMEOUT",
                                           help="Seconds per request.")] = 60.0,
) -> None:
    """Drive a laser-serve server."""
    _state.url, _state.api_key, _state.admin_api_key, _state.timeout = url, api_key, admin_api_key, timeout


def spec_text(spec: BaseModel | dict[str, Any]) -> str:
    """One intervention on one line: ``kind target@layer knob=value``."""
    s = spec.model_dump() if isinstance(spec, BaseModel) else spec
    knob = next((f"{k}={s[k]}" for k in ("rank_fraction", "rank", "energy", "sparsity") if s.get(k) is not None), "")
    return f"{s.get('kind')} {s.get('target')}@{s.get('layer')} {knob}".strip()
