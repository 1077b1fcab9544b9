"""Truncated importance weights for rollouts sampled by another policy.

The policy loss compares the current policy with the one it calls old
(``logp_old``: the trainer's log-probs at the start of the update). When the
tokens were sampled by a different policy, another engine, precision or a
stale copy of the weights, with log-probs ``logp_rollout``, the gradient is
off-policy by the factor

    w = pi_old / pi_rollout = exp(logp_old - logp_rollout)

per token (``level="token"``), or by the product of the token ratios of a
sequence, ``exp(sum_t (logp_old_t - logp_rollout_t))``, computed in log space
(``level="sequence"``; unbiased but high-variance, one weight per sequence
carried by each of its tokens). Two ways to keep the weights bounded:

- TIS (truncated importance sampling): ``min(w, upper)``;
- IcePop (``lower`` given): ``w`` inside ``[lower, upper]``, 0 outside, so a
  token (or sequence) whose two probabilities disagree too much contributes
  no gradient at all.

Weights carry no gradient: they change the measure the loss averages over,
not the objective. ``policy_loss(..., importance_weights=w)`` multiplies the
per-token policy loss by them.

Metrics, over the units the weights are defined on (completion tokens, or
sequences with at least one completion token): ``is_weight_mean``,
``is_weight_max``, ``is_weight_min`` (of the weights returned),
``is_truncated_frac`` (units whose raw weight fell outside the kept range),
``is_ess`` (normalised effective sample size ``(sum w)^2 / (n sum w^2)`` in
``[0, 1]``, 1 when all weights are equal, 0 when none is kept); and over
completion tokens, the sampler-vs-trainer gap: ``mismatch_logp_abs_diff``
(mean ``|logp_old - logp_rollout|``), ``mismatch_kl_k1`` and
``mismatch_kl_k3`` (estimates of ``KL(pi_rollout || pi_old)`` from the
sampled tokens, see ``kl``).

References: Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
Off-Policy RL Training" (TIS, fengyao.notion.site); Ling Team 2025, "Every
Step Evolves: Scaling Reinforcement Learning for Trillion-Scale Thinking
Model", arXiv 2510.18855 (IcePop); verl's rollout correction
(``rollout_corr_helper``), whose weight, truncation and ESS definitions these
follow.

Dimension legend: B batch, T time.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from ouroboros_jax.algorithms.aggregation import masked_max, masked_mean, masked_min, valid_sequences
from ouroboros_jax.algorithms.kl import kl_penalty

ImportanceLevel = Literal["token", "sequence"]
IMPORTANCE_LEVELS: tuple[str, ...] = ("token", "sequence")

Metrics = dict[str, Float[Array, ""]]


def _check(level: str, upper, lower) -> None:
    """Fail early, naming the argument, on bad static settings."""
    if level not in IMPORTANCE_LEVELS:
        raise ValueError(f"unknown importance level {level!r}; expected one of {IMPORTANCE_LEVELS}")
    if isinstance(upper, int | float) and upper <= 0:
        raise ValueError(f"upper must be > 0 (the largest weight kept): {upper}")
    if isinstance(lower, int | float) and isinstance(upper, int | float) and not 0 <= lower < upper:
        raise ValueError(f"lower must satisfy 0 <= lower < upper: lower={lower}, upper={upper}")


def _effective_sample_size(w: Array, keep: Array) -> Array:
    """``(sum w)^2 / (n sum w^2)`` over the kept entries; 0 when every weight is 0."""
    total = jnp.sum(jnp.where(keep, w, 0.0))
    total_sq = jnp.sum(jnp.where(keep, jnp.square(w), 0.0))
    count = jnp.sum(keep.astype(w.dtype))
    positive = total_sq > 0
    return jnp.where(positive, jnp.square(total) / (count * jnp.where(positive, total_sq, 1.0)), 0.0)


def importance_weights(
    logp_old: Float[Array, "B T"],
    logp_rollout: Float[Array, "B T"],
    mask: Shaped[Array, "B T"],
    *,
    level: str = "token",
    upper: float,
    lower: float | None = None,
) -> tuple[Float[Array, "B T"], Metrics]:
    """Truncated (TIS) or masked (IcePop) importance weights ``pi_old / pi_rollout``.

    Args:
      logp_old: per-token log-probs under the policy the loss calls old.
      logp_rollout: log-probs of the same tokens under the policy that sampled them.
      mask: nonzero for completion tokens; garbage elsewhere is ignored.
      level: ``token`` (one weight per token) or ``sequence`` (the product of
        a sequence's token ratios, on each of its tokens).
      upper: weights above it are truncated to it (TIS), or zeroed (IcePop).
      lower: None for TIS; given, weights below it are zeroed too (IcePop).

    Returns:
      ``(weights, metrics)``: weights [B, T] without gradient, zero off the
      mask, and the metrics of the module docstring.

    Raises:
      ValueError: for an unknown level, ``upper <= 0`` or ``lower`` outside ``[0, upper)``.
    """
    _check(level, upper, lower)
    keep = mask != 0
    dtype = jnp.promote_types(jnp.result_type(logp_old, logp_rollout), jnp.float32)

    def clean(x: Array) -> Array:
        x = jax.lax.stop_gradient(jnp.asarray(x, dtype))
        return jnp.where(keep, x, jnp.zeros_like(x))

    logp_old, logp_rollout = clean(logp_old), clean(logp_rollout)
    log_ratio = logp_old - logp_rollout
    if level == "token":
        log_w, units = log_ratio, keep
    else:
        log_w, units = jnp.sum(log_ratio, axis=-1), valid_sequences(keep)
    log_upper = jnp.log(jnp.asarray(upper, dtype))
    # Exponentiate at most log(upper): no overflow however far apart the two policies are.
    kept = jnp.exp(jnp.minimum(log_w, log_upper))
    if lower is None:
        outside = log_w > log_upper
        w = kept
    else:
        outside = (log_w > log_upper) | (log_w < jnp.log(jnp.asarray(lower, dtype)))
        w = jnp.where(outside, jnp.zeros_like(kept), kept)
    w = jnp.where(units, w, jnp.zeros_like(w))

    metrics = {
        "is_weight_mean": masked_mean(w, units),
        "is_weight_max": masked_max(w, units),
        "is_weight_min": masked_min(w, units),
        "is_truncated_frac": masked_mean(outside.astype(dtype), units),
        "is_ess": _effective_sample_size(w, units),
        "mismatch_logp_abs_diff": masked_mean(jnp.abs(log_ratio), keep),
        "mismatch_kl_k1": masked_mean(kl_penalty(logp_rollout, logp_old, "k1"), keep),
        "mismatch_kl_k3": masked_mean(kl_penalty(logp_rollout, logp_old, "k3"), keep),
    }
    if level == "sequence":
        w = jnp.where(keep, w[:, None], jnp.zeros_like(log_ratio))
    return jax.lax.stop_gradient(w), metrics
