"""``laser datasets ls|show|upload|rm``: evaluation datasets for sweeps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from clients.cli.common import (
    JsonOpt,
    client,
    console,
    datasets_app,
    emit_json,
)


@datasets_app.command("ls")
def datasets_ls(as_json: JsonOpt = False) -> None:
    """List datasets (built-in first)."""
    with client() as c:
        data = c.list_datasets()
    if as_json:
        return emit_json(data)
    t = Table("name", "kind", "size", "built in", "description")
    for d in data:
        t.add_row(d.name, d.kind, str(d.size), "yes" if d.builtin else "", d.description)
    console().print(t)


@datasets_app.command("show")
def datasets_show(name: str, as_json: JsonOpt = False) -> None:
    """One dataset: kind, size and a sample."""
    with client() as c:
        d = c.get_dataset(name)
    if as_json:
        return emit_json(d)
    out = console()
    out.print(f"[bold]{d.name}[/]: {d.kind}, {d.size} examples")
    for s in d.sample:
        out.print(Text(f"- {s.prompt!r} choices={s.choices} correct={s.correct} targets={s.targets}"))


@datasets_app.command("upload")
def datasets_upload(
    name: str,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL file or BIG-bench task.json.")],
    format: Annotated[str, typer.Option("--format", help="jsonl or bigbench.")] = "jsonl",
    prompt_template: Annotated[Optional[str], typer.Option("--prompt-template")] = None,
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Upload a dataset.  Example: laser datasets upload my-qa ./qa.jsonl"""
    with client() as c:
        d = c.upload_dataset(name, file, format=format, prompt_template=prompt_template,  # type: ignore[arg-type]
                             description=description)
    if as_json:
        return emit_json(d)
    console().print(f"[green]uploaded[/] {d.name}: {d.kind}, {d.size} examples")


@datasets_app.command("rm")
def datasets_rm(name: str) -> None:
    """Delete an uploaded dataset."""
    with client() as c:
        c.delete_dataset(name)
    console().print(f"deleted {name}")
