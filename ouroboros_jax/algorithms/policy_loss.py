"""The GRPO-family policy loss: one variant, one aggregation, optional KL and entropy.

    loss = agg(l_pg) + kl_coef * agg(kl(pi || pi_ref)) - entropy_coef * agg(H)

with ``l_pg`` the per-token loss of the variant (``ppo_clip``, ``gspo``,
``gspo_token``, ``cispo``, ``sapo``, or ``sft``: advantage-weighted
log-likelihood without a ratio), optionally times a per-token importance
weight for off-policy rollouts (see ``importance``), ``agg`` the chosen
aggregation mode (see ``aggregation``) and ``kl`` the chosen per-token
estimator (see ``kl``). The KL term is inside the objective, as in GRPO (Shao
et al. 2024, arXiv 2402.03300, eq. 3), not folded into the reward.

Masking. Inputs are zeroed at masked positions with ``jnp.where`` before any
arithmetic, so padded log-probs may hold anything (NaN, -inf): the loss, the
metrics and the gradient stay finite, and masked tokens get exactly zero
gradient. ``old_logp``, ``ref_logp`` and ``advantages`` are constants of the
objective and pass through ``stop_gradient``.

Dimension legend: B batch (sequences), T time (completion tokens).
"""

from __future__ import annotations

import typing
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from ouroboros_jax.algorithms.aggregation import (
    AGGREGATIONS,
    Aggregation,
    aggregate_loss,
    masked_max,
    masked_mean,
    masked_min,
    masked_std,
    valid_sequences,
)
from ouroboros_jax.algorithms.cispo import cispo_terms
from ouroboros_jax.algorithms.gspo import gspo_terms, gspo_token_terms
from ouroboros_jax.algorithms.kl import KL_KINDS, KLKind, kl_penalty
from ouroboros_jax.algorithms.ppo_clip import SurrogateTerms, ppo_clip_terms
from ouroboros_jax.algorithms.sapo import sapo_terms
from ouroboros_jax.algorithms.sft import sft_terms

PolicyVariant = Literal["ppo_clip", "gspo", "gspo_token", "cispo", "sapo", "sft"]
POLICY_VARIANTS: tuple[str, ...] = typing.get_args(PolicyVariant)

Metrics = dict[str, Float[Array, ""]]


def _variant_terms(
    variant: PolicyVariant,
    logp: Float[Array, "B T"],
    old_logp: Float[Array, "B T"],
    advantages: Float[Array, "B T"],
    mask: Shaped[Array, "B T"],
    *,
    tau_pos: float | Float[Array, ""],
    tau_neg: float | Float[Array, ""],
    **clip,
) -> SurrogateTerms:
    """The single dispatch from a variant name to its per-token loss."""
    match variant:
        case "ppo_clip":
            return ppo_clip_terms(logp, old_logp, advantages, mask, **clip)
        case "gspo":
            return gspo_terms(logp, old_logp, advantages, mask, **clip)
        case "gspo_token":
            return gspo_token_terms(logp, old_logp, advantages, mask, **clip)
        case "cispo":
            return cispo_terms(logp, old_logp, advantages, mask, **clip)
        case "sapo":
            return sapo_terms(logp, old_logp, advantages, mask, tau_pos=tau_pos, tau_neg=tau_neg)
        case "sft":
            return sft_terms(logp, old_logp, advantages, mask, **clip)
        case _:
            raise ValueError(f"unknown policy loss {variant!r}; expected one of {POLICY_VARIANTS}")


def _check_static(
    aggregation: str, kl_kind: str, ref_logp, kl_coef, entropy, entropy_coef, dual_clip, tau_pos, tau_neg
) -> None:
    """Fail early, with the offending argument named, on bad static choices."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    if kl_kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kl_kind!r}; expected one of {KL_KINDS}")
    if ref_logp is None and isinstance(kl_coef, int | float) and kl_coef != 0:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp (the reference log-probs)")
    if entropy is None and isinstance(entropy_coef, int | float) and entropy_coef != 0:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy (the per-token entropy)")
    if isinstance(dual_clip, int | float) and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (the constant c of dual-clip PPO): {dual_clip}")
    for name, tau in (("tau_pos", tau_pos), ("tau_neg", tau_neg)):
        if isinstance(tau, int | float) and tau <= 0:
            raise ValueError(f"{name} must be > 0 (a SAPO gate temperature): {tau}")


def _per_token(
    x: Float[Array, " B"] | Float[Array, "B T"],
    mask: Shaped[Array, "B T"],
    dtype,
) -> Float[Array, "B T"]:
    """A constant of the objective (advantages, importance weights) per token.

    Per-sequence [B] values are broadcast over tokens; the result carries no
    gradient and is zero off the mask.
    """
    x = jax.lax.stop_gradient(jnp.asarray(x, dtype))
    if x.ndim == 1:
        x = x[:, None]
    x = jnp.broadcast_to(x, mask.shape)
    return jnp.where(mask != 0, x, jnp.zeros_like(x))


def _advantage_metrics(
    advantages: Float[Array, " B"] | Float[Array, "B T"], mask: Shaped[Array, "B T"], dtype
) -> Metrics:
    """Advantage statistics: over sequences for [B] inputs, over tokens for [B, T]."""
    advantages = jnp.asarray(advantages, dtype)
    where = valid_sequences(mask) if advantages.ndim == 1 else mask != 0
    advantages = jnp.where(where, advantages, jnp.zeros_like(advantages))
    return {
        "advantage_mean": masked_mean(advantages, where),
        "advantage_std": masked_std(advantages, where),
        "advantage_min": masked_min(advantages, where),
        "advantage_max": masked_max(advantages, where),
    }


def _surrogate_metrics(
    terms: SurrogateTerms,
    logp: Float[Array, "B T"],
    old_logp: Float[Array, "B T"],
    mask: Shaped[Array, "B T"],
) -> Metrics:
    """Clip fractions, ratio statistics and the approximate KL to the old policy.

    Fractions and means are over completion tokens (a sequence-level ratio
    counts once per token of its sequence). ``kl_old_*`` estimate
    ``KL(pi_old || pi)`` from tokens sampled by ``pi_old``.
    """
    dtype = terms.loss.dtype
    low, high, dual = (x.astype(dtype) for x in (terms.clipped_low, terms.clipped_high, terms.clipped_dual))
    ratio = jax.lax.stop_gradient(terms.ratio)
    logp, old_logp = jax.lax.stop_gradient((logp, old_logp))
    metrics = {
        "clip_frac_low": masked_mean(low, mask),
        "clip_frac_high": masked_mean(high, mask),
        "clip_frac_dual": masked_mean(dual, mask),
        "clip_frac": masked_mean(low + high + dual, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_min": masked_min(ratio, mask),
        "ratio_max": masked_max(ratio, mask),
        "kl_old_k1": masked_mean(kl_penalty(old_logp, logp, "k1"), mask),
        "kl_old_k3": masked_mean(kl_penalty(old_logp, logp, "k3"), mask),
    }
    if terms.gate_weight is not None:
        metrics["gate_weight_mean"] = masked_mean(terms.gate_weight.astype(dtype), mask)
    return metrics


def policy_loss(
    logp: Float[Array, "B T"],
    old_logp: Float[Array, "B T"],
    advantages: Float[Array, " B"] | Float[Array, "B T"],
    mask: Shaped[Array, "B T"],
    *,
    variant: PolicyVariant,
    clip_low: float,
    clip_high: float,
    aggregation: Aggregation,
    dual_clip: float | None = None,
    ref_logp: Float[Array, "B T"] | None = None,
    kl_coef: float | Float[Array, ""] = 0.0,
    kl_kind: KLKind = "k3",
    max_len: int | float | None = None,
    entropy: Float[Array, "B T"] | None = None,
    entropy_coef: float | Float[Array, ""] = 0.0,
    normalizer: float | Float[Array, ""] | None = None,
    tau_pos: float | Float[Array, ""] = 1.0,
    tau_neg: float | Float[Array, ""] = 1.05,
    importance_weights: Float[Array, " B"] | Float[Array, "B T"] | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """Clipped policy-gradient loss of the GRPO family, with its metrics.

    Args:
      logp: per-token log-probs of the completions under the current policy.
      old_logp: per-token log-probs under the policy that sampled them.
      advantages: per-sequence [B] or per-token [B, T] advantages.
      mask: 1 (or True) for completion tokens, 0 for prompt and padding.
      variant: ``ppo_clip`` (token ratios; GRPO, DAPO), ``gspo`` (sequence
        ratio clipped per sequence), ``gspo_token`` (sequence ratio carried
        per token with a stop-gradient), ``cispo`` (clipped ratio as a
        constant weight on ``-A * logp``; MiniMax-M1), ``sapo`` (sigmoid gate
        on the token ratio; Gao et al. 2025) or ``sft`` (``-A * logp``).
      clip_low: the ratio is clipped below at ``1 - clip_low`` (``sapo``, ``sft``: unused).
      clip_high: the ratio is clipped above at ``1 + clip_high`` (``sapo``, ``sft``: unused).
      aggregation: ``token_mean``, ``seq_mean_token_mean``, ``seq_mean_token_sum``
        or ``seq_mean_token_sum_norm``; applies to every term.
      dual_clip: constant ``c > 1`` of dual-clip PPO for negative advantages;
        None turns it off (``ppo_clip``, ``gspo``, ``gspo_token`` only).
      ref_logp: per-token log-probs under the reference policy; enables the
        KL term and the ``kl_ref`` metric.
      kl_coef: weight of the KL term (GRPO's beta).
      kl_kind: ``k1``, ``k2`` or ``k3`` estimator of ``KL(pi || pi_ref)``.
      max_len: constant normaliser of ``seq_mean_token_sum_norm`` (default T).
      entropy: per-token entropy of the current policy; enables the entropy
        bonus and the ``entropy`` metric.
      entropy_coef: weight of the entropy bonus (subtracted from the loss).
      normalizer: overrides the aggregation's data-dependent denominator (see
        ``aggregate_loss``), e.g. for micro-batch accumulation.
      tau_pos: SAPO's gate temperature for positive advantages (paper: 1.0).
      tau_neg: SAPO's gate temperature for other advantages (paper: 1.05).
      importance_weights: per-token [B, T] or per-sequence [B] factor on the
        policy-gradient term only (not KL or entropy), e.g. from
        ``importance_weights`` for rollouts from another sampler; no gradient.

    Returns:
      ``(loss, metrics)``: the scalar loss to minimise and a dict of scalars:
      ``loss``, ``pg_loss``, ``clip_frac``, ``clip_frac_low``, ``clip_frac_high``,
      ``clip_frac_dual``, ``ratio_mean``, ``ratio_min``, ``ratio_max``, ``kl_old_k1``,
      ``kl_old_k3``, ``advantage_mean``, ``advantage_std``, ``advantage_min``,
      ``advantage_max``, ``num_tokens``, ``num_sequences``; for ``sapo`` also
      ``gate_weight_mean`` (mean gradient scale of the gate); with ``ref_logp`` also
      ``kl_ref`` (token mean of the estimator) and ``kl_loss`` (the weighted
      term); with ``entropy`` also ``entropy`` (token mean) and ``entropy_loss``.

    Raises:
      ValueError: for an unknown variant, aggregation or KL kind, a nonzero
        ``kl_coef`` without ``ref_logp`` (or ``entropy_coef`` without
        ``entropy``), ``dual_clip <= 1`` or a gate temperature ``<= 0``.
    """
    _check_static(aggregation, kl_kind, ref_logp, kl_coef, entropy, entropy_coef, dual_clip, tau_pos, tau_neg)
    dtype = jnp.promote_types(logp.dtype, jnp.float32)
    keep = mask != 0

    def clean(x: Array) -> Array:
        x = jnp.asarray(x, dtype)
        return jnp.where(keep, x, jnp.zeros_like(x))

    logp = clean(logp)
    old_logp = jax.lax.stop_gradient(clean(old_logp))
    token_advantages = _per_token(advantages, keep, dtype)
    agg = lambda x: aggregate_loss(x, keep, aggregation, max_len=max_len, normalizer=normalizer)

    clip = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    gate = dict(tau_pos=tau_pos, tau_neg=tau_neg)
    terms = _variant_terms(variant, logp, old_logp, token_advantages, keep, **gate, **clip)
    per_token_pg = terms.loss
    if importance_weights is not None:
        per_token_pg = per_token_pg * _per_token(importance_weights, keep, dtype)
    pg_loss = agg(per_token_pg)
    loss = pg_loss
    metrics = {"pg_loss": pg_loss}
    metrics |= _surrogate_metrics(terms, logp, old_logp, keep)
    metrics |= _advantage_metrics(jax.lax.stop_gradient(advantages), keep, dtype)
    metrics["num_tokens"] = jnp.sum(keep.astype(dtype))
    metrics["num_sequences"] = jnp.sum(valid_sequences(keep).astype(dtype))
    if ref_logp is not None:
        kl = kl_penalty(logp, jax.lax.stop_gradient(clean(ref_logp)), kl_kind)
        metrics["kl_ref"] = masked_mean(jax.lax.stop_gradient(kl), keep)
        metrics["kl_loss"] = kl_coef * agg(kl)
        loss = loss + metrics["kl_loss"]
    if entropy is not None:
        entropy = clean(entropy)
        metrics["entropy"] = masked_mean(jax.lax.stop_gradient(entropy), keep)
        metrics["entropy_loss"] = -entropy_coef * agg(entropy)
        loss = loss + metrics["entropy_loss"]
    metrics["loss"] = loss
    return loss, metrics
