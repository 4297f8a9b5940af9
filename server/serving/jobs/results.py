"""What a finished (or cancelled) job offers: per-example evidence of a config against base, the change heatmap,
and promotion of the winner to a profile."""

from __future__ import annotations

import asyncio
from typing import Any

from laser_ops.datasets import Dataset
from laser_ops.interventions import InterventionError, parse_profile
from laser_ops.plots import change_heatmap_png
from laser_ops.sweep_steps import plan_split
from server.errors import ApiError
from laser_protocol.jobs import (
    ExampleEvidence,
    ExampleFilter,
    ExamplePage,
    ExampleSplit,
    PromoteRequest,
)
from laser_protocol.profiles import ProfilePublic
from server.serving import profiles as profiles_serving
from server.state import Services
from server.store import RESERVED_PROFILES
from server.serving.jobs.manager import job_config
from server.serving.jobs.service import get_record, manager

def _shown(example: Any, prediction: int | str | None) -> str:
    if isinstance(prediction, int) and example.choices:
        return example.choices[prediction]
    return "" if prediction is None else str(prediction)


async def examples(services: Services, job_id: str, config: str, split: ExampleSplit, which: ExampleFilter,
                   offset: int, limit: int) -> ExamplePage:
    """Per-example evidence of ``config`` against base: what it fixed and what it broke, with prompts."""
    m = manager(services)
    job = await get_record(services, job_id)
    rows = {r.key: r for r in await services.db.run(m.store.rows, job_id)}
    try:
        dataset: Dataset = await services.db.run(m.datasets.get, job.dataset)
    except KeyError:
        raise ApiError(409, f"dataset {job.dataset!r} of job {job_id} no longer exists; its examples cannot be "
                            "shown", ("path", "job_id")) from None
    parts = plan_split(job_config(job), dataset)
    if split == "validation":
        base, row = rows.get("base"), rows.get(config)
        if row is None or row.role not in ("base", "config") or row.val_correct is None:
            known = [k for k, r in rows.items() if r.role in ("base", "config")]
            raise ApiError(404, f"job {job_id} has no validation evidence for config {config!r}; known: "
                                f"{known[:20]}{' ...' if len(known) > 20 else ''}", ("query", "config"))
        if base is None or base.val_correct is None:
            raise ApiError(409, f"job {job_id} has no base row yet", ("path", "job_id"))
        data = parts.validation
        positions = row.val_indices if row.val_indices is not None else list(range(len(row.val_correct)))
        base_out = [(base.val_predictions[i], base.val_correct[i],  # type: ignore[index]
                     base.val_gold_logprobs[i] if base.val_gold_logprobs else None) for i in positions]
        mine = [(p, c, g) for p, c, g in zip(row.val_predictions or [], row.val_correct,
                                              row.val_gold_logprobs or [None] * len(row.val_correct))]
    else:
        t = rows["test"].test if "test" in rows else None
        if t is None:
            raise ApiError(409, f"job {job_id} has no test report yet (state {job.state})", ("path", "job_id"))
        if config not in (t.winner_key, "base"):
            raise ApiError(404, f"test evidence exists for 'base' and the winner {t.winner_key!r}, not {config!r}",
                           ("query", "config"))
        data = parts.test
        positions = list(range(len(t.base.outcomes)))
        base_out = [(o.prediction, o.correct, o.gold_logprob) for o in t.base.outcomes]
        chosen = t.base if config == "base" else t.winner
        mine = [(o.prediction, o.correct, o.gold_logprob) for o in chosen.outcomes]
    entries = []
    counts = {"fixed": 0, "broken": 0, "both_right": 0, "both_wrong": 0}
    for pos, (bp, bc, bg), (cp, cc, cg) in zip(positions, base_out, mine):
        change = "fixed" if cc and not bc else "broken" if bc and not cc else "both_right" if cc else "both_wrong"
        counts[change] += 1
        keep = {"flips": change in ("fixed", "broken"), "fixed": change == "fixed", "broken": change == "broken",
                "disagree": bp != cp, "all": True}[which]
        if keep:
            entries.append((pos, bp, bc, bg, cp, cc, cg, change))
    page = []
    for pos, bp, bc, bg, cp, cc, cg, change in entries[offset:offset + limit]:
        ex = data.examples[pos]
        page.append(ExampleEvidence(index=pos, id=ex.id, prompt=data.prompt(ex), choices=list(ex.choices),
                                    gold=ex.gold_text, base_answer=_shown(ex, bp), config_answer=_shown(ex, cp),
                                    base_correct=bc, config_correct=cc, base_gold_logprob=bg, config_gold_logprob=cg,
                                    change=change))  # type: ignore[arg-type]
    return ExamplePage(job_id=job_id, config=config, split=split, filter=which, counts=counts, total=len(entries),
                       offset=offset, limit=limit, data=page)


async def plot_png(services: Services, job_id: str) -> bytes:
    m = manager(services)
    job = await get_record(services, job_id)
    rows = await services.db.run(m.store.rows, job_id)
    base = next((r for r in rows if r.key == "base"), None)
    if base is None or base.val_accuracy is None or not any(r.role == "config" for r in rows):
        raise ApiError(409, f"job {job_id} has no finished configs to plot yet (state {job.state})")
    n = job.n_validation
    title = f"{job.dataset}: validation accuracy change vs base ({job.id}, {n} validation examples)"
    try:
        return await asyncio.to_thread(change_heatmap_png, rows, base.val_accuracy, title=title,
                                       best_key=job.best_key)
    except ValueError as e:
        raise ApiError(409, f"nothing to plot: {e}") from None


async def promote(services: Services, job_id: str, body: PromoteRequest) -> ProfilePublic:
    """The job's best config becomes a profile (servable at once). 409: no winner, or the name is taken."""
    public, specs = await services.db.run(_promote, services, job_id, body)
    services.decomposer.prepare_profile(body.name, specs)  # on the event loop: it schedules background work
    return public


def _promote(services: Services, job_id: str, body: PromoteRequest) -> tuple[ProfilePublic, list[Any]]:
    m = manager(services)
    found = m.store.get_with_rows(job_id)
    if found is None:
        raise ApiError(404, f"unknown job {job_id!r}", ("path", "job_id"))
    job, job_rows = found
    if job.state not in ("succeeded", "cancelled"):
        raise ApiError(409, f"job {job_id} is {job.state}; promote it once it has succeeded (or was cancelled)",
                       ("path", "job_id"))
    rows = {r.key: r for r in job_rows}
    best = rows.get(job.best_key) if job.best_key else None
    if best is None or not best.interventions:
        raise ApiError(409, f"job {job_id} has no winning config to promote", ("path", "job_id"))
    if body.name in RESERVED_PROFILES:
        raise ApiError(409, f"profile {body.name!r} is reserved (the unedited model)", ("body", "name"))
    if services.profiles.get(body.name) is not None and not body.replace:
        raise ApiError(409, f"profile {body.name!r} already exists; send replace: true to overwrite it",
                       ("body", "name"))
    try:
        specs = parse_profile(best.interventions)
    except (InterventionError, ValueError) as e:
        raise ApiError(422, f"the winner's interventions are invalid: {e}", ("path", "job_id")) from None
    profiles_serving.plan(services, specs)
    base = rows.get("base")

    def pct(row: Any) -> str:
        return "n/a" if row is None or row.val_accuracy is None else f"{row.val_accuracy:.4f}"

    description = body.description or (
        f"promoted from sweep {job_id} on {job.dataset}: {best.key}, validation accuracy "
        f"{pct(best)} (base {pct(base)})")
    services.profiles.put(body.name, specs, description)
    return profiles_serving.get_profile(services, body.name), specs
