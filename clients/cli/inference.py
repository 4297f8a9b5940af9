"""``laser generate``, ``laser score``, ``laser ab``: inference per profile and side-by-side A/B."""

from __future__ import annotations

import sys
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from clients.cli.common import (
    JsonOpt,
    ProfileOpt,
    app,
    client,
    console,
    csv_list,
    emit_json,
    err_console,
)


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
    names = csv_list(profiles) or []
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
