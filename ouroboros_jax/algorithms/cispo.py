"""CISPO: clip the importance weight, not the update.

MiniMax-M1's objective keeps every token's gradient. The token ratio
``rho = exp(logp - old_logp)`` is clipped and held constant, and it weights a
plain policy-gradient term:

    l = -sg(clip(rho, 1 - clip_low, 1 + clip_high)) * A * logp

so the gradient of a token is ``-clip(rho) * A * grad logp``: inside the clip
range it equals the unclipped PPO surrogate's ``-rho * A * grad logp``;
outside, it is scaled down to the bound instead of being dropped, as PPO-clip
drops it. The paper imposes no lower bound (take ``clip_low >= 1``: the
bound ``1 - clip_low <= 0`` never binds) and tunes ``clip_high`` only; it
aggregates with ``token_mean``.

The clip indicators mark tokens whose weight hit a bound (``low``:
``rho < 1 - clip_low``, ``high``: ``rho > 1 + clip_high``, whatever the sign
of the advantage, as verl's clip fraction counts them): their gradient is
scaled, not zero. There is no dual clip; the setting is accepted and ignored.

Reference: MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently
with Lightning Attention", arXiv 2506.13585, eq. 4-5.

Dimension legend: B batch, T time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from ouroboros_jax.algorithms.ppo_clip import SurrogateTerms


def cispo_terms(
    logp: Float[Array, "B T"],
    old_logp: Float[Array, "B T"],
    advantages: Float[Array, "B T"],
    mask: Shaped[Array, "B T"],
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> SurrogateTerms:
    """Per-token CISPO loss ``-sg(clip(rho)) * A * logp``.

    Args:
      logp: log-prob of each completion token under the current policy.
      old_logp: log-prob under the policy that sampled it (no gradient).
      advantages: advantage of each token (a sequence advantage broadcast).
      mask: nonzero for completion tokens; the log-ratio and the log-prob are
        set to 0 elsewhere so garbage cannot reach values or gradients.
      clip_low: the weight is clipped below at ``1 - clip_low`` (paper: none,
        i.e. ``clip_low >= 1``).
      clip_high: the weight is clipped above at ``1 + clip_high``.
      dual_clip: ignored (CISPO has no dual clip).

    Returns:
      SurrogateTerms; ``ratio`` is the unclipped token ratio.
    """
    del dual_clip
    keep = mask != 0
    safe_logp = jnp.where(keep, logp, jnp.zeros_like(logp))
    log_ratio = jnp.where(keep, logp - old_logp, jnp.zeros_like(logp))
    ratio = jax.lax.stop_gradient(jnp.exp(log_ratio))
    weight = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    never = jnp.zeros(keep.shape, bool)
    return SurrogateTerms(
        loss=-weight * advantages * safe_logp,
        ratio=ratio,
        clipped_low=ratio < 1.0 - clip_low,
        clipped_high=ratio > 1.0 + clip_high,
        clipped_dual=never,
    )
