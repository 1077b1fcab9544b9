"""GSPO: the clipped objective on the length-normalised sequence ratio.

For completion ``y_i`` with ``|y_i|`` tokens, GSPO's importance ratio is the
geometric mean of the token ratios,

    s_i = (pi(y_i | x) / pi_old(y_i | x)) ** (1 / |y_i|)
        = exp((1 / |y_i|) * sum_t (logp_it - old_logp_it)),

and the PPO clip acts on ``s_i``, at sequence level; the paper uses ranges of
3e-4 (low) and 4e-4 (high). Its objective averages ``min(s_i A_i, clip(s_i) A_i)``
over the G sequences of a group, which is ``seq_mean_token_mean`` aggregation
of the per-sequence loss broadcast over the sequence's tokens.

GSPO-token carries the same ratio per token with a stop-gradient,

    s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)],

so that ``s_it == s_i`` in value while the gradient of token ``t`` flows through
its own log-prob only; with token-level advantages ``A_it`` each token gets its
own signal. With a sequence-level advantage, GSPO-token under
``seq_mean_token_mean`` has exactly GSPO's value and gradient.

Reference: Zheng et al. 2025, "Group Sequence Policy Optimization",
arXiv 2507.18071: sec. 4.1 (GSPO), sec. 4.3 (GSPO-token), sec. 5.1 (clip
ranges).

Dimension legend: B batch, T time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from ouroboros_jax.algorithms.aggregation import masked_mean
from ouroboros_jax.algorithms.ppo_clip import SurrogateTerms, clipped_surrogate


def sequence_log_ratio(
    logp: Float[Array, "B T"], old_logp: Float[Array, "B T"], mask: Shaped[Array, "B T"]
) -> Float[Array, " B"]:
    """``log s_i``: the mean over completion tokens of ``logp - old_logp``.

    Args:
      logp: log-prob of each token under the current policy.
      old_logp: log-prob under the sampling policy.
      mask: nonzero for completion tokens.

    Returns:
      The per-sequence log-ratio; 0 for a sequence without completion tokens.
    """
    log_ratio = jnp.where(mask != 0, logp - old_logp, jnp.zeros_like(logp))
    return masked_mean(log_ratio, mask, axis=-1)


def gspo_terms(
    logp: Float[Array, "B T"],
    old_logp: Float[Array, "B T"],
    advantages: Float[Array, "B T"],
    mask: Shaped[Array, "B T"],
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> SurrogateTerms:
    """GSPO: sequence ratio ``s_i``, clipped at sequence level, broadcast per token.

    Args:
      logp: log-prob of each completion token under the current policy.
      old_logp: log-prob under the sampling policy (no gradient).
      advantages: advantage per token; GSPO proper uses one value per
        sequence (broadcast). A token-varying advantage is accepted, but its
        gradient still flows through the shared ``s_i`` (use ``gspo_token``).
      mask: nonzero for completion tokens.
      clip_low: lower clip range (paper: 3e-4).
      clip_high: upper clip range (paper: 4e-4).
      dual_clip: dual-clip constant, or None.

    Returns:
      SurrogateTerms whose ratio is ``s_i`` repeated over the tokens of sequence i.
    """
    seq_ratio = jnp.exp(sequence_log_ratio(logp, old_logp, mask))
    ratio = jnp.broadcast_to(seq_ratio[:, None], logp.shape)
    return clipped_surrogate(ratio, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)


def gspo_token_terms(
    logp: Float[Array, "B T"],
    old_logp: Float[Array, "B T"],
    advantages: Float[Array, "B T"],
    mask: Shaped[Array, "B T"],
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> SurrogateTerms:
    """GSPO-token: ``s_it = sg[s_i] * exp(logp_t - sg[logp_t])``, clipped per token.

    Args:
      logp: log-prob of each completion token under the current policy.
      old_logp: log-prob under the sampling policy (no gradient).
      advantages: advantage per token (sequence-level ones broadcast).
      mask: nonzero for completion tokens.
      clip_low: lower clip range (paper: 3e-4).
      clip_high: upper clip range (paper: 4e-4).
      dual_clip: dual-clip constant, or None.

    Returns:
      SurrogateTerms whose ratio equals ``s_i`` in value on every token of i.
    """
    safe_logp = jnp.where(mask != 0, logp, jnp.zeros_like(logp))
    seq_log_ratio = jax.lax.stop_gradient(sequence_log_ratio(logp, old_logp, mask))
    # x - sg[x] is exactly 0 in value, so the ratio is exactly s_i.
    log_ratio = seq_log_ratio[:, None] + (safe_logp - jax.lax.stop_gradient(safe_logp))
    return clipped_surrogate(
        jnp.exp(log_ratio), advantages, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
