"""Binary cross-entropy on soft labels, with the auxiliary confidence loss of weak-to-strong training.

A classifier gives one logit per example, ``p = sigmoid(logit)``; its targets
are probabilities in [0, 1] (gold 0/1 labels, or a weak supervisor's soft
predictions). With the auxiliary confidence term of Burns et al. 2023 the loss
of one example is

    l = (1 - a) * CE(p, y) + a * CE(p, stop_gradient(p > threshold))

where ``CE(p, y) = -y log p - (1 - y) log(1 - p)`` and ``a`` is the
confidence weight: the strong student is also pulled towards its own hardened
predictions, so it may disagree with the weak labels where it is confident.

Reference: Burns et al. 2023, "Weak-to-Strong Generalization: Eliciting Strong
Capabilities With Weak Supervision", arXiv 2312.09390, section 4.3.2.

Dimension legend: B examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

Metrics = dict[str, Float[Array, ""]]


def binary_cross_entropy(logits: Float[Array, " B"], targets: Float[Array, " B"]) -> Float[Array, " B"]:
    """``-y log sigmoid(z) - (1 - y) log sigmoid(-z)`` per example, stable for large |z|."""
    return -(targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits))


def confidence_loss(
    logits: Float[Array, " B"],
    targets: Float[Array, " B"],
    mask: Bool[Array, " B"],
    *,
    confidence_weight: Float[Array, " B"] | float = 0.0,
    threshold: float = 0.5,
    normalizer: Float[Array, ""] | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """Soft-label cross-entropy mixed with cross-entropy on the model's own hardened predictions.

    Args:
      logits: [B] classifier logits.
      targets: [B] target probabilities in [0, 1].
      mask: [B] which examples count.
      confidence_weight: ``a`` of the module docstring, a scalar or one per example (0: plain CE).
      threshold: predictions with ``sigmoid(logit) > threshold`` harden to 1, the rest to 0.
      normalizer: the divisor of the summed loss (default: the number of masked examples).

    Returns:
      ``(loss, metrics)``: ``loss``; ``ce_loss`` (against the targets) and
      ``confidence_term`` (against the hardened predictions), both unweighted
      means; ``accuracy`` (prediction on the same side of 0.5 as the target).
    """
    m = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(m), 1.0) if normalizer is None else normalizer
    a = jnp.broadcast_to(jnp.asarray(confidence_weight, jnp.float32), logits.shape)
    hard = jax.lax.stop_gradient((jax.nn.sigmoid(logits) > threshold).astype(jnp.float32))
    ce = binary_cross_entropy(logits, targets)
    self_ce = binary_cross_entropy(logits, hard)
    per_example = (1.0 - a) * ce + a * self_ce
    mean = lambda x: jnp.sum(x * m) / count
    correct = ((logits > 0) == (targets > 0.5)).astype(jnp.float32)
    return mean(per_example), {"loss": mean(per_example), "ce_loss": mean(ce),
                               "confidence_term": mean(self_ce), "accuracy": mean(correct)}
