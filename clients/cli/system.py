"""``laser serve``, ``laser info``, ``laser models``: the server process and what it has loaded."""

from __future__ import annotations

import typer
from rich.table import Table

from clients.cli.common import (
    JsonOpt,
    app,
    client,
    console,
    emit_json,
    err_console,
)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context) -> None:
    """Start the server; every flag goes to laser-serve (see [bold]laser-serve --help[/]).

    Examples:

      laser serve --model smollm2-135m --port 8000

      laser serve --model ./my-hf-folder --device cuda --admin-api-key s3cret
    """
    try:
        from server.__main__ import main as serve_main
    except ImportError as e:  # the client distribution alone (pip install ./clients): no server, no torch
        err_console().print(
            f"[red]error:[/] laser serve needs the server package, which is not installed here ({e.name or e}).\n"
            "Install it with [bold]pip install laser-serve[/] (from a checkout: [bold]pip install .[/] in the "
            "repository root), then run laser serve again. This installation is the client only: it talks to a "
            "running server (--url or LASER_URL).", markup=True)
        raise typer.Exit(1) from None
    serve_main(list(ctx.args))


@app.command()
def info(as_json: JsonOpt = False) -> None:
    """The loaded model: architecture, layers, LASER types, dtype, device.

    Example: laser info --json
    """
    with client() as c:
        i = c.info()
    if as_json:
        return emit_json(i)
    out = console()
    t = Table(title=f"{i.model_id} ({i.architecture}, {i.num_layers} layers)", show_header=False)
    for k, v in (("source", i.source), ("model type", i.model_type), ("dtype", i.dtype), ("device", i.device),
                 ("fingerprint", i.fingerprint), ("version", i.version), ("profiles", str(i.profiles)),
                 ("default profile", i.default_profile), ("active profile", str(i.active_profile))):
        t.add_row(k, v)
    out.print(t)
    types = Table("type", "module", "shape", "fused", title="LASER types")
    for name, lt in i.laser_types.items():
        types.add_row(name, lt.module, f"{lt.shape[0]} x {lt.shape[1]}", "yes" if lt.fused else "")
    out.print(types)


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """The OpenAI-compatible model list: base and every profile."""
    with client() as c:
        cards = c.list_models()
    if as_json:
        return emit_json(cards)
    t = Table("id", "parent", "root", "description")
    for card in cards:
        t.add_row(card.id, card.parent or "", card.root, card.description or "")
    console().print(t)
