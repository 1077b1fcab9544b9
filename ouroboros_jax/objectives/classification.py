"""A binary classifier's objective on soft labels, with the weak-to-strong confidence loss as an option.

The batch is a `LabelBatch` (features, target probabilities, a row mask and a
per-row scale of the confidence term, e.g. a warm-up); the model is any pure
`apply(params, features) -> logits [B]`. The loss is
`algorithms.classification.confidence_loss`, averaged over the full batch's
real rows, so micro-batches add up exactly.

Dimension legend (docs/dimensions.md): B rows, F features.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from ouroboros_jax.algorithms.classification import confidence_loss
from ouroboros_jax.objectives.base import Metrics, Objective, combine_metrics


@flax.struct.dataclass
class LabelBatch:
    """Examples with target probabilities.

    Attributes:
      features: [B, F] inputs.
      targets: [B] target probabilities in [0, 1] (gold labels or a supervisor's soft labels).
      mask: [B] real rows (padding rows are False).
      confidence_scale: [B] multiplies the objective's `confidence_coef` (a warm-up schedule; 1 = full).
    """

    features: Float[Array, "B F"]
    targets: Float[Array, " B"]
    mask: Bool[Array, " B"]
    confidence_scale: Float[Array, " B"]


def label_batch(features: Float[np.ndarray, "B F"], targets: Float[np.ndarray, " B"], *,
                num_rows: int | None = None, confidence_scale: float = 1.0) -> LabelBatch:
    """A `LabelBatch` of the given rows, padded with masked rows up to `num_rows`."""
    features = np.asarray(features, np.float32)
    targets = np.asarray(targets, np.float32)
    if features.ndim != 2:
        raise ValueError(f"label_batch: features must be [B, F], got shape {features.shape}")
    B = features.shape[0]
    if targets.shape != (B,):
        raise ValueError(f"label_batch: targets has shape {targets.shape}; expected ({B},)")
    if np.any((targets < 0) | (targets > 1)) or not np.all(np.isfinite(targets)):
        raise ValueError("label_batch: targets must be probabilities in [0, 1]")
    rows = B if num_rows is None else num_rows
    if rows < B:
        raise ValueError(f"label_batch: num_rows={rows} is smaller than the {B} rows given")
    pad = rows - B
    return LabelBatch(
        features=np.pad(features, ((0, pad), (0, 0))), targets=np.pad(targets, (0, pad)),
        mask=np.arange(rows) < B, confidence_scale=np.full(rows, confidence_scale, np.float32))


def row_count(batch: LabelBatch) -> Float[Array, ""]:
    """The number of real rows (at least 1): the full-batch denominator."""
    return jnp.maximum(jnp.sum(batch.mask.astype(jnp.float32)), 1.0)


def binary_classification(apply: Callable[[Any, Float[Array, "B F"]], Float[Array, " B"]], *,
                          confidence_coef: float = 0.0, threshold: float = 0.5) -> Objective:
    """Cross-entropy of `apply(params, features)` logits against soft targets.

    Args:
      apply: the classifier, `(params, features [B, F]) -> logits [B]`.
      confidence_coef: the maximum weight ``a`` of the auxiliary confidence loss
        (Burns et al. 2023); per row it is ``confidence_coef * confidence_scale``. 0: plain CE.
      threshold: the hardening threshold of the model's own predictions.

    Returns:
      The objective; metrics `loss`, `ce_loss`, `confidence_term`, `accuracy`, `num_sequences`.
    """
    if not 0.0 <= confidence_coef <= 1.0:
        raise ValueError(f"binary_classification: confidence_coef must be in [0, 1] (got {confidence_coef})")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"binary_classification: threshold must be in (0, 1) (got {threshold})")

    def loss(params: Any, ref_params: Any, batch: LabelBatch,
             count: Float[Array, ""]) -> tuple[Float[Array, ""], Metrics]:
        del ref_params
        logits = apply(params, batch.features)
        value, metrics = confidence_loss(logits, batch.targets, batch.mask,
                                         confidence_weight=confidence_coef * batch.confidence_scale,
                                         threshold=threshold, normalizer=count)
        metrics["loss"] = value
        return value, metrics | {"num_sequences": jnp.sum(batch.mask.astype(jnp.float32))}

    def combine(metrics_M: Metrics, batch: LabelBatch) -> Metrics:
        del batch
        return combine_metrics(metrics_M, lambda name: "num_sequences",
                               summed=("loss", "ce_loss", "confidence_term", "accuracy", "num_sequences"))

    return Objective(row_count, loss, combine)
