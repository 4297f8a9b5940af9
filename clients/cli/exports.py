"""``laser export``, ``laser exports``: a profile as a Hugging Face folder, written by the server and downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from clients.cli.common import (
    JsonOpt,
    app,
    client,
    console,
    emit_json,
    fmt_bytes,
)


@app.command()
def export(
    name: Annotated[str, typer.Argument(help="Profile to export.")],
    dest: Annotated[Path, typer.Argument(help="Local folder to download the export into.")],
    mode: Annotated[str, typer.Option("--mode", help="dense (plain transformers) or factored (rank-k factors + "
                                                     "laser_loader.py).")] = "dense",
    export_name: Annotated[Optional[str], typer.Option("--name", help="Export name on the server "
                                                                      "(default <profile>-<mode>).")] = None,
    factor_dtype: Annotated[Optional[str], typer.Option("--factor-dtype", help="float32, float16 or bfloat16.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the server's export and write into a "
                                                                "non-empty DEST.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a profile as a Hugging Face folder and download it into DEST.

    Examples:

      laser export late-fc ./late-fc-hf        # then AutoModelForCausalLM.from_pretrained("./late-fc-hf")

      laser export late-fc ./late-fc-small --mode factored
    """
    if mode not in ("dense", "factored"):
        raise typer.BadParameter("dense or factored", param_hint="--mode")
    with client() as c:
        report = c.export_profile(name, mode=mode, name=export_name, overwrite=overwrite,  # type: ignore[arg-type]
                                  factor_dtype=factor_dtype, timeout=None)
        folder = c.download_export(report.name, dest, overwrite=overwrite)
    if as_json:
        return emit_json({**report.model_dump(mode="json"), "local_path": str(folder)})
    out = console()
    t = Table("file", "size", title=f"{report.name} ({report.mode}) -> {folder}")
    for f in report.files:
        t.add_row(f.name, fmt_bytes(f.bytes))
    t.add_row(Text("total", style="bold"), Text(fmt_bytes(report.bytes), style="bold"))
    out.print(t)
    if report.mode == "factored":
        out.print(f"edited matrices: {fmt_bytes(report.dense_bytes)} dense -> {fmt_bytes(report.factored_bytes)} "
                  f"stored, [bold green]{fmt_bytes(report.saved_bytes)} saved[/]")
    for note in report.notes:
        out.print(f"[dim]note: {note}[/]")
    if report.load:
        out.print(f"[dim]load: {report.load}[/]")


@app.command("exports")
def exports_ls(as_json: JsonOpt = False) -> None:
    """List the server's exports."""
    with client() as c:
        data = c.list_exports()
    if as_json:
        return emit_json(data)
    t = Table("name", "profile", "mode", "size", "saved")
    for e in data:
        t.add_row(e.name, e.profile or "", e.mode, fmt_bytes(e.bytes), fmt_bytes(e.saved_bytes))
    console().print(t)


if __name__ == "__main__":
    app()
