"""Offline preference losses: DPO, IPO, and SPIN as DPO against the previous model.

Inputs are per-sequence log-probs [B] of a chosen (preferred) and a rejected
completion under the trained policy and under a frozen reference. With

    h = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)

(the difference of the two policy/reference log-ratios),

- ``sigmoid`` (DPO, Rafailov et al. 2023, arXiv 2305.18290, eq. 7), with label
  smoothing ``e`` (conservative DPO, Mitchell 2023)::

      l = -(1 - e) * log sigmoid(beta * h) - e * log sigmoid(-beta * h)

- ``ipo`` (IPO, Azar et al. 2023, arXiv 2310.12036, eq. 17; TRL's form)::

      l = (h - 1 / (2 * beta)) ** 2

  The paper uses length-averaged log-probs here; pass averaged values to get
  that, summed ones otherwise.

The implicit rewards reported as metrics are ``beta * (logp - ref)`` per side.

Dimension legend: B batch (preference pairs).
"""

from __future__ import annotations

import typing
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from ouroboros_jax.algorithms.aggregation import masked_mean, masked_sum

DPOVariant = Literal["sigmoid", "ipo"]
DPO_VARIANTS: tuple[str, ...] = typing.get_args(DPOVariant)

Metrics = dict[str, Float[Array, ""]]


def _pair_mask(mask: Shaped[Array, " B"] | None, like: Array) -> Array:
    """Boolean [B] of the pairs that count (all of them by default)."""
    return jnp.ones(like.shape, bool) if mask is None else mask != 0


def dpo_loss(
    policy_chosen_logp: Float[Array, " B"],
    policy_rejected_logp: Float[Array, " B"],
    ref_chosen_logp: Float[Array, " B"],
    ref_rejected_logp: Float[Array, " B"],
    *,
    beta: float,
    variant: DPOVariant = "sigmoid",
    label_smoothing: float = 0.0,
    mask: Shaped[Array, " B"] | None = None,
    normalizer: float | Float[Array, ""] | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """DPO (or IPO) loss of preference pairs, averaged over pairs.

    Args:
      policy_chosen_logp: summed log-prob of the chosen completion, policy.
      policy_rejected_logp: summed log-prob of the rejected completion, policy.
      ref_chosen_logp: the same for the reference model (no gradient).
      ref_rejected_logp: the same for the reference model (no gradient).
      beta: inverse temperature of DPO; IPO's regulariser tau.
      variant: ``sigmoid`` (DPO) or ``ipo``.
      label_smoothing: probability that a label is flipped (sigmoid only).
      mask: optional [B], nonzero for real pairs (padding pairs are ignored).
      normalizer: divide the summed loss by this instead of the number of
        real pairs, e.g. the full batch's count when accumulating micro-batches
        (the metrics other than ``loss`` stay means over this call's pairs).

    Returns:
      ``(loss, metrics)`` with metrics ``loss``, ``rewards_chosen``,
      ``rewards_rejected`` (mean implicit rewards), ``reward_margin`` (mean of
      their difference), ``reward_accuracy`` (fraction with chosen reward
      strictly above rejected) and ``log_ratio_margin`` (mean of ``h``).

    Raises:
      ValueError: for an unknown variant, or label smoothing with IPO.
    """
    ref_chosen_logp, ref_rejected_logp = jax.lax.stop_gradient((ref_chosen_logp, ref_rejected_logp))
    keep = _pair_mask(mask, policy_chosen_logp)

    def clean(x: Array) -> Array:
        return jnp.where(keep, x, jnp.zeros_like(x))

    chosen_log_ratio = clean(policy_chosen_logp - ref_chosen_logp)
    rejected_log_ratio = clean(policy_rejected_logp - ref_rejected_logp)
    h = chosen_log_ratio - rejected_log_ratio
    match variant:
        case "sigmoid":
            losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
            losses = losses - label_smoothing * jax.nn.log_sigmoid(-beta * h)
        case "ipo":
            if not isinstance(label_smoothing, int | float) or label_smoothing != 0.0:
                raise ValueError("label_smoothing applies to the sigmoid variant only, not ipo")
            losses = jnp.square(h - 1.0 / (2.0 * beta))
        case _:
            raise ValueError(f"unknown DPO variant {variant!r}; expected one of {DPO_VARIANTS}")
    loss = masked_mean(losses, keep) if normalizer is None else masked_sum(losses, keep) / normalizer
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_log_ratio)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_log_ratio)
    metrics = {
        "loss": loss,
        "rewards_chosen": masked_mean(chosen_rewards, keep),
        "rewards_rejected": masked_mean(rejected_rewards, keep),
        "reward_margin": masked_mean(chosen_rewards - rejected_rewards, keep),
        "reward_accuracy": masked_mean(
            (chosen_rewards > rejected_rewards).astype(chosen_rewards.dtype), keep
        ),
        "log_ratio_margin": masked_mean(jax.lax.stop_gradient(h), keep),
    }
    return loss, metrics


def spin_loss(
    policy_real_logp: Float[Array, " B"],
    policy_generated_logp: Float[Array, " B"],
    opponent_real_logp: Float[Array, " B"],
    opponent_generated_logp: Float[Array, " B"],
    *,
    beta: float,
    variant: DPOVariant = "sigmoid",
    mask: Shaped[Array, " B"] | None = None,
    normalizer: float | Float[Array, ""] | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """SPIN: DPO with real data as chosen and the previous model's samples as rejected.

    At iteration t+1 the policy is trained to tell the human ("real") response
    from the one generated by the model of iteration t, and that model (the
    "opponent") is also the reference. With the logistic loss this is the
    sigmoid DPO loss with ``beta`` = SPIN's lambda.

    Reference: Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language
    Models to Strong Language Models", arXiv 2401.01335, sec. 4.

    Args:
      policy_real_logp: summed log-prob of the real response, trained policy.
      policy_generated_logp: summed log-prob of the previous generation's
        sample, trained policy.
      opponent_real_logp: the same under the previous generation's model.
      opponent_generated_logp: the same under the previous generation's model.
      beta: SPIN's lambda.
      variant: ``sigmoid`` (the paper's logistic loss) or ``ipo``.
      mask: optional [B], nonzero for real pairs.
      normalizer: as in ``dpo_loss``.

    Returns:
      ``(loss, metrics)`` exactly as ``dpo_loss``.
    """
    return dpo_loss(
        policy_real_logp,
        policy_generated_logp,
        opponent_real_logp,
        opponent_generated_logp,
        beta=beta,
        variant=variant,
        mask=mask,
        normalizer=normalizer,
    )
