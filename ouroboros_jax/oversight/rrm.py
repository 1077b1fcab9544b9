"""Recursive reward modeling: a chain of reward models, each labelling the next level's training data.

Leike et al. 2018 ("Scalable agent alignment via reward modeling",
arXiv 1811.07871): people can judge small tasks; a reward model trained on
their judgements helps evaluate bigger tasks, whose reward model helps with
bigger ones still. Here a task of level k + 1 splits into parts of level k:

- level 0 is trained on gold (human) labels of the smallest tasks;
- level k + 1's training labels come from an evaluator that sees a task only
  through level k's assessments of its parts (`compose_verdicts`: the whole is
  right when every part is judged right), never the whole directly;
- each level has a fixed anchor set with gold labels, never trained on: its
  accuracy there is reported (`anchor_accuracy`).

Errors compound: a wrong level-k verdict on one part becomes a wrong label of
level k + 1. With checks on, two things stop labels from being trained on
(they are *deferred*: left out, or sent to the human queue, `rating_queue`):

- level checks (`check_level`): a level whose anchor accuracy is below
  `anchor_threshold`, or whose own verdicts disagree with the level below's
  composed verdicts on more than `consistency_tolerance` of the cases both can
  judge (the anchor tasks of that level, read without their gold labels), is
  flagged; every label it would give is deferred;
- per-label consistency (`label_agreement`): a label of level k + 1 made from
  level k's verdicts on the halves is kept only if level k - 1's verdicts on
  the quarters give the same label.

Dimension legend (docs/dimensions.md): N tasks, P parts of a task, F features.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jaxtyping import Bool, Float

# A reward model: features [N, F] -> P(the task is done right) [N].
Judge = Callable[[np.ndarray], np.ndarray]
# Trains a level's reward model: (features [N, F], 0/1 labels [N], level) -> Judge.
Fit = Callable[[np.ndarray, np.ndarray, int], Judge]


@dataclasses.dataclass(frozen=True)
class LevelChecks:
    """When a level is trusted to label the next one.

    Attributes:
      anchor_threshold: lowest anchor accuracy a level may have.
      consistency_tolerance: highest fraction of shared cases on which a level
        may disagree with the level below.
    """

    anchor_threshold: float = 0.8
    consistency_tolerance: float = 0.15

    def __post_init__(self) -> None:
        if not 0.0 <= self.anchor_threshold <= 1.0:
            raise ValueError(f"LevelChecks.anchor_threshold must be in [0, 1] (got {self.anchor_threshold})")
        if not 0.0 <= self.consistency_tolerance <= 1.0:
            raise ValueError("LevelChecks.consistency_tolerance must be in [0, 1] "
                             f"(got {self.consistency_tolerance})")


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """How tasks of a level are shown to a reward model and split into parts.

    Attributes:
      featurize: `(tasks, level) -> features [N, F]` of tasks of that level.
      split: `(tasks, level) -> [parts of level - 1]`, each an array of N tasks
        (part p of every task), for level >= 1.
    """

    featurize: Callable[[Any, int], np.ndarray]
    split: Callable[[Any, int], Sequence[Any]]


@dataclasses.dataclass(frozen=True)
class LevelData:
    """One level's tasks: `train` (gold labels used at level 0 only) and the gold-labelled `anchor` set."""

    train: Any
    anchor: Any
    anchor_gold: Bool[np.ndarray, " N"]
    train_gold: Bool[np.ndarray, " N"] | None = None


@dataclasses.dataclass
class LevelReport:
    """What happened at one level.

    Attributes:
      level: k.
      anchor_accuracy: the level's reward model on its anchor set (NaN when it could not be trained).
      label_accuracy: its training labels against gold (level 0: 1.0), NaN when it has none.
      labels: training labels it was given (after deferral).
      deferred: fraction of its candidate labels deferred.
      disagreement: its verdicts vs the composed verdicts of the level below, on its anchor tasks.
      flagged: whether the level failed a check (its labels for the next level are deferred).
      reasons: why it was flagged.
    """

    level: int
    anchor_accuracy: float
    label_accuracy: float
    labels: int
    deferred: float
    disagreement: float
    flagged: bool
    reasons: list[str]


def anchor_accuracy(probs: Float[np.ndarray, " N"], gold: Bool[np.ndarray, " N"]) -> float:
    """Fraction of anchor tasks where the verdict (p > 0.5) equals the gold label."""
    probs, gold = np.asarray(probs, np.float64), np.asarray(gold, bool)
    if probs.shape != gold.shape or probs.ndim != 1:
        raise ValueError(f"anchor_accuracy: {probs.shape} verdicts for {gold.shape} gold labels")
    return float(np.mean((probs > 0.5) == gold)) if gold.size else math.nan


def compose_verdicts(part_probs_NP: Float[np.ndarray, "N P"]) -> Bool[np.ndarray, " N"]:
    """The evaluator's label of each task from the verdicts on its parts: right iff every part is."""
    part_probs_NP = np.asarray(part_probs_NP, np.float64)
    if part_probs_NP.ndim != 2 or part_probs_NP.shape[1] == 0:
        raise ValueError(f"compose_verdicts: expected part verdicts [N, P>0], got {part_probs_NP.shape}")
    return np.all(part_probs_NP > 0.5, axis=1)


def disagreement(a: Bool[np.ndarray, " N"], b: Bool[np.ndarray, " N"]) -> float:
    """Fraction of cases where two verdicts differ (NaN on no cases)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"disagreement: verdicts of shapes {a.shape} and {b.shape}")
    return float(np.mean(a != b)) if a.size else math.nan


def check_level(accuracy: float, disagree: float, checks: LevelChecks) -> list[str]:
    """Reasons to flag a level (empty: trusted). NaN disagreement (level 0: no level below) passes."""
    reasons = []
    if not accuracy >= checks.anchor_threshold:
        reasons.append(f"anchor accuracy {accuracy:.3f} < {checks.anchor_threshold}")
    if disagree > checks.consistency_tolerance:
        reasons.append(f"disagrees with the level below on {disagree:.3f} > {checks.consistency_tolerance}")
    return reasons


def label_agreement(first: Bool[np.ndarray, " N"],
                    second: Bool[np.ndarray, " N"] | None) -> Bool[np.ndarray, " N"]:
    """Which labels survive the per-label check: both evaluators agree (all, without a second opinion)."""
    first = np.asarray(first, bool)
    return np.ones_like(first) if second is None else first == np.asarray(second, bool)


def judge_through_parts(tasks: Any, level: int, below: int, judges: Sequence[Judge],
                        decomposition: Decomposition) -> Bool[np.ndarray, " N"]:
    """Label level-`level` tasks by splitting them down to level `below` and composing its verdicts."""
    parts = [tasks]
    for k in range(level, below, -1):
        parts = [p for whole in parts for p in decomposition.split(whole, k)]
    probs = np.stack([judges[below](decomposition.featurize(p, below)) for p in parts], axis=1)
    return compose_verdicts(probs)


def rating_queue(store: Any, describe: Callable[[Any, int], Sequence[str]]) -> Callable[[Any, int], int]:
    """A deferral sink that puts deferred tasks on a `rate.RatingStore` as pointwise items (score 0 or 1).

    `describe(tasks, level)` gives one text per task. Returns `defer(tasks, level) -> items enqueued`.
    """
    from ouroboros_jax.rate import NewItem

    def defer(tasks: Any, level: int) -> int:
        texts = list(describe(tasks, level))
        items = [NewItem(prompt=f"Level {level} task: is every step right? (1 = right, 0 = wrong)",
                         completions=[text], mode="pointwise", score_range=(0, 1),
                         metadata={"oversight": "rrm", "level": level}) for text in texts]
        return len(store.enqueue_many(items))

    return defer


def _take(tasks: Any, rows: np.ndarray) -> Any:
    return tasks[rows] if isinstance(tasks, np.ndarray) else [tasks[i] for i in rows]


def recursive_reward_modeling(
    levels: Sequence[LevelData], decomposition: Decomposition, fit: Fit, *,
    checks: LevelChecks | None = LevelChecks(), defer: Callable[[Any, int], Any] | None = None,
    gold_of: Callable[[Any, int], np.ndarray] | None = None,
) -> list[LevelReport]:
    """Train the chain of reward models, level 0 on gold, level k + 1 on labels composed from level k.

    Args:
      levels: the tasks of each level (level 0's `train_gold` is required).
      decomposition: how tasks are featurised and split into parts.
      fit: trains one level's reward model.
      checks: the level and per-label checks; None trains on every label (the unchecked chain).
      defer: called with the deferred tasks of a level, e.g. `rating_queue(store, describe)`;
        None leaves them out.
      gold_of: `(tasks, level) -> gold labels`, only to report the accuracy of the training labels.

    Returns:
      One `LevelReport` per level. A level left with no labels is not trained
      (NaN accuracy), and neither is any level above it.
    """
    if not levels:
        raise ValueError("recursive_reward_modeling: levels is empty")
    if levels[0].train_gold is None:
        raise ValueError("recursive_reward_modeling: level 0 needs train_gold (its gold labels)")
    judges: list[Judge] = []
    reports: list[LevelReport] = []
    for k, data in enumerate(levels):
        labels, keep = _candidate_labels(k, data, judges, reports, decomposition, checks)
        deferred = float(1.0 - keep.mean()) if keep.size else 0.0
        if defer is not None and not keep.all():
            defer(_take(data.train, np.flatnonzero(~keep)), k)
        rows = np.flatnonzero(keep)
        if rows.size == 0:
            reports.append(LevelReport(k, math.nan, math.nan, 0, deferred, math.nan, True,
                                       ["no labels to train on"]))
            break
        tasks, labels = _take(data.train, rows), labels[rows]
        label_acc = 1.0 if k == 0 else math.nan
        if k > 0 and gold_of is not None:
            label_acc = float(np.mean(labels == np.asarray(gold_of(tasks, k), bool)))
        judges.append(fit(decomposition.featurize(tasks, k), labels.astype(np.float32), k))
        verdicts = judges[k](decomposition.featurize(data.anchor, k))
        accuracy = anchor_accuracy(verdicts, data.anchor_gold)
        disagree = math.nan if k == 0 else disagreement(
            verdicts > 0.5, judge_through_parts(data.anchor, k, k - 1, judges, decomposition))
        reasons = [] if checks is None else check_level(accuracy, disagree, checks)
        reports.append(LevelReport(k, accuracy, label_acc, int(rows.size), deferred, disagree, bool(reasons),
                                   reasons))
    untrained = ["a level below was not trained"]
    reports += [LevelReport(k, math.nan, math.nan, 0, math.nan, math.nan, True, untrained)
                for k in range(len(reports), len(levels))]
    return reports


def _candidate_labels(k: int, data: LevelData, judges: Sequence[Judge], reports: Sequence[LevelReport],
                      decomposition: Decomposition,
                      checks: LevelChecks | None) -> tuple[np.ndarray, np.ndarray]:
    """Level k's candidate labels (gold at level 0, else composed from level k - 1); which pass the checks."""
    if k == 0:
        labels = np.asarray(data.train_gold, bool)
        return labels, np.ones_like(labels)
    labels = judge_through_parts(data.train, k, k - 1, judges, decomposition)
    if checks is None:
        return labels, np.ones_like(labels)
    if reports[k - 1].flagged:
        return labels, np.zeros_like(labels)
    second = judge_through_parts(data.train, k, k - 2, judges, decomposition) if k >= 2 else None
    return labels, label_agreement(labels, second)
