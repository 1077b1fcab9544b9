"""PPO clipped surrogate on per-token ratios, with clip-higher and dual-clip.

Per token, with ratio ``rho = exp(logp - old_logp)`` and advantage ``A``, the
loss to minimise is

    l = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high))

(the negated PPO objective ``min(rho A, clip(rho) A)``). Separate lower and
upper ranges are DAPO's clip-higher. With dual-clip (constant ``c > 1``) the
loss of a token with ``A < 0`` is further capped, ``l = min(l, -A * c)``, so a
huge ratio on a bad token cannot produce an unbounded update.

The clipped regions, where the token's gradient is zero, are reported as
indicators: ``low`` (``A < 0`` and ``rho < 1 - clip_low``), ``high`` (``A > 0`` and
``rho > 1 + clip_high``) and ``dual`` (``A < 0`` and ``rho > c``); they are disjoint.

References: Schulman et al. 2017, arXiv 1707.06347 (PPO);
Ye et al. 2020, arXiv 1912.09729 (dual-clip PPO);
Yu et al. 2025, arXiv 2503.14476 (DAPO, clip-higher).

Dimension legend: B batch, T time.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Shaped


class SurrogateTerms(NamedTuple):
    """Per-token output of a policy-loss variant.

    Attributes:
      loss: per-token loss to minimise (before aggregation and masking).
      ratio: the importance ratio the clip saw (per token, or per sequence
        broadcast over its tokens).
      clipped_low: token sits in the lower clipped region.
      clipped_high: token sits in the upper clipped region.
      clipped_dual: token is capped by dual-clip.
      gate_weight: for soft-gated variants (SAPO), the factor by which the
        token's gradient is scaled relative to the unclipped surrogate; None
        for the hard-clipped ones, whose clip indicators say the same.
    """

    loss: Float[Array, "B T"]
    ratio: Float[Array, "B T"]
    clipped_low: Bool[Array, "B T"]
    clipped_high: Bool[Array, "B T"]
    clipped_dual: Bool[Array, "B T"]
    gate_weight: Float[Array, "B T"] | None = None


def clipped_surrogate(
    ratio: Float[Array, "B T"],
    advantages: Float[Array, "B T"],
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> SurrogateTerms:
    """The (dual-)clipped PPO loss for given ratios and advantages.

    Args:
      ratio: importance ratio ``pi / pi_old`` (token or sequence level).
      advantages: advantage of each token.
      clip_low: lower range, the ratio is clipped at ``1 - clip_low``.
      clip_high: upper range, the ratio is clipped at ``1 + clip_high``.
      dual_clip: the constant ``c > 1`` of dual-clip PPO; None turns it off.

    Returns:
      SurrogateTerms with the per-token loss and clip indicators.
    """
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    negative = advantages < 0
    clipped_low = negative & (ratio < 1.0 - clip_low)
    clipped_high = (advantages > 0) & (ratio > 1.0 + clip_high)
    if dual_clip is None:
        clipped_dual = jnp.zeros_like(negative)
    else:
        loss = jnp.where(negative, jnp.minimum(loss, -advantages * dual_clip), loss)
        clipped_dual = negative & (ratio > dual_clip)
    return SurrogateTerms(loss, ratio, clipped_low, clipped_high, clipped_dual)


def ppo_clip_terms(
    logp: Float[Array, "B T"],
    old_logp: Float[Array, "B T"],
    advantages: Float[Array, "B T"],
    mask: Shaped[Array, "B T"],
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> SurrogateTerms:
    """Token-level PPO-clip (GRPO, DAPO): ratio ``exp(logp_t - old_logp_t)`` per token.

    Args:
      logp: log-prob of each completion token under the current policy.
      old_logp: log-prob under the policy that sampled it (no gradient).
      advantages: advantage of each token (a sequence advantage broadcast).
      mask: nonzero for completion tokens; the log-ratio is set to 0 elsewhere
        so garbage there cannot reach values or gradients.
      clip_low: lower clip range.
      clip_high: upper clip range.
      dual_clip: dual-clip constant, or None.

    Returns:
      SurrogateTerms.
    """
    log_ratio = jnp.where(mask != 0, logp - old_logp, jnp.zeros_like(logp))
    return clipped_surrogate(
        jnp.exp(log_ratio), advantages, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
