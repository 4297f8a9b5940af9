"""Presenters: stored job records and sweep rows as the protocol's models (pure functions, no I/O).

What is live (the running job's progress and clock) is passed in by the manager, so a view never reads state
it does not own.
"""

from __future__ import annotations

from typing import Any

from laser_ops.evaluation import EvalReport, LabelMetrics, wilson_interval
from laser_ops.sweep_steps import evaluations_of
from laser_ops.sweeps import SweepProgress, SweepRow
from laser_protocol.jobs import (
    Accuracy,
    JobProgress,
    JobPublic,
    JobSummary,
    LabelMetricsPublic,
    MajorityBaseline,
    McNemar,
    SweepRowPublic,
    TestReportPublic,
)
from server.store.jobs import JobRecord


def _accuracy(report: EvalReport) -> Accuracy:
    return Accuracy(accuracy=report.accuracy, ci_low=report.ci_low, ci_high=report.ci_high,
                    n_correct=report.n_correct, n=report.n, log_loss=report.log_loss)


def _labels(labels: LabelMetrics | None) -> LabelMetricsPublic | None:
    return LabelMetricsPublic(**labels.model_dump()) if labels is not None else None


def row_public(r: SweepRow, n_validation: int | None = None) -> SweepRowPublic:
    val = None
    if r.val_accuracy is not None:
        if r.val_n is not None:
            n, k = r.val_n, r.val_n_correct or 0
        elif r.val_correct:
            n, k = len(r.val_correct), sum(r.val_correct)
        else:
            n = n_validation or 0
            k = round(r.val_accuracy * n)
        lo, hi = wilson_interval(k, n)
        val = Accuracy(accuracy=r.val_accuracy, ci_low=lo, ci_high=hi, n_correct=k, n=n, log_loss=r.val_log_loss)
    return SweepRowPublic(key=r.key, step=r.step, role=r.role, type=r.type, layer=r.layer, rho=r.rho,
                          interventions=r.interventions, validation=val, labels=_labels(r.val_labels),
                          collapsed=r.collapsed, delta_accuracy=r.delta_accuracy, delta_log_loss=r.delta_log_loss,
                          val_perplexity=r.val_perplexity, rejected=r.rejected, eliminated=r.eliminated,
                          kept=r.kept, seconds=r.seconds)


def _mcnemar(m: dict[str, Any]) -> McNemar:
    return McNemar(only_base=m["only_a"], only_winner=m["only_b"], p_value=float(m["p_value"]), alpha=m["alpha"],
                   significant=bool(m["significant"]))


def test_public(row: SweepRow) -> TestReportPublic | None:
    t = row.test
    if t is None:
        return None
    m = _mcnemar(t.mcnemar)
    majority = None
    if t.majority_label is not None and t.majority_accuracy is not None and t.mcnemar_majority is not None:
        mm = _mcnemar(t.mcnemar_majority)
        majority = MajorityBaseline(label=t.majority_label, accuracy=t.majority_accuracy, mcnemar=mm,
                                    beaten=mm.significant and t.winner.accuracy > t.majority_accuracy)
    verdict = t.verdict or (f"winner {t.delta_accuracy * 100:+.1f} points vs base on test; "
                            f"{t.mcnemar.get('verdict', '')}")  # rows stored before verdicts existed
    return TestReportPublic(
        winner_key=t.winner_key, interventions=t.interventions, base=_accuracy(t.base), winner=_accuracy(t.winner),
        base_labels=_labels(t.base.labels), winner_labels=_labels(t.winner.labels), delta_accuracy=t.delta_accuracy,
        mcnemar=m, majority=majority, significant=m.significant and t.delta_accuracy > 0, verdict=verdict)


def job_summary(job: JobRecord, done: int | None = None, total: int | None = None) -> JobSummary:
    return JobSummary(id=job.id, state=job.state, dataset=job.dataset,  # type: ignore[arg-type]
                      done=job.done if done is None else done, total=job.total if total is None else total,
                      created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                      error=job.error, owner=job.owner, heartbeat_at=job.heartbeat)


def job_public(job: JobRecord, rows: list[SweepRow], *, progress: SweepProgress | None,
               elapsed_s: float | None) -> JobPublic:
    """The full view; ``progress`` and ``elapsed_s`` are the live figures when this server runs the job."""
    by_key = {r.key: r for r in rows}
    n_val = job.n_validation
    base = by_key.get("base")
    best = by_key.get(job.best_key) if job.best_key else None
    test_row = by_key.get("test")
    test = test_public(test_row) if test_row is not None else None
    beats = None
    if base is not None and best is not None:
        beats = (best.val_accuracy or 0.0) > (base.val_accuracy or 0.0)
    done = len(rows)  # what is stored (live progress may be ahead of the store)
    total = progress.total if progress is not None else job.total
    verdict = test.verdict if test is not None else None
    if job.state == "cancelled" and verdict is None:
        verdict = f"cancelled after {done} of {total} steps; the best config so far is promotable"
    return JobPublic(
        **job_summary(job, done, total).model_dump(), config=job.config, model_id=job.model_id,
        model_fingerprint=job.model_fingerprint, progress=(done / total) if total else None,
        elapsed_s=elapsed_s if elapsed_s is not None else job.elapsed_s,
        eta_s=progress.eta_s if progress is not None else None,
        stopped=job.stopped, n_validation=n_val, n_test=job.n_test,
        base=row_public(base, n_val) if base is not None else None,
        best=row_public(best, n_val) if best is not None else None, beats_base_on_validation=beats,
        rows=[row_public(r, n_val) for r in rows], test=test, verdict=verdict,
        example_evaluations=evaluations_of(rows) if n_val else None,
        full_grid_evaluations=sum(r.role == "config" for r in rows) * n_val if n_val else None)


def job_progress(job: JobRecord, kind: str, *, progress: SweepProgress | None, elapsed_s: float | None,
                 best: SweepRow | None) -> JobProgress:
    """A ``progress`` or ``state`` event from the stored job (and the live progress when run here)."""
    n_val = job.n_validation
    done = progress.done if progress is not None else job.done
    total = progress.total if progress is not None else job.total
    return JobProgress(type=kind, id=job.id, state=job.state, done=done, total=total,  # type: ignore[arg-type]
                       progress=(done / total) if total else None,
                       elapsed_s=elapsed_s if elapsed_s is not None else job.elapsed_s,
                       eta_s=progress.eta_s if progress is not None else None,
                       best=row_public(best, n_val) if best is not None else None, error=job.error)


def running_progress(job: JobRecord, p: SweepProgress, elapsed_s: float) -> JobProgress:
    """The ``progress`` event of a step this server just finished."""
    n_val = job.n_validation
    return JobProgress(id=job.id, state="running", done=p.done, total=p.total,
                       progress=p.done / p.total if p.total else None, elapsed_s=elapsed_s,
                       eta_s=p.eta_s, best=row_public(p.best, n_val) if p.best else None,
                       last=row_public(p.last, n_val) if p.last else None)
