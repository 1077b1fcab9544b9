"""Weak-to-strong supervision: how much of a strong model's ability survives a weak supervisor's labels.

Burns et al. 2023 ("Weak-to-Strong Generalization: Eliciting Strong
Capabilities With Weak Supervision", arXiv 2312.09390):

1. a weak model is trained on gold labels;
2. it labels a held-out pool (its soft predictions);
3. a strong model is trained on those weak labels (optionally with the
   auxiliary confidence loss, `objectives.binary_classification(confidence_coef=...)`);
4. the strong model trained on the pool's gold labels is the ceiling.

The performance gap recovered is
``PGR = (strong_on_weak - weak) / (strong_on_gold - weak)``: 0 when the
student only imitates its supervisor, 1 when it is as good as with gold labels.

Dimension legend (docs/dimensions.md): N examples, F features.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jaxtyping import Float

from ouroboros_jax.oversight.classifier import accuracy, init_mlp, predict_proba, train_classifier


def performance_gap_recovered(weak: float, strong_on_weak: float, strong_on_gold: float) -> float:
    """``(strong_on_weak - weak) / (strong_on_gold - weak)``; NaN when the gap is (numerically) zero."""
    gap = strong_on_gold - weak
    return (strong_on_weak - weak) / gap if abs(gap) > 1e-12 else math.nan


@dataclasses.dataclass(frozen=True)
class Split:
    """Features [N, F] and 0/1 gold labels [N]."""

    features: Float[np.ndarray, "N F"]
    labels: Float[np.ndarray, " N"]

    def __post_init__(self) -> None:
        f, y = np.asarray(self.features), np.asarray(self.labels)
        if f.ndim != 2 or y.shape != (f.shape[0],):
            raise ValueError(f"Split: features {f.shape} and labels {y.shape} do not match ([N, F] and [N])")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model size and its training: MLP hidden widths, optimizer steps, batch size, learning rate."""

    hidden: Sequence[int]
    steps: int = 500
    batch_size: int = 128
    learning_rate: float = 3e-3


@dataclasses.dataclass(frozen=True)
class WeakToStrongResult:
    """Test accuracies of the weak supervisor and the strong students, and the PGRs."""

    weak: float
    strong_gold: float
    strong_on_weak: float
    strong_on_weak_confidence: float

    @property
    def pgr(self) -> float:
        return performance_gap_recovered(self.weak, self.strong_on_weak, self.strong_gold)

    @property
    def pgr_confidence(self) -> float:
        return performance_gap_recovered(self.weak, self.strong_on_weak_confidence, self.strong_gold)


def _train(spec: ModelSpec, features: np.ndarray, targets: np.ndarray, seed: int, *,
           confidence_coef: float = 0.0):
    params = init_mlp(jax.random.key(seed), features.shape[1], tuple(spec.hidden))
    result = train_classifier(params, features, targets, steps=spec.steps, batch_size=spec.batch_size,
                              learning_rate=spec.learning_rate, confidence_coef=confidence_coef, seed=seed)
    return result.params


def weak_to_strong(gold: Split, pool: Split, test: Split, weak: ModelSpec, strong: ModelSpec, *,
                   confidence_coef: float = 0.5, seed: int = 0,
                   strong_view: Callable[[np.ndarray], np.ndarray] | None = None) -> WeakToStrongResult:
    """One weak-to-strong run.

    Args:
      gold: the weak model's gold-labelled training set.
      pool: the held-out pool the weak model labels (its gold labels train only the ceiling).
      test: where every model is evaluated.
      weak, strong: the two model sizes.
      confidence_coef: the confidence loss weight of the second strong student.
      seed: initialisation and data order.
      strong_view: what the strong model reads of the features (e.g. a pretrained
        representation of them, as the strong model's "latent knowledge"); default: the features.

    Returns:
      Test accuracies: weak, strong on gold, strong on weak labels (plain CE and with the confidence loss).
    """
    weak_params = _train(weak, gold.features, gold.labels, seed)
    weak_labels = predict_proba(weak_params, pool.features)  # soft labels, as in the paper
    view = strong_view or (lambda x: x)
    strong_pool, strong_test = np.asarray(view(pool.features)), np.asarray(view(test.features))
    score = lambda params, features: accuracy(predict_proba(params, features), test.labels)
    return WeakToStrongResult(
        weak=score(weak_params, test.features),
        strong_gold=score(_train(strong, strong_pool, pool.labels, seed + 1), strong_test),
        strong_on_weak=score(_train(strong, strong_pool, weak_labels, seed + 1), strong_test),
        strong_on_weak_confidence=score(_train(strong, strong_pool, weak_labels, seed + 1,
                                               confidence_coef=confidence_coef), strong_test),
    )
