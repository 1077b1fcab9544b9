"""PPO's clipped value loss for the critic.

Per token, with the critic's new value ``v``, its value at sampling time
``v_old`` and the GAE return ``R``,

    l = max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2)

and the loss is ``0.5 * agg(l)`` with one of the aggregation modes of
``aggregation`` (verl's default for the critic is ``token_mean``). The clip
keeps the critic from moving further than ``eps`` from its sampling-time
prediction in one round of updates; taking the max makes it pessimistic, so
a clipped token stops passing gradient only when clipping made its loss
larger. ``value_clip_frac`` is the fraction of tokens where it did.

References: Schulman et al. 2017, arXiv 1707.06347 (PPO; the value clip is in
its reference code); verl ``compute_value_loss`` and TRL's PPO trainer, whose
definitions (including the clip fraction) this follows.

Dimension legend: B batch, T time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from ouroboros_jax.algorithms.aggregation import AGGREGATIONS, aggregate_loss, masked_mean

Metrics = dict[str, Float[Array, ""]]


def _masked_var(x: Array, keep: Array) -> Array:
    """Population variance over the kept positions (metrics only)."""
    centered = jnp.where(keep, x - masked_mean(x, keep), jnp.zeros_like(x))
    return masked_mean(jnp.square(centered), keep)


def value_loss(
    values: Float[Array, "B T"],
    old_values: Float[Array, "B T"],
    returns: Float[Array, "B T"],
    mask: Shaped[Array, "B T"],
    *,
    clip_range: float | None,
    aggregation: str,
    max_len: int | float | None = None,
    normalizer: float | Float[Array, ""] | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """Clipped value loss ``0.5 * agg(max((v - R)^2, (clip(v, v_old +- eps) - R)^2))``.

    Args:
      values: the critic's per-token values under the parameters being trained.
      old_values: its values at sampling time (no gradient).
      returns: regression targets, e.g. the returns of ``gae_advantages`` (no gradient).
      mask: nonzero for completion tokens; garbage elsewhere is ignored and
        gets zero gradient.
      clip_range: ``eps``; None turns the clip off (plain squared error).
      aggregation: one of ``AGGREGATIONS`` (see ``aggregate_loss``).
      max_len: constant normaliser of ``seq_mean_token_sum_norm`` (default T).
      normalizer: overrides the aggregation's data-dependent denominator, so
        that micro-batch losses sum to the full-batch loss.

    Returns:
      ``(loss, metrics)`` with ``value_loss``, ``value_clip_frac`` (fraction of
      tokens whose clipped error exceeds the unclipped one), ``value_mean``,
      ``return_mean``, ``value_mse`` (token mean of ``(v - R)^2``) and
      ``value_explained_var`` (``1 - Var(R - v) / Var(R)`` over tokens; 0
      when the returns do not vary).

    Raises:
      ValueError: for an unknown aggregation or a negative ``clip_range``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    if isinstance(clip_range, int | float) and clip_range < 0:
        raise ValueError(f"clip_range must be >= 0 or None: {clip_range}")
    keep = mask != 0
    dtype = jnp.promote_types(jnp.result_type(values), jnp.float32)

    def clean(x: Array) -> Array:
        x = jnp.asarray(x, dtype)
        return jnp.where(keep, x, jnp.zeros_like(x))

    values = clean(values)
    old_values, returns = jax.lax.stop_gradient((clean(old_values), clean(returns)))
    unclipped = jnp.square(values - returns)
    if clip_range is None:
        per_token, clipped_more = unclipped, jnp.zeros(keep.shape, bool)
    else:
        clipped_values = jnp.clip(values, old_values - clip_range, old_values + clip_range)
        clipped = jnp.square(clipped_values - returns)
        per_token, clipped_more = jnp.maximum(unclipped, clipped), clipped > unclipped
    loss = 0.5 * aggregate_loss(per_token, keep, aggregation, max_len=max_len, normalizer=normalizer)

    v = jax.lax.stop_gradient(values)
    var_returns = _masked_var(returns, keep)
    positive = var_returns > 0
    ratio = _masked_var(returns - v, keep) / jnp.where(positive, var_returns, 1.0)
    metrics = {
        "value_loss": loss,
        "value_clip_frac": masked_mean(clipped_more.astype(dtype), keep),
        "value_mean": masked_mean(v, keep),
        "return_mean": masked_mean(returns, keep),
        "value_mse": masked_mean(jax.lax.stop_gradient(unclipped), keep),
        "value_explained_var": jnp.where(positive, 1.0 - ratio, 0.0),
    }
    return loss, metrics
