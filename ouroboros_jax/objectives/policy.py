"""Policy-gradient objectives on token rows: the GRPO family (GRPO, Dr. GRPO, DAPO, GSPO) and SFT.

The loss of a `batch.Batch` is `algorithms.policy_loss` of the policy's
per-token log-probs (chunked over positions, `models.policy_logprobs`), with
reference log-probs when a KL term is on (from `batch.ref_logp`, or computed
from the state's reference parameters) and the entropy bonus when asked.

The full-batch counts are the aggregation's data-dependent denominator: the
number of loss tokens for `token_mean`, of rows with a loss token for the
`seq_mean_*` modes.

Dimension legend (docs/dimensions.md): B rows, T positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from ouroboros_jax.algorithms import Aggregation, KLKind, PolicyVariant, importance_weights, policy_loss
from ouroboros_jax.batch import Batch
from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.logprobs import DEFAULT_CHUNK, policy_logprobs
from ouroboros_jax.models.transformer import Params
from ouroboros_jax.objectives.base import Metrics, Objective, combine_metrics


def loss_tokens(batch: Batch) -> Bool[Array, "B T"]:
    """The loss mask, from `batch.loss_start` on (the output head does not run before it)."""
    if not batch.loss_start:
        return batch.loss_mask
    return batch.loss_mask & (jnp.arange(batch.tokens.shape[1]) >= batch.loss_start)


def _count(mask: Bool[Array, "B T"], aggregation: Aggregation) -> Float[Array, ""]:
    """The aggregation's denominator: loss tokens (`token_mean`) or rows with a loss token."""
    if aggregation == "token_mean":
        count = jnp.sum(mask.astype(jnp.float32))
    else:
        count = jnp.sum(jnp.any(mask, axis=-1).astype(jnp.float32))
    return jnp.maximum(count, 1.0)


def off_policy_weights(
    old_logp: Float[Array, "B T"],
    rollout_logp: Float[Array, "B T"] | None,
    mask: Bool[Array, "B T"],
    *,
    level: str,
    upper: float | None,
    lower: float | None,
) -> tuple[Float[Array, "B T"] | None, Metrics]:
    """The per-token factor of a policy loss for tokens sampled by another policy, and its metrics.

    `algorithms.importance_weights(old_logp, rollout_logp, ...)` (TIS, or
    IcePop with `lower`) and its `is_*` / `mismatch_*` metrics; `(None, {})`
    when the correction is off (`upper` None) or the batch has no sampler
    log-probs. Every objective with a policy loss (the GRPO family, the PPO
    actor) takes its weights from here.
    """
    if upper is None or rollout_logp is None:
        return None, {}
    return importance_weights(old_logp, rollout_logp, mask, level=level, upper=upper, lower=lower)


def policy_gradient(
    model_config: ModelConfig,
    *,
    variant: PolicyVariant,
    clip_low: float,
    clip_high: float,
    aggregation: Aggregation,
    dual_clip: float | None = None,
    max_len: int | None = None,
    kl_coef: float = 0.0,
    kl_kind: KLKind = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    importance_level: str = "token",
    importance_upper: float | None = None,
    importance_lower: float | None = None,
    logprob_chunk: int = DEFAULT_CHUNK,
) -> Objective:
    """The GRPO-family policy loss of `algorithms.policy_loss` as an objective on a `Batch`.

    Args:
      model_config: the architecture (static; `compute_dtype` and `remat` apply).
      variant, clip_low, clip_high, aggregation, dual_clip, kl_kind: as in
        `algorithms.policy_loss`.
      max_len: Dr. GRPO's constant normaliser (the maximum completion length);
        required for `seq_mean_token_sum_norm`, where the default T would be
        the prompt-plus-completion width of the batch.
      kl_coef: weight of the KL term; needs `batch.ref_logp` or reference
        parameters in the state (`uses_reference` is set when it is nonzero).
      entropy_coef: weight of the entropy bonus.
      temperature: the sampling temperature; logits are divided by it.
      importance_level, importance_upper, importance_lower: truncated
        importance weights between `batch.old_logp` and `batch.rollout_logp`
        (`off_policy_weights`), a per-token factor on the policy loss, used
        when `importance_upper` is set and the batch has `rollout_logp`.
      logprob_chunk: positions per chunk of the output projection.

    Returns:
      The objective. Its metrics are those of `policy_loss`, plus the `is_*` /
      `mismatch_*` metrics of `algorithms.importance_weights` when weighted.

    Raises:
      ValueError: `seq_mean_token_sum_norm` without `max_len`.
    """
    if aggregation == "seq_mean_token_sum_norm" and max_len is None:
        raise ValueError("aggregation 'seq_mean_token_sum_norm' needs max_len (the max completion length)")

    def normalizer(batch: Batch) -> Float[Array, ""]:
        return _count(loss_tokens(batch), aggregation)

    def loss(params: Params, ref_params: Params | None, batch: Batch,
             count: Float[Array, ""]) -> tuple[Float[Array, ""], Metrics]:
        logprobs = functools.partial(
            policy_logprobs, model_config=model_config, tokens=batch.tokens,
            attention_mask=batch.attention_mask, temperature=temperature, chunk_size=logprob_chunk,
            start=batch.loss_start)
        logp, entropy = logprobs(params)
        if entropy_coef == 0:
            # Entropy is a metric only; no backward pass through it.
            entropy = jax.lax.stop_gradient(entropy)
        ref_logp = batch.ref_logp
        if ref_logp is None and ref_params is not None:
            ref_logp, _ = logprobs(jax.lax.stop_gradient(ref_params), with_entropy=False)
        mask = loss_tokens(batch)
        weights, is_metrics = off_policy_weights(
            batch.old_logp, batch.rollout_logp, mask, level=importance_level, upper=importance_upper,
            lower=importance_lower)
        total, metrics = policy_loss(
            logp, batch.old_logp, batch.advantages, mask,
            ref_logp=None if ref_logp is None else jax.lax.stop_gradient(ref_logp), entropy=entropy,
            entropy_coef=entropy_coef, normalizer=count, variant=variant, clip_low=clip_low,
            clip_high=clip_high, aggregation=aggregation, dual_clip=dual_clip, max_len=max_len,
            kl_coef=kl_coef, kl_kind=kl_kind, importance_weights=weights)
        return total, metrics | is_metrics

    def combine(metrics_M: Metrics, batch: Batch) -> Metrics:
        # Advantage statistics are over rows when advantages are per row, over tokens otherwise.
        per_row = batch.advantages.ndim == 1
        return combine_metrics(metrics_M, lambda name: "num_sequences" if per_row and name.startswith(
            "advantage") else "num_tokens")

    return Objective(normalizer, loss, combine, uses_reference=kl_coef != 0)


def sft(
    model_config: ModelConfig, *, temperature: float = 1.0, logprob_chunk: int = DEFAULT_CHUNK
) -> Objective:
    """Supervised fine-tuning: advantage-weighted negative log-likelihood, averaged over loss tokens.

    The "sft" variant of `policy_gradient` (no ratio, no clip, no KL): with
    advantage 1 it is the likelihood of the completions (a warm-start); with a
    verified reward it is rejection-sampling fine-tuning (expert iteration).
    """
    return policy_gradient(model_config, variant="sft", clip_low=0.0, clip_high=0.0, aggregation="token_mean",
                           temperature=temperature, logprob_chunk=logprob_chunk)
