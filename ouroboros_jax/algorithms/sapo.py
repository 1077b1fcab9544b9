"""SAPO: a smooth sigmoid gate on the token ratio in place of the hard clip.

Per token, with ratio ``rho = exp(logp - old_logp)`` and advantage ``A``,

    f(rho) = (4 / tau) * sigmoid(tau * (rho - 1)),   l = -f(rho) * A

with temperature ``tau = tau_pos`` where ``A > 0`` and ``tau_neg`` otherwise.
The gradient of a token is ``-w * rho * A * grad logp`` with
``w = f'(rho) = 4 p (1 - p)``, ``p = sigmoid(tau * (rho - 1))``: at
``rho = 1`` the weight is exactly 1 (the on-policy policy gradient, for any
tau), and it decays smoothly as the ratio leaves 1, faster for larger tau;
as ``tau -> 0`` it tends to 1 everywhere (the unclipped surrogate). The paper
takes ``tau_neg > tau_pos`` (defaults 1.0 and 1.05): negative advantages raise
the logits of many unsampled tokens, so their updates are damped sooner. Its
objective averages over each sequence's tokens, then over sequences
(``seq_mean_token_mean``).

Nothing is hard-clipped, so the clip indicators are all False; the gate
weight ``w`` is reported instead (``gate_weight_mean``: 1 on-policy).

Reference: Gao et al. 2025, "Soft Adaptive Policy Optimization" (Qwen),
arXiv 2511.20347.

Dimension legend: B batch, T time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from ouroboros_jax.algorithms.ppo_clip import SurrogateTerms

# |log rho| is capped (as verl does) so that rho stays finite: beyond it the gate's
# slope is 0 in float32, and an infinite rho would turn 0 * inf into NaN.
MAX_LOG_RATIO = 20.0


def sapo_terms(
    logp: Float[Array, "B T"],
    old_logp: Float[Array, "B T"],
    advantages: Float[Array, "B T"],
    mask: Shaped[Array, "B T"],
    *,
    tau_pos: float | Float[Array, ""],
    tau_neg: float | Float[Array, ""],
) -> SurrogateTerms:
    """Per-token SAPO loss ``-(4 / tau) * sigmoid(tau * (rho - 1)) * A``.

    Args:
      logp: log-prob of each completion token under the current policy.
      old_logp: log-prob under the policy that sampled it (no gradient).
      advantages: advantage of each token (a sequence advantage broadcast).
      mask: nonzero for completion tokens; the log-ratio is set to 0 elsewhere.
      tau_pos: gate temperature for tokens with ``A > 0`` (paper: 1.0).
      tau_neg: gate temperature for tokens with ``A <= 0`` (paper: 1.05).

    Returns:
      SurrogateTerms with the token ratio and ``gate_weight = 4 p (1 - p)``.
    """
    keep = mask != 0
    log_ratio = jnp.where(keep, logp - old_logp, jnp.zeros_like(logp))
    ratio = jnp.exp(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO))
    tau = jnp.where(advantages > 0, tau_pos, tau_neg).astype(ratio.dtype)
    p = jax.nn.sigmoid(tau * (ratio - 1.0))
    never = jnp.zeros(keep.shape, bool)
    return SurrogateTerms(
        loss=-(4.0 / tau) * p * advantages,
        ratio=ratio,
        clipped_low=never,
        clipped_high=never,
        clipped_dual=never,
        gate_weight=jax.lax.stop_gradient(4.0 * p * (1.0 - p)),
    )
