"""``laser sweep``, ``laser jobs ls|show|examples|cancel|rm``, ``laser promote``: validation sweeps as jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from clients.cli.common import (
    JsonOpt,
    app,
    client,
    console,
    csv_list,
    emit_json,
    err_console,
    jobs_app,
    pct,
    spec_text,
)
from laser_protocol.jobs import JobProgress, JobPublic, SweepRowPublic


def _row_cells(r: SweepRowPublic) -> list[str]:
    v, lab = r.validation, r.labels
    notes = [x for x in (r.rejected, r.eliminated) if x]
    top = "-" if lab is None or lab.top_answer is None else f"{lab.top_answer} {pct(lab.top_answer_share)}"
    return [r.key, r.role, pct(v.accuracy) if v else "-",
            f"[{pct(v.ci_low)}, {pct(v.ci_high)}]" if v else "-",
            "-" if r.delta_accuracy is None else f"{100 * r.delta_accuracy:+.1f}",
            "-" if lab is None or lab.balanced_accuracy is None else pct(lab.balanced_accuracy),
            top + (" [collapsed]" if r.collapsed else ""),
            "-" if v is None or v.log_loss is None else f"{v.log_loss:.4f}", "; ".join(notes)]


def print_job(job: JobPublic) -> None:
    out = console()
    out.print(f"[bold]job {job.id}[/] on {job.dataset}: {job.state} ({job.done}/{job.total or '?'} steps)"
              + (f", stopped: {job.stopped}" if job.stopped else ""))
    if job.error:
        out.print(f"[red]{job.error}[/]")
    t = Table("config", "role", "val acc", "95% CI", "Δ acc (pp)", "bal. acc", "top answer", "log-loss", "notes",
              title="validation")
    best = job.best.key if job.best else None
    for r in job.rows:
        if r.role == "test":
            continue
        style = "bold green" if r.key == best and r.key != "base" else "dim" if r.collapsed or r.eliminated else None
        t.add_row(*_row_cells(r), style=style)
    out.print(t)
    base_labels = job.base.labels if job.base is not None else None
    if base_labels is not None and base_labels.majority_label is not None:
        out.print(f"majority baseline on validation: always {base_labels.majority_label!r} scores "
                  f"{pct(base_labels.majority_accuracy)}")
    if job.example_evaluations and job.full_grid_evaluations and job.example_evaluations < job.full_grid_evaluations:
        out.print(f"successive halving: {job.example_evaluations} example-evaluations instead of "
                  f"{job.full_grid_evaluations} ({job.full_grid_evaluations / job.example_evaluations:.1f}x fewer)")
    if job.test is not None:
        tr = job.test
        line = (f"test: base {pct(tr.base.accuracy)} vs {tr.winner_key} {pct(tr.winner.accuracy)} "
                f"(McNemar p={tr.mcnemar.p_value:.3g})")
        if tr.majority is not None:
            line += f"; always {tr.majority.label!r} {pct(tr.majority.accuracy)} (p={tr.majority.mcnemar.p_value:.3g})"
        out.print(line)
    if job.verdict:
        out.print(f"[bold]{job.verdict}[/]")


class _Watch:
    """A rich progress bar fed by job progress events: done/total, server ETA, best so far."""

    def __init__(self, progress: Progress, job_id: str) -> None:
        self.progress = progress
        self.task = progress.add_task(f"sweep {job_id}", total=None, eta="?", best="-")

    def __call__(self, ev: JobProgress) -> None:
        best = "-"
        if ev.best is not None and ev.best.validation is not None:
            best = f"{ev.best.key} {pct(ev.best.validation.accuracy)}"
        eta = "-" if ev.eta_s is None else f"{ev.eta_s:.0f}s"
        self.progress.update(self.task, completed=ev.done, total=ev.total, eta=eta, best=best,
                             description=f"{ev.state}")


@app.command()
def sweep(
    dataset: Annotated[str, typer.Option("--dataset", "-D", help="Dataset name (built in or uploaded).")],
    types: Annotated[Optional[str], typer.Option("--types", help="Comma-separated LASER types, e.g. fc_in,fc_out.")] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Comma-separated layers (negative from the end) "
                                                                    "or 'all'.")] = None,
    rhos: Annotated[Optional[str], typer.Option("--rhos", help="Comma-separated rank fractions in (0, 1].")] = None,
    grid: Annotated[Optional[str], typer.Option("--grid", help="Any sweep config fields as JSON (or @file.json); "
                                                                "the flags above override it.")] = None,
    max_configs: Annotated[Optional[int], typer.Option("--max-configs")] = None,
    strategy: Annotated[Optional[str], typer.Option("--strategy", help="grid, greedy_compose, spectral_prior or "
                                                                       "successive_halving.")] = None,
    metric: Annotated[Optional[str], typer.Option("--metric", help="accuracy, balanced_accuracy or log_loss.")] = None,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Run the steps on a pool of Ray actors at this address "
                                                             "('local' for a local cluster).")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow it: a live progress bar with ETA and best so "
                                                              "far, then the results table.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start a validation sweep over (type, layer, rho).

    Examples:

      laser sweep --dataset epistemic_reasoning --types fc_in,fc_out --layers=-1,-2 --rhos 0.01,0.1 --watch

      laser sweep -D epistemic_reasoning --strategy successive_halving --metric balanced_accuracy --ray local

      laser sweep -D my-qa --grid '{"strategy": "greedy_compose", "max_configs": 20}' --json
    """
    config: dict[str, Any] = {}
    if grid:
        config.update(json.loads(Path(grid[1:]).read_text() if grid.startswith("@") else grid))
    if types:
        config["types"] = csv_list(types)
    if layers:
        config["layers"] = "all" if layers.strip() == "all" else [int(x) for x in csv_list(layers) or []]
    if rhos:
        config["rhos"] = [float(x) for x in csv_list(rhos) or []]
    if max_configs is not None:
        config["max_configs"] = max_configs
    for name, value in (("strategy", strategy), ("metric", metric), ("ray_address", ray)):
        if value is not None:
            config[name] = value
    config.pop("dataset", None)
    with client() as c:
        job = c.create_sweep(dataset, **config)
        if watch:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                       TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
                       TextColumn("best: {task.fields[best]}"))
            with Progress(*columns, console=err_console() if as_json else console(), transient=False) as progress:
                job = c.wait(job.id, on_progress=_Watch(progress, job.id))
    if as_json:
        return emit_json(job)
    if watch:
        print_job(job)
    else:
        console().print(f"queued job [bold]{job.id}[/] ({job.state}); follow it with: laser jobs show {job.id} --watch")
    if watch and job.state == "failed":
        raise typer.Exit(1)


@jobs_app.command("ls")
def jobs_ls(state: Annotated[Optional[str], typer.Option("--state")] = None, as_json: JsonOpt = False) -> None:
    """List jobs, newest first."""
    with client() as c:
        jobs = c.list_jobs(state)
    if as_json:
        return emit_json(jobs)
    t = Table("id", "state", "dataset", "done", "error")
    for j in jobs:
        t.add_row(j.id, j.state, j.dataset, f"{j.done}/{j.total or '?'}", j.error or "")
    console().print(t)


@jobs_app.command("show")
def jobs_show(job_id: str, watch: Annotated[bool, typer.Option("--watch", "-w")] = False,
              as_json: JsonOpt = False) -> None:
    """A job's table (with --watch: follow it to the end first)."""
    with client() as c:
        if watch:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("ETA {task.fields[eta]}"), TextColumn("best: {task.fields[best]}"),
                          console=err_console() if as_json else console()) as progress:
                job = c.wait(job_id, on_progress=_Watch(progress, job_id))
        else:
            job = c.get_job(job_id)
    if as_json:
        return emit_json(job)
    print_job(job)


@jobs_app.command("examples")
def jobs_examples(
    job_id: str,
    config: Annotated[str, typer.Option("--config", "-c", help="Config key (see `laser jobs show`), or 'base'.")],
    split: Annotated[str, typer.Option("--split", help="validation (any config) or test (base and the winner).")]
    = "validation",
    which: Annotated[str, typer.Option("--filter", "-f", help="flips (fixed or broken), fixed, broken, disagree, "
                                                              "all.")] = "flips",
    limit: Annotated[int, typer.Option("--limit", "-n", help="Examples per page.")] = 20,
    offset: Annotated[int, typer.Option("--offset", help="Skip this many matching examples.")] = 0,
    width: Annotated[int, typer.Option("--prompt-chars", help="Characters of each prompt shown (the end).")] = 80,
    as_json: JsonOpt = False,
) -> None:
    """Which examples a config fixed and broke relative to base, with prompt, gold and both answers.

    Example: laser jobs examples sweep-3f2a9c1b7d0e --config laser:fc_in:27:0.01 --filter fixed
    """
    with client() as c:
        page = c.job_examples(job_id, config, split=split, filter=which, offset=offset, limit=limit)
    if as_json:
        return emit_json(page)
    counts = page.counts
    title = (f"{page.config} vs base on {page.split}: fixed {counts.get('fixed', 0)}, broken {counts.get('broken', 0)}, "
             f"both right {counts.get('both_right', 0)}, both wrong {counts.get('both_wrong', 0)}")
    t = Table("#", "id", "prompt (end)", "gold", "base", "config", "change", title=title)
    for e in page.data:
        prompt = " ".join(e.prompt.split())
        prompt = prompt if len(prompt) <= width else "…" + prompt[-width:]
        style = "green" if e.change == "fixed" else "red" if e.change == "broken" else None
        t.add_row(str(e.index), str(e.id), prompt, e.gold, e.base_answer, e.config_answer, e.change, style=style)
    console().print(t)
    shown = f"{page.offset + 1}-{page.offset + len(page.data)}" if page.data else "none"
    console().print(f"{page.filter}: {shown} of {page.total}"
                    + (f"; next: --offset {page.offset + len(page.data)}" if page.offset + len(page.data) < page.total
                       else ""))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str) -> None:
    """Cancel a queued or running job."""
    with client() as c:
        job = c.cancel_job(job_id)
    console().print(f"job {job.id}: {job.state}")


@jobs_app.command("rm")
def jobs_rm(job_id: str) -> None:
    """Delete a finished job and its rows (cancel a running one first)."""
    with client() as c:
        c.delete_job(job_id)
    console().print(f"job {job_id}: deleted")


@app.command()
def promote(
    job_id: str,
    name: str,
    description: Annotated[Optional[str], typer.Option("--description", "-d")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace an existing profile of that name.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Store a finished sweep's best config as a profile.  Example: laser promote 3f2a9c late-fc"""
    with client() as c:
        p = c.promote(job_id, name, description=description, replace=replace)
    if as_json:
        return emit_json(p)
    console().print(f"[green]promoted[/] {p.name}: " + "; ".join(spec_text(s) for s in p.interventions))
