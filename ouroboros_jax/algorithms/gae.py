"""Per-token rewards and generalised advantage estimation for PPO with a critic.

InstructGPT-style RLHF (Ouyang et al. 2022, arXiv 2203.02155) turns a
sequence score into per-token rewards: the score sits on the last completion
token and every completion token pays ``kl_coef * (old_logp - ref_logp)``,
the k1 estimate of the KL to the reference policy (Ziegler et al. 2019,
arXiv 1909.08593). A critic predicts a value per token, and GAE (Schulman et
al. 2016, arXiv 1506.02438) turns rewards and values into advantages:

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t        (the critic's regression target)

with ``V`` and ``A`` zero after the last completion token.

Masking follows verl's ``compute_gae_advantage_return`` (which adapts TRL's
PPO trainer): a masked position is skipped, the value and the running
advantage of the next completion token carry over it unchanged, so a masked
token neither discounts nor adds reward. For the layout used here (one
contiguous run of completion tokens per row, then padding) this is exactly
TRL's recursion with rewards and values zeroed on the padding. Outputs are
zero off the mask.

Dimension legend: B batch (sequences), T time (completion tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from ouroboros_jax.algorithms.aggregation import masked_mean
from ouroboros_jax.algorithms.kl import kl_penalty

WHITEN_EPS = 1e-8  # inside the square root, as TRL's and verl's masked_whiten


def _float_dtype(*arrays: Array):
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def last_token_mask(mask: Shaped[Array, "B T"]) -> Shaped[Array, "B T"]:
    """Boolean [B, T]: True on the last completion token of each row (none for empty rows).

    Args:
      mask: nonzero for completion tokens.

    Returns:
      One True per row that has a completion token, at its last position.
    """
    keep = mask != 0
    length = keep.shape[-1]
    last = length - 1 - jnp.argmax(keep[:, ::-1], axis=-1)
    return (jnp.arange(length)[None, :] == last[:, None]) & keep


def outcome_token_rewards(
    scores: Float[Array, " B"],
    mask: Shaped[Array, "B T"],
    old_logp: Float[Array, "B T"],
    ref_logp: Float[Array, "B T"],
    *,
    kl_coef: float | Float[Array, ""],
    kl_kind: str = "k1",
) -> Float[Array, "B T"]:
    """Sequence scores as per-token rewards with the KL penalty of InstructGPT.

    ``r_t = score * [t is the last completion token] - kl_coef * kl_t`` on
    completion tokens, with ``kl_t = old_logp_t - ref_logp_t`` (k1, the
    default) or another estimator of ``KL(pi_old || pi_ref)`` from ``kl``.

    Reference: Ouyang et al. 2022 (InstructGPT), arXiv 2203.02155, eq. 2;
    Ziegler et al. 2019, arXiv 1909.08593.

    Args:
      scores: one score per sequence (reward model or verifier).
      mask: nonzero for completion tokens; rows without any get zero rewards.
      old_logp: log-probs of the completion tokens under the sampling policy.
      ref_logp: log-probs of the same tokens under the reference policy.
      kl_coef: weight of the per-token KL penalty (InstructGPT's beta).
      kl_kind: ``k1`` (default, as InstructGPT), ``k2`` or ``k3``.

    Returns:
      Per-token rewards, exactly zero off the mask (garbage there is ignored).
    """
    keep = mask != 0
    dtype = _float_dtype(scores, old_logp, ref_logp)

    def clean(x: Array) -> Array:
        x = jnp.asarray(x, dtype)
        return jnp.where(keep, x, jnp.zeros_like(x))

    kl = kl_penalty(clean(old_logp), clean(ref_logp), kl_kind)
    score = jnp.asarray(scores, dtype)[:, None]
    rewards = jnp.where(last_token_mask(keep), score, jnp.zeros_like(kl)) - kl_coef * kl
    return jnp.where(keep, rewards, jnp.zeros_like(rewards))


def masked_whiten(
    x: Float[Array, "B T"], mask: Shaped[Array, "B T"], *, shift_mean: bool = True, eps: float = WHITEN_EPS
) -> Float[Array, "B T"]:
    """Whiten ``x`` over the masked positions: ``(x - mean) / sqrt(var + eps)``.

    The variance is unbiased (divisor ``n - 1``) and ``eps`` sits inside the
    square root, as in TRL's and verl's ``masked_whiten``. Where those raise
    for ``n <= 1``, this returns 0 (one value is its own mean), so it can run
    inside ``jit``.

    Args:
      x: values.
      mask: nonzero marks the positions that count.
      shift_mean: True leaves the result with zero mean; False adds the mean back.
      eps: added to the variance.

    Returns:
      The whitened values, zero off the mask.
    """
    keep = mask != 0
    count = jnp.sum(keep.astype(x.dtype))
    mean = masked_mean(x, keep)
    centered = jnp.where(keep, x - mean, jnp.zeros_like(x))
    var = jnp.sum(jnp.square(centered)) / jnp.maximum(count - 1.0, 1.0)
    out = centered * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(keep, out, jnp.zeros_like(out))


def gae_advantages(
    rewards: Float[Array, "B T"],
    values: Float[Array, "B T"],
    mask: Shaped[Array, "B T"],
    *,
    gamma: float | Float[Array, ""],
    lam: float | Float[Array, ""],
    whiten: bool = True,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Generalised advantage estimation over completion tokens.

    Reference: Schulman et al. 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation", arXiv 1506.02438, eq. 16; the
    masking and whitening of verl's ``compute_gae_advantage_return`` and TRL's
    PPO trainer (module docstring).

    Args:
      rewards: per-token rewards (e.g. ``outcome_token_rewards``).
      values: the critic's per-token values at sampling time.
      mask: nonzero for completion tokens; masked positions are skipped.
      gamma: discount (verl's and TRL's PPO default: 1.0).
      lam: GAE's lambda (TRL's PPO default 0.95; verl's config default 1.0).
      whiten: whiten the advantages over the masked tokens (``masked_whiten``).

    Returns:
      ``(advantages, returns)``, both zero off the mask, with
      ``returns = advantages + values`` computed before whitening.
    """
    keep = mask != 0
    dtype = _float_dtype(rewards, values)
    rewards = jnp.where(keep, jnp.asarray(rewards, dtype), 0.0)
    values = jnp.where(keep, jnp.asarray(values, dtype), 0.0)

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, valid = inputs
        advantage = reward + gamma * next_value - value + gamma * lam * next_advantage
        # A masked position passes the next token's value and advantage through unchanged.
        carry = (jnp.where(valid, value, next_value), jnp.where(valid, advantage, next_advantage))
        return carry, jnp.where(valid, advantage, jnp.zeros_like(advantage))

    zeros_B = jnp.zeros(rewards.shape[:1], dtype)
    _, advantages_TxB = jax.lax.scan(step, (zeros_B, zeros_B), (rewards.T, values.T, keep.T), reverse=True)
    advantages = advantages_TxB.T
    returns = jnp.where(keep, advantages + values, 0.0)
    if whiten:
        advantages = masked_whiten(advantages, keep)
    return advantages, returns
