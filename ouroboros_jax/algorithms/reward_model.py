"""Bradley-Terry pairwise loss for reward models.

A reward model scores a chosen and a rejected completion of the same prompt;
under the Bradley-Terry model ``P(chosen > rejected) = sigmoid(c - r)``, and the
loss is its negative log-likelihood, averaged over pairs::

    l = -log sigmoid(c - r - margin) + center_coef * (c + r) ** 2

The optional ``margin`` (per pair, e.g. from graded preference strength) is
Llama 2's; the optional centring term (TRL's ``center_rewards_coefficient``,
Eisenstein et al. 2023) keeps the scores near zero mean, since the loss only
sees differences.

References: Bradley & Terry 1952; Ouyang et al. 2022 (InstructGPT),
arXiv 2203.02155, eq. 1; Touvron et al. 2023 (Llama 2), arXiv 2307.09288, eq. 2.

Dimension legend: B batch (preference pairs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from ouroboros_jax.algorithms.aggregation import masked_mean, masked_sum

Metrics = dict[str, Float[Array, ""]]


def bradley_terry_loss(
    chosen_scores: Float[Array, " B"],
    rejected_scores: Float[Array, " B"],
    *,
    margin: float | Float[Array, " B"] | None = None,
    center_coef: float = 0.0,
    mask: Shaped[Array, " B"] | None = None,
    normalizer: float | Float[Array, ""] | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """Pairwise Bradley-Terry loss, ``mean(-log sigmoid(c - r - margin))``.

    Args:
      chosen_scores: scalar score of each chosen completion.
      rejected_scores: scalar score of each rejected completion.
      margin: optional required score gap per pair (or one for all).
      center_coef: weight of the ``(c + r) ** 2`` centring penalty.
      mask: optional [B], nonzero for real pairs (padding pairs are ignored).
      normalizer: divide the summed loss by this instead of the number of real
        pairs (the full batch's count when accumulating micro-batches); the
        other metrics stay means over this call's pairs.

    Returns:
      ``(loss, metrics)`` with metrics ``loss``, ``accuracy`` (fraction of pairs
      with ``c > r`` strictly; ties count as wrong), ``score_margin`` (mean of
      ``c - r``), ``chosen_score`` and ``rejected_score`` (means).
    """
    keep = jnp.ones(chosen_scores.shape, bool) if mask is None else mask != 0
    chosen = jnp.where(keep, chosen_scores, jnp.zeros_like(chosen_scores))
    rejected = jnp.where(keep, rejected_scores, jnp.zeros_like(rejected_scores))
    gap = chosen - rejected
    logits = gap if margin is None else gap - margin
    mean = masked_mean if normalizer is None else (lambda x, m: masked_sum(x, m) / normalizer)
    loss = mean(-jax.nn.log_sigmoid(logits), keep)
    if center_coef:
        loss = loss + center_coef * mean(jnp.square(chosen + rejected), keep)
    gap = jax.lax.stop_gradient(gap)
    metrics = {
        "loss": loss,
        "accuracy": masked_mean((gap > 0).astype(gap.dtype), keep),
        "score_margin": masked_mean(gap, keep),
        "chosen_score": masked_mean(jax.lax.stop_gradient(chosen), keep),
        "rejected_score": masked_mean(jax.lax.stop_gradient(rejected), keep),
    }
    return loss, metrics
