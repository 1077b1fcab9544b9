"""Advantages from outcome rewards grouped by prompt.

``rewards[B, G]`` holds, for each of B prompts, the scalar rewards of its G
sampled completions. Every estimator returns one advantage per completion,
``[B, G]``, to be flattened to ``[B * G]`` sequences by the caller.

A group whose rewards are all equal carries no learning signal: every mode
gives it an advantage of exactly 0 (not a rounding residue, never NaN), and
gradients through these functions stay finite.

Dimension legend: B batch (prompts), G group (completions per prompt).
"""

from __future__ import annotations

import typing
from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Float

AdvantageMode = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
ADVANTAGE_MODES: tuple[str, ...] = typing.get_args(AdvantageMode)


def _constant_groups(rewards: Float[Array, "B G"]) -> Array:
    """Boolean [B, 1]: groups whose rewards are all equal."""
    return jnp.all(rewards == rewards[:, :1], axis=-1, keepdims=True)


def _safe_std(centered: Float[Array, "*dims"], count: int, degenerate: Array, axis) -> Array:
    """Bessel-corrected std of already centred values; 1 where ``degenerate``.

    Replacing the variance before the square root keeps the gradient of
    ``sqrt`` finite for zero-variance inputs (the usual double-``where`` trick).
    """
    var = jnp.sum(jnp.square(centered), axis=axis, keepdims=True) / max(count - 1, 1)
    return jnp.sqrt(jnp.where(degenerate, jnp.ones_like(var), var))


def group_advantages(
    rewards: Float[Array, "B G"], *, normalize_std: bool = True, eps: float = 1e-6
) -> Float[Array, "B G"]:
    """Group-relative advantages: reward minus group mean, optionally over group std.

    ``A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps)`` with the std using Bessel's
    correction (divisor G - 1), as TRL and verl compute it. Without std
    normalisation this is the Dr. GRPO estimator.

    References: GRPO, Shao et al. 2024 (DeepSeekMath), arXiv 2402.03300, eq. 3;
    Dr. GRPO, Liu et al. 2025, arXiv 2503.20783, sec. 3.2.

    Args:
      rewards: scalar reward per completion.
      normalize_std: divide by the group std (GRPO); False gives Dr. GRPO.
      eps: added to the std before dividing.

    Returns:
      Advantages, exactly 0 for zero-variance groups (and for G == 1).
    """
    group_size = rewards.shape[-1]
    constant = _constant_groups(rewards)
    centered = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
    if normalize_std:
        centered = centered / (_safe_std(centered, group_size, constant, axis=-1) + eps)
    return jnp.where(constant, jnp.zeros_like(centered), centered)


def rloo_advantages(rewards: Float[Array, "B G"]) -> Float[Array, "B G"]:
    """Leave-one-out (RLOO) advantages: reward minus the mean of the other G - 1.

    ``A_ij = r_ij - (sum_k r_ik - r_ij) / (G - 1) = G / (G - 1) * (r_ij - mean_k r_ik)``.

    Reference: Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for
    free!"; Ahmadian et al. 2024, arXiv 2402.14740.

    Args:
      rewards: scalar reward per completion; G >= 2 for a baseline to exist.

    Returns:
      Advantages, exactly 0 for zero-variance groups and for G == 1.
    """
    group_size = rewards.shape[-1]
    if group_size < 2:
        return jnp.zeros_like(rewards)
    total = jnp.sum(rewards, axis=-1, keepdims=True)
    advantages = rewards - (total - rewards) / (group_size - 1)
    return jnp.where(_constant_groups(rewards), jnp.zeros_like(advantages), advantages)


def batch_normalized_advantages(
    rewards: Float[Array, "B G"], *, subtract_group_mean: bool = True, eps: float = 1e-6
) -> Float[Array, "B G"]:
    """REINFORCE++-style advantages: whitened over the whole batch.

    With ``subtract_group_mean`` (REINFORCE++-baseline) the group mean is first
    removed, ``x_ij = r_ij - mean_k r_ik``; then
    ``A_ij = (x_ij - mean(x)) / (std(x) + eps)`` with mean and Bessel-corrected std
    over all B * G completions. Whitening is per completion, not per token.

    Reference: Hu et al. 2025, "REINFORCE++", arXiv 2501.03262.

    Args:
      rewards: scalar reward per completion.
      subtract_group_mean: remove the per-prompt mean before whitening.
      eps: added to the batch std before dividing.

    Returns:
      Advantages. Exactly 0 everywhere when the whole batch is constant, and,
      with ``subtract_group_mean``, exactly 0 for zero-variance groups (their
      centred values are 0, so whitening moves them only by rounding).
    """
    x = rewards
    constant_group = _constant_groups(rewards)
    if subtract_group_mean:
        centered = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
        x = jnp.where(constant_group, jnp.zeros_like(centered), centered)
    constant_batch = jnp.all(x == x.reshape(-1)[0])
    centered = x - jnp.mean(x)
    std = _safe_std(centered, x.size, constant_batch, axis=None)
    advantages = centered / (std + eps)
    zero = (constant_batch | constant_group) if subtract_group_mean else constant_batch
    return jnp.where(zero, jnp.zeros_like(advantages), advantages)


def compute_advantages(
    rewards: Float[Array, "B G"], *, mode: AdvantageMode, eps: float = 1e-6
) -> Float[Array, "B G"]:
    """Advantages by name.

    Args:
      rewards: scalar reward per completion.
      mode: ``grpo`` (group mean and std), ``dr_grpo`` (group mean only),
        ``rloo`` (leave-one-out mean) or ``reinforce_pp`` (group mean, then
        batch whitening).
      eps: std offset for the normalising modes.

    Returns:
      Advantages [B, G].

    Raises:
      ValueError: for an unknown mode.
    """
    match mode:
        case "grpo":
            return group_advantages(rewards, normalize_std=True, eps=eps)
        case "dr_grpo":
            return group_advantages(rewards, normalize_std=False, eps=eps)
        case "rloo":
            return rloo_advantages(rewards)
        case "reinforce_pp":
            return batch_normalized_advantages(rewards, subtract_group_mean=True, eps=eps)
        case _:
            raise ValueError(f"unknown advantage mode {mode!r}; expected one of {ADVANTAGE_MODES}")
