"""The ``laser`` command line: drive a laser-serve server (typer + rich).

Every read command takes ``--json`` (plain JSON on stdout, for scripts). The server, keys and timeout
come from global options or the environment: ``LASER_URL`` (default http://127.0.0.1:8000),
``LASER_API_KEY``, ``LASER_ADMIN_API_KEY``, ``LASER_TIMEOUT``. Errors print the server's message on
stderr and exit 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from clients import models as m
from clients.client import LaserClient
from clients.errors import APIError, LaserError

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


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _fmt_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(x: float | None) -> str:
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


# ---------------------------------------------------------------------------------------------- serve / info


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context) -> None:
    """Start the server; every flag goes to laser-serve (see [bold]laser-serve --help[/]).

    Examples:

      laser serve --model smollm2-135m --port 8000

      laser serve --model ./my-hf-folder --device cuda --admin-api-key s3cret
    """
    from server.__main__ import main as serve_main

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


# ---------------------------------------------------------------------------------------------- profiles


def _spec_text(spec: dict[str, Any]) -> str:
    knob = next((f"{k}={spec[k]}" for k in ("rank_fraction", "rank", "energy", "sparsity") if spec.get(k) is not None),
                "")
    return f"{spec.get('kind')} {spec.get('target')}@{spec.get('layer')} {knob}".strip()


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
        t.add_row(p.name, "; ".join(_spec_text(s) for s in p.interventions) or "-", str(p.matrices),
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
        knob = next((f"{k}={s[k]}" for k in ("rank_fraction", "rank", "energy", "sparsity") if s.get(k) is not None),
                    "")
        t.add_row(str(i), str(s.get("kind")), str(s.get("target")), str(s.get("layer")), knob)
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
                      _pct(r.retained_energy), f"{r.relative_frobenius_error:.4f}")
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


# ---------------------------------------------------------------------------------------------- inference


@app.command()
def generate(
    prompt: str,
    profile: ProfileOpt = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", "-n")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-t")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string, repeatable.")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print text as it is generated.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate text with a profile.

    Examples:

      laser generate "The capital of France is" -p late-fc -n 16

      laser generate "Once upon a time" --stream --temperature 0.8 --seed 1
    """
    params = dict(profile=profile, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                  seed=seed, stop=stop)
    with client() as c:
        if stream and not as_json:
            last = None
            for ev in c.generate_stream(prompt, **params):
                sys.stdout.write(ev.text)
                sys.stdout.flush()
                last = ev
            sys.stdout.write("\n")
            if last is not None and last.usage is not None:
                err_console().print(f"[dim]{last.profile}: {last.usage.completion_tokens} tokens, "
                                    f"{last.finish_reason}[/]")
            return
        result = c.generate(prompt, **params)
    if as_json:
        return emit_json(result)
    typer.echo(result.text)


@app.command()
def score(
    context: Annotated[Optional[str], typer.Option("--context", "-c", help="Context the continuations follow.")] = None,
    continuation: Annotated[Optional[list[str]], typer.Option("--continuation", "-k",
                                                              help="Candidate, repeatable (leading space!).")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Score the perplexity of this text instead.")] = None,
    normalize: Annotated[bool, typer.Option("--normalize", help="Argmax by per-token log-prob.")] = False,
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Log-probs of continuations (with argmax), or the perplexity of a text.

    Examples:

      laser score -c "The capital of France is" -k " Paris" -k " Rome"

      laser score --text "The quick brown fox" -p late-fc --json
    """
    with client() as c:
        r = c.score(context, continuation, text=text, normalize=normalize, profile=profile)
    if as_json:
        return emit_json(r)
    if r.perplexity is not None:
        ppl = r.perplexity
        console().print(f"{r.profile}: perplexity {ppl.perplexity:.4g} over {ppl.n_tokens} tokens "
                        f"(log-prob {ppl.logprob:.4f})")
        return
    t = Table("", "continuation", "log-prob", "tokens", "mean", "greedy", title=f"profile {r.profile}")
    for i, s in enumerate(r.continuations or []):
        t.add_row("*" if i == r.argmax else "", repr(s.continuation), f"{s.logprob:.4f}", str(s.n_tokens),
                  "-" if s.mean_logprob is None else f"{s.mean_logprob:.4f}", "yes" if s.is_greedy else "",
                  style="bold" if i == r.argmax else None)
    console().print(t)


def _diff_text(reference: str, text: str) -> Text:
    """``text`` with the part that differs from ``reference`` highlighted."""
    n = next((i for i in range(min(len(reference), len(text))) if reference[i] != text[i]),
             min(len(reference), len(text)))
    out = Text(text[:n])
    out.append(text[n:] if n < len(text) else ("" if len(text) == len(reference) else "∅"), style="bold red")
    return out


@app.command("ab")
def ab(
    prompt: Annotated[Optional[str], typer.Argument(help="Prompt (generate) or context (with --continuation).")] = None,
    profiles: Annotated[str, typer.Option("--profiles", help="Comma-separated, the first is the reference.")] = "",
    continuation: Annotated[Optional[list[str]], typer.Option("--continuation", "-k",
                                                              help="Compare scores of these instead.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Compare the perplexity of this text.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", "-n")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-t")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A/B: the same request on several profiles, side by side; what differs from the first is highlighted.

    Examples:

      laser ab --profiles base,late-fc "The capital of France is" -n 16

      laser ab --profiles base,late-fc "The capital of France is" -k " Paris" -k " Rome"
    """
    names = _csv(profiles) or []
    if len(names) < 2:
        raise typer.BadParameter("give at least two profiles, e.g. --profiles base,late-fc", param_hint="--profiles")
    with client() as c:
        if continuation or text is not None:
            r = c.compare(names, context=prompt if continuation else None, continuations=continuation, text=text)
        else:
            if prompt is None:
                raise typer.BadParameter("give a prompt", param_hint="PROMPT")
            r = c.compare(names, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    if as_json:
        return emit_json(r)
    out = console()
    if r.generate is not None:
        t = Table("profile", "text", "tokens", "finish", title=prompt, show_lines=True)
        ref = r.generate[0].text
        for i, g in enumerate(r.generate):
            choice = g.choices[0]
            t.add_row(Text(g.profile, style="bold" if i == 0 else ""),
                      Text(choice.text) if i == 0 else _diff_text(ref, choice.text),
                      str(choice.completion_tokens), choice.finish_reason)
        out.print(t)
    elif r.score and r.score[0].perplexity is not None:
        t = Table("profile", "perplexity", "delta")
        deltas = {d.profile: d.perplexity_delta for d in r.diff.score or []}
        for s in r.score:
            delta = deltas.get(s.profile)
            t.add_row(s.profile, f"{s.perplexity.perplexity:.4g}" if s.perplexity and s.perplexity.perplexity else "-",
                      "" if delta is None else Text(f"{delta:+.4g}", style="bold red" if delta else ""))
        out.print(t)
    elif r.score:
        conts = [s.continuation for s in r.score[0].continuations or []]
        t = Table("continuation", *r.profiles, title=prompt)
        ref = r.score[0]
        for j, cont in enumerate(conts):
            cells: list[Any] = [repr(cont)]
            for s in r.score:
                lp = (s.continuations or [])[j].logprob
                mark = " *" if s.argmax == j else ""
                changed = s is not ref and (s.argmax != ref.argmax and (s.argmax == j or ref.argmax == j))
                differs = s is not ref and abs(lp - (ref.continuations or [])[j].logprob) > 0
                cells.append(Text(f"{lp:.4f}{mark}", style="bold red" if changed else ("yellow" if differs else "")))
            t.add_row(*cells)
        out.print(t)
        out.print("[dim]* argmax; red: argmax changed; yellow: log-prob differs from the reference[/]")
    out.print("[bold red]differs[/] from the reference" if r.diff.any_changed else "no difference")


# ---------------------------------------------------------------------------------------------- datasets


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


# ---------------------------------------------------------------------------------------------- jobs / sweep


def _row_cells(r: m.SweepRow) -> list[str]:
    v, lab = r.validation, r.labels
    notes = [x for x in (r.rejected, r.eliminated) if x]
    top = "-" if lab is None or lab.top_answer is None else f"{lab.top_answer} {_pct(lab.top_answer_share)}"
    return [r.key, r.role, _pct(v.accuracy) if v else "-",
            f"[{_pct(v.ci_low)}, {_pct(v.ci_high)}]" if v else "-",
            "-" if r.delta_accuracy is None else f"{100 * r.delta_accuracy:+.1f}",
            "-" if lab is None or lab.balanced_accuracy is None else _pct(lab.balanced_accuracy),
            top + (" [collapsed]" if r.collapsed else ""),
            "-" if v is None or v.log_loss is None else f"{v.log_loss:.4f}", "; ".join(notes)]


def print_job(job: m.Job) -> None:
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
                  f"{_pct(base_labels.majority_accuracy)}")
    if job.example_evaluations and job.full_grid_evaluations and job.example_evaluations < job.full_grid_evaluations:
        out.print(f"successive halving: {job.example_evaluations} example-evaluations instead of "
                  f"{job.full_grid_evaluations} ({job.full_grid_evaluations / job.example_evaluations:.1f}x fewer)")
    if job.test is not None:
        tr = job.test
        line = (f"test: base {_pct(tr.base.accuracy)} vs {tr.winner_key} {_pct(tr.winner.accuracy)} "
                f"(McNemar p={tr.mcnemar.p_value:.3g})")
        if tr.majority is not None:
            line += f"; always {tr.majority.label!r} {_pct(tr.majority.accuracy)} (p={tr.majority.mcnemar.p_value:.3g})"
        out.print(line)
    if job.verdict:
        out.print(f"[bold]{job.verdict}[/]")


class _Watch:
    """A rich progress bar fed by job progress events: done/total, server ETA, best so far."""

    def __init__(self, progress: Progress, job_id: str) -> None:
        self.progress = progress
        self.task = progress.add_task(f"sweep {job_id}", total=None, eta="?", best="-")

    def __call__(self, ev: m.JobProgress) -> None:
        best = "-"
        if ev.best is not None and ev.best.validation is not None:
            best = f"{ev.best.key} {_pct(ev.best.validation.accuracy)}"
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
        config["types"] = _csv(types)
    if layers:
        config["layers"] = "all" if layers.strip() == "all" else [int(x) for x in _csv(layers) or []]
    if rhos:
        config["rhos"] = [float(x) for x in _csv(rhos) or []]
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
    console().print(f"[green]promoted[/] {p.name}: " + "; ".join(_spec_text(s) for s in p.interventions))


# ---------------------------------------------------------------------------------------------- export


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
        t.add_row(f.name, _fmt_bytes(f.bytes))
    t.add_row(Text("total", style="bold"), Text(_fmt_bytes(report.bytes), style="bold"))
    out.print(t)
    if report.mode == "factored":
        out.print(f"edited matrices: {_fmt_bytes(report.dense_bytes)} dense -> {_fmt_bytes(report.factored_bytes)} "
                  f"stored, [bold green]{_fmt_bytes(report.saved_bytes)} saved[/]")
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
        t.add_row(e.name, e.profile or "", e.mode, _fmt_bytes(e.bytes), _fmt_bytes(e.saved_bytes))
    console().print(t)


if __name__ == "__main__":
    app()
