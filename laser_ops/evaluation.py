"""The paper's metrics, computed only through the :class:`~laser_ops.scoring.Scorer` interface.

- classification accuracy: the candidate with the highest log-probability is the prediction;
- generation accuracy: greedy-decode N tokens; correct iff a lower-cased, stripped accepted answer
  occurs in the generated continuation (never in the prompt);
- top-k accuracy for single-token answers; mean gold log-loss (-log P(gold | prompt));
- perplexity (sliding window), used as an optional guard against edits that wreck the model.

Every report keeps per-example outcomes so two runs on the same examples can be compared with the
exact McNemar test; accuracies carry a 95% Wilson interval. Every report also carries
:class:`LabelMetrics`: the majority-class baseline of its examples, how concentrated the model's
answers are (``collapsed`` when one answer covers >= 95%), balanced accuracy and macro-F1, so a
result that only moved the model's label bias is visible as such.

:class:`~laser_ops.fast_choice.FastChoiceEvaluator` scores one fixed multiple-choice set under many
edit profiles much faster than the plain path, with the same predictions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field
from scipy.stats import binomtest

from laser_ops.datasets import Dataset, Example
from laser_ops.scoring import ChoicePrediction, GenerationRequest, Scorer

logger = logging.getLogger(__name__)

MetricName = Literal["classification_accuracy", "generation_accuracy", "top_k_accuracy"]


# ---------------------------------------------------------------------------------------------- reports


class ExampleOutcome(BaseModel):
    """What happened on one example (``id`` is the example's id in its source file)."""

    id: int
    correct: bool
    prediction: int | str | None = Field(None, description="MC: chosen index; generation: generated text.")
    gold_logprob: float | None = None


#: A config whose most frequent answer covers at least this share of examples is ``collapsed``.
COLLAPSE_SHARE = 0.95


class LabelMetrics(BaseModel):
    """What accuracy alone hides: the label bias of a split and of a model's answers.

    ``majority_accuracy`` is what always answering ``majority_label`` scores on the same examples
    (the constant predictor every result must beat); ``top_answer_share`` is how often the model
    gave its most frequent answer, and ``collapsed`` flags a model that (nearly) always answers
    the same thing. ``balanced_accuracy`` (mean recall per gold label) and ``macro_f1`` exist for
    multiple choice only.
    """

    majority_label: str | None = Field(None, description="The answer that is correct most often in this split.")
    majority_accuracy: float = Field(0.0, description="Accuracy of always answering majority_label.")
    top_answer: str | None = Field(None, description="The model's most frequent answer.")
    top_answer_share: float = Field(0.0, description="Share of examples given top_answer.")
    collapsed: bool = Field(False, description=f"top_answer_share >= {COLLAPSE_SHARE}: one answer for (nearly) all.")
    balanced_accuracy: float | None = Field(None, description="Mean per-label recall (multiple choice).")
    macro_f1: float | None = Field(None, description="Mean per-label F1 (multiple choice).")


class EvalReport(BaseModel):
    """Accuracy with its Wilson interval, mean gold log-loss, label metrics, and the per-example outcomes."""

    metric: MetricName
    n: int
    n_correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    log_loss: float | None = None
    perplexity: float | None = None
    skipped: int = Field(0, description="Examples the metric does not apply to (e.g. multi-token answers for top-k).")
    labels: LabelMetrics | None = None
    outcomes: list[ExampleOutcome] = Field(default_factory=list)

    @property
    def correct(self) -> list[bool]:
        return [o.correct for o in self.outcomes]

    def summary(self) -> dict[str, Any]:
        """The report without per-example outcomes (for tables and progress messages)."""
        return self.model_dump(exclude={"outcomes"})


def _report(metric: MetricName, outcomes: list[ExampleOutcome], skipped: int = 0,
            labels: LabelMetrics | None = None) -> EvalReport:
    n = len(outcomes)
    k = sum(o.correct for o in outcomes)
    lo, hi = wilson_interval(k, n)
    gold = [o.gold_logprob for o in outcomes if o.gold_logprob is not None]
    log_loss = -math.fsum(gold) / len(gold) if gold else None
    return EvalReport(metric=metric, n=n, n_correct=k, accuracy=k / n if n else 0.0, ci_low=lo, ci_high=hi,
                      log_loss=log_loss, skipped=skipped, labels=labels, outcomes=outcomes)


def report_from_predictions(dataset: Dataset, predictions: Sequence[ChoicePrediction]) -> EvalReport:
    """Classification report of multiple-choice predictions (one per example, in order)."""
    if len(predictions) != len(dataset.examples):
        raise ValueError(f"{len(predictions)} predictions for {len(dataset.examples)} examples")
    outcomes = [
        ExampleOutcome(id=ex.id, correct=p.index in ex.correct, prediction=p.index, gold_logprob=p.logprobs[ex.gold])
        for ex, p in zip(dataset.examples, predictions)
    ]
    return report_from_outcomes(dataset, outcomes)


def report_from_outcomes(dataset: Dataset, outcomes: list[ExampleOutcome]) -> EvalReport:
    """The report of per-example outcomes on ``dataset`` (one per example, in order), label metrics included."""
    metric: MetricName = "classification_accuracy" if dataset.kind == "multiple_choice" else "generation_accuracy"
    return _report(metric, outcomes,
                   labels=label_metrics(dataset, [o.prediction for o in outcomes], [o.correct for o in outcomes]))


# ---------------------------------------------------------------------------------------------- labels


def answer_text(example: Example, prediction: int | str | None) -> str:
    """The answer a prediction stands for: the chosen choice's text (MC) or the stripped generation."""
    if prediction is None:
        return ""
    if isinstance(prediction, int) and example.choices:
        return example.choices[prediction]
    return " ".join(str(prediction).split()).lower()


def _accepted(example: Example) -> set[str]:
    """Answers that are right for this example (MC: the correct choices' texts)."""
    if example.choices:
        return {example.choices[i] for i in example.correct}
    return {" ".join(t.split()).lower() for t in example.targets}


def constant_correct(dataset: Dataset, label: str) -> list[bool]:
    """Per-example correctness of the constant predictor that always answers ``label``."""
    if dataset.kind == "multiple_choice":
        return [label in _accepted(e) for e in dataset.examples]
    return [answer_in(label, e.targets) for e in dataset.examples]


def majority_label(dataset: Dataset) -> tuple[str | None, float]:
    """The answer right most often in ``dataset`` and the accuracy of always giving it (ties: first in order)."""
    counts: dict[str, int] = {}
    for e in dataset.examples:
        for label in sorted(_accepted(e)):
            counts[label] = counts.get(label, 0) + 1
    if not counts:
        return None, 0.0
    label = max(counts, key=lambda k: (counts[k], -list(counts).index(k)))
    return label, sum(constant_correct(dataset, label)) / len(dataset.examples)


def label_metrics(dataset: Dataset, predictions: Sequence[int | str | None], correct: Sequence[bool],
                  *, majority: tuple[str | None, float] | None = None) -> LabelMetrics:
    """Majority baseline, answer concentration, balanced accuracy and macro-F1 of one set of predictions."""
    examples = dataset.examples
    if len(predictions) != len(examples) or len(correct) != len(examples):
        raise ValueError(f"{len(predictions)} predictions / {len(correct)} outcomes for {len(examples)} examples")
    label, base_acc = majority if majority is not None else majority_label(dataset)
    answers = [answer_text(e, p) for e, p in zip(examples, predictions)]
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    top = max(counts, key=lambda k: (counts[k], -answers.index(k))) if counts else None
    share = counts[top] / len(answers) if top is not None else 0.0
    balanced = f1 = None
    if dataset.kind == "multiple_choice" and examples:
        golds = [e.choices[e.gold] for e in examples]
        recalls, f1s = [], []
        for g in dict.fromkeys(golds):
            mine = [i for i, x in enumerate(golds) if x == g]
            tp = sum(correct[i] for i in mine)
            recall = tp / len(mine)
            said = [i for i, a in enumerate(answers) if a == g]
            precision = sum(correct[i] for i in said) / len(said) if said else 0.0
            recalls.append(recall)
            f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        balanced, f1 = sum(recalls) / len(recalls), sum(f1s) / len(f1s)
    return LabelMetrics(majority_label=label, majority_accuracy=base_acc, top_answer=top, top_answer_share=share,
                        collapsed=len(answers) > 1 and share >= COLLAPSE_SHARE, balanced_accuracy=balanced,
                        macro_f1=f1)


# ---------------------------------------------------------------------------------------------- metrics


def evaluate_multiple_choice(scorer: Scorer, dataset: Dataset, *, normalize: bool = False) -> EvalReport:
    """Classification accuracy and gold log-loss via ``scorer.predict_choices`` (the reference path)."""
    _require_kind(dataset, "multiple_choice")
    return report_from_predictions(dataset, scorer.predict_choices(dataset.choice_items(), normalize=normalize))


def generation_prompt(dataset: Dataset, index: int) -> str:
    """The prompt to decode from: trailing spaces go, so BPE models generate ``" Paris"`` as one token."""
    return dataset.prompt(dataset.examples[index]).rstrip(" ")


def answer_in(generated: str, targets: Sequence[str]) -> bool:
    """Generation correctness: a lower-cased, stripped accepted answer occurs in the generated text."""
    text = generated.lower()
    return any(t.strip().lower() and t.strip().lower() in text for t in targets)


def evaluate_generation(
    scorer: Scorer,
    dataset: Dataset,
    *,
    max_new_tokens: int = 10,
    stop: Sequence[str] = (),
    with_log_loss: bool = True,
) -> EvalReport:
    """Generation accuracy: greedy ``max_new_tokens`` tokens; only the continuation is searched."""
    _require_kind(dataset, "generation")
    requests = [
        GenerationRequest(prompt=generation_prompt(dataset, i), max_new_tokens=max_new_tokens, temperature=0.0,
                          stop=list(stop))
        for i in range(len(dataset))
    ]
    results = scorer.generate(requests)
    gold: list[float | None] = [None] * len(dataset)
    if with_log_loss:
        scored = scorer.loglikelihood([(dataset.prompt(e), e.gold_text) for e in dataset.examples])
        gold = [r.logprob for r in scored]
    outcomes = [
        ExampleOutcome(id=ex.id, correct=answer_in(r.text, ex.targets), prediction=r.text, gold_logprob=g)
        for ex, r, g in zip(dataset.examples, results, gold)
    ]
    return report_from_outcomes(dataset, outcomes)


def evaluate_top_k(scorer: Scorer, dataset: Dataset, *, k: int = 10) -> EvalReport:
    """Top-k accuracy: the gold answer's single token is among the k most likely next tokens.

    Only examples whose gold answer (MC: the gold choice; generation: the first target) is exactly one
    token after the prompt count; the others are reported in ``skipped``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    seqs: list[list[int]] = []
    kept: list[int] = []
    for i, ex in enumerate(dataset.examples):
        ctx, cont = scorer.encode_pair(dataset.prompt(ex), ex.gold_text)
        if len(cont) == 1:
            seqs.append(ctx + cont)
            kept.append(i)
    scored = scorer.prompt_logprobs(seqs, top_n=k) if seqs else []
    outcomes = []
    for i, seq, s in zip(kept, seqs, scored):
        top = s.top_logprobs[-1] or {}
        outcomes.append(ExampleOutcome(id=dataset.examples[i].id, correct=seq[-1] in top,
                                       prediction=max(top, key=top.__getitem__) if top else None,
                                       gold_logprob=s.token_logprobs[-1]))
    return _report("top_k_accuracy", outcomes, skipped=len(dataset) - len(kept))


def evaluate(scorer: Scorer, dataset: Dataset, *, max_new_tokens: int = 10, normalize: bool = False) -> EvalReport:
    """The paper's metric for the dataset's kind (classification or generation accuracy)."""
    if dataset.kind == "multiple_choice":
        return evaluate_multiple_choice(scorer, dataset, normalize=normalize)
    return evaluate_generation(scorer, dataset, max_new_tokens=max_new_tokens)


def perplexity(scorer: Scorer, texts: Sequence[str], *, max_length: int | None = None,
               stride: int | None = None) -> float:
    """Corpus perplexity exp(-sum log p / tokens) over sliding windows (NaN for no tokens)."""
    results = scorer.loglikelihood_rolling(list(texts), max_length=max_length, stride=stride)
    n = sum(r.n_tokens for r in results)
    return math.exp(-math.fsum(r.logprob for r in results) / n) if n else math.nan


def _require_kind(dataset: Dataset, kind: str) -> None:
    if dataset.kind != kind:
        raise ValueError(f"dataset {dataset.name!r} is {dataset.kind}, this metric needs {kind}")


# ---------------------------------------------------------------------------------------------- statistics


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (scipy's ``binomtest(...).proportion_ci``); (0, 1) when there
    is no data.

    Preferred over the normal interval because it stays inside [0, 1] and behaves near 0 and 1.
    """
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test of B against A on the same examples."""

    only_a: int  # A right, B wrong
    only_b: int  # A wrong, B right
    p_value: float
    alpha: float
    verdict: str

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha

    def to_dict(self) -> dict[str, Any]:
        return {"only_a": self.only_a, "only_b": self.only_b, "p_value": self.p_value, "alpha": self.alpha,
                "significant": self.significant, "verdict": self.verdict}


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool], *, alpha: float = 0.05,
                  names: tuple[str, str] = ("base", "edited")) -> McNemarResult:
    """Two-sided exact McNemar: a binomial test (p = 1/2) on the discordant pairs only.

    Agreements carry no information about which model is better, so only the examples exactly one
    of the two gets right count.
    """
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired outcomes differ in length: {len(a_correct)} vs {len(b_correct)}")
    only_a = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    only_b = sum(1 for a, b in zip(a_correct, b_correct) if b and not a)
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(binomtest(only_b, discordant, 0.5, alternative="two-sided").pvalue)
    a_name, b_name = names
    if discordant == 0:
        verdict = f"no discordant examples: {a_name} and {b_name} are right on exactly the same examples"
    elif p < alpha:
        better = b_name if only_b > only_a else a_name
        verdict = (f"significant at {alpha:g}: {better} is better ({b_name} fixes {only_b}, breaks {only_a}; "
                   f"p={p:.3g})")
    else:
        verdict = f"not significant at {alpha:g} ({b_name} fixes {only_b}, breaks {only_a}; p={p:.3g})"
    return McNemarResult(only_a, only_b, p, alpha, verdict)


def mcnemar_worse_p(challenger: Sequence[bool], leader: Sequence[bool]) -> float:
    """One-sided exact McNemar p-value of "the challenger is no less accurate than the leader".

    On the same examples, only the discordant ones count: under the null each is the leader's with
    probability at most 1/2, so the p-value is ``P(X >= c)`` for ``X ~ Bin(b + c, 1/2)``, where the
    leader alone is right on ``c`` examples and the challenger alone on ``b``. Small: the challenger is
    surely worse. Pairing is what makes it sharp: two configs that agree on most examples are told
    apart by the few where they differ, where unpaired intervals would overlap for hundreds of examples.
    """
    if len(challenger) != len(leader):
        raise ValueError(f"paired outcomes differ in length: {len(challenger)} vs {len(leader)}")
    only_leader = sum(1 for c, w in zip(challenger, leader) if w and not c)
    only_challenger = sum(1 for c, w in zip(challenger, leader) if c and not w)
    if only_leader == 0:
        return 1.0
    return float(binomtest(only_leader, only_leader + only_challenger, 0.5, alternative="greater").pvalue)


def mcnemar_vs_constant(dataset: Dataset, correct: Sequence[bool], label: str, *, alpha: float = 0.05,
                        name: str = "winner") -> McNemarResult:
    """Exact McNemar of a model's outcomes against always answering ``label`` on the same examples."""
    return mcnemar_exact(constant_correct(dataset, label), correct, alpha=alpha,
                         names=(f"always-{label!r}", name))
