"""``laser profiles ls|show|create|rm``: named edit profiles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from clients.cli.common import (
    JsonOpt,
    client,
    console,
    emit_json,
    pct,
    profiles_app,
    spec_text,
)


def parse_edit(text: str) -> dict[str, Any]:
    """``kind:target:layer[:rho]`` -> an intervention (rho is the rank fraction; layer may be negative or 'all')."""
    parts = text.split(":")
    if not 3 <= len(parts) <= 4:
        raise typer.BadParameter(f"{text!r}: expected kind:target:layer[:rho], e.g. laser:fc_in:-2:0.01")
    kind, target, layer = parts[:3]
    spec: dict[str, Any] = {"kind": kind, "target": target}
    try:
        spec["layer"] = layer if layer == "all" else int(layer)
        if len(parts) == 4:
            spec["rank_fraction"] = float(parts[3])
    except ValueError:
        raise typer.BadParameter(f"{text!r}: layer must be an int (or 'all') and rho a number") from None
    return spec


@profiles_app.command("ls")
def profiles_ls(as_json: JsonOpt = False) -> None:
    """List profiles, base first.  Example: laser profiles ls --json"""
    with client() as c:
        profiles = c.list_profiles()
    if as_json:
        return emit_json(profiles)
    t = Table("name", "edits", "matrices", "active", "description")
    for p in profiles:
        t.add_row(p.name, "; ".join(spec_text(s) for s in p.interventions) or "-", str(p.matrices),
                  "*" if p.active else "", p.description)
    console().print(t)


@profiles_app.command("show")
def profiles_show(name: str, as_json: JsonOpt = False) -> None:
    """Show one profile.  Example: laser profiles show late-fc"""
    with client() as c:
        p = c.get_profile(name)
    if as_json:
        return emit_json(p)
    out = console()
    out.print(f"[bold]{p.name}[/]  {p.matrices} matrices{'  (active)' if p.active else ''}")
    if p.description:
        out.print(p.description)
    t = Table("#", "kind", "target", "layer", "knob")
    for i, s in enumerate(p.interventions):
        knob = next((f"{k}={getattr(s, k)}" for k in ("rank_fraction", "rank", "energy", "sparsity")
                     if getattr(s, k) is not None), "")
        t.add_row(str(i), s.kind, s.target, str(s.layer), knob)
    out.print(t)


@profiles_app.command("create")
def profiles_create(
    name: str,
    edit: Annotated[Optional[list[str]], typer.Option("--edit", "-e", help="kind:target:layer[:rho], repeatable.")] = None,
    spec: Annotated[Optional[str], typer.Option("--spec", help="Interventions as JSON, or @file.json.")] = None,
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    replace: Annotated[bool, typer.Option("--replace", help="Replace an existing profile.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report per-matrix k and error.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create (or --replace) a profile.

    Examples:

      laser profiles create late-fc -e laser:fc_in:-2:0.01 -e laser:fc_out:-2:0.05

      laser profiles create mine --spec @profile.json --dry-run
    """
    interventions = [parse_edit(e) for e in edit or []]
    if spec:
        text = Path(spec[1:]).read_text() if spec.startswith("@") else spec
        loaded = json.loads(text)
        interventions += loaded if isinstance(loaded, list) else loaded.get("interventions", [])
    if not interventions:
        raise typer.BadParameter("give at least one --edit or --spec")
    with client() as c:
        if dry_run:
            report = c.dry_run_profile(name, interventions)
        elif replace:
            profile = c.replace_profile(name, interventions, description=description)
        else:
            profile = c.create_profile(name, interventions, description=description)
    if dry_run:
        if as_json:
            return emit_json(report)
        t = Table("#", "matrix", "param", "kind", "k", "retained energy", "rel. Frobenius error",
                  title=f"dry run: {name}")
        for r in report.matrices:
            t.add_row(str(r.index), f"{r.type}@{r.layer}", r.param_name, r.kind, str(r.k if r.k is not None else "-"),
                      pct(r.retained_energy), f"{r.relative_frobenius_error:.4f}")
        return console().print(t)
    if as_json:
        return emit_json(profile)
    console().print(f"[green]{'stored' if replace else 'created'}[/] {profile.name} ({profile.matrices} matrices)")


@profiles_app.command("rm")
def profiles_rm(name: str) -> None:
    """Delete a profile.  Example: laser profiles rm late-fc"""
    with client() as c:
        c.delete_profile(name)
    console().print(f"deleted {name}")
