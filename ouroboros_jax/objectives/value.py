"""PPO with a critic: the value objective, the actor(-critic) objective, and critic initialisation.

A critic is the decoder backbone with a scalar head `score_D` (`models.reward`).
Its value at token t is read from the hidden state before it (position t - 1,
the state in which token t is chosen), aligned as the log-probs are.

Two layouts, chosen by which objective runs:

- separate critic: its own parameters (`init_critic` from the policy or from a
  reward model), trained by `value` through the one update step with its own
  optimizer; the policy is trained by `ppo_actor`.
- shared backbone: one parameter set holding the LM head and `score_D`;
  `ppo_actor(..., value_coef=c)` computes the per-token log-probs and the
  values from the same forward (one `hidden_states` call) and adds
  `c * value_loss` to the policy loss.

`ppo_actor` also carries the off-policy correction: when the batch has the
sampler's log-probs (`PPOBatch.rollout_logp`) and `importance_upper` is set,
`algorithms.importance_weights` (TIS, or IcePop with `importance_lower`)
multiply the per-token policy loss, and their metrics are logged, as in the
GRPO family (`objectives.policy.off_policy_weights`, shared by both).

Dimension legend (docs/dimensions.md): B rows, T positions, D model.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ouroboros_jax.algorithms import (
    Aggregation,
    KLKind,
    PolicyVariant,
    policy_loss,
    value_loss,
)
from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.logprobs import DEFAULT_CHUNK, token_logprobs
from ouroboros_jax.models.transformer import Params, hidden_states, lm_head, param_specs, positions_from_mask
from ouroboros_jax.objectives.base import SUMMED, Metrics, Objective, combine_metrics
from ouroboros_jax.objectives.policy import off_policy_weights


@flax.struct.dataclass
class PPOBatch:
    """Token rows for PPO: what `batch.Batch` holds, plus the critic's targets and the sampler's log-probs.

    Attributes:
      tokens, attention_mask, loss_mask, old_logp: as in `batch.Batch`
        (`old_logp`: the trainer's log-probs before the update, the ratio's denominator).
      advantages: [B, T] per-token advantages (e.g. `algorithms.gae_advantages`).
      returns: [B, T] value targets.
      old_values: [B, T] the critic's values before the update (the value clip's centre).
      ref_logp: optional [B, T] reference log-probs for a KL term in the loss.
      rollout_logp: optional [B, T] log-probs under the policy that sampled
        the tokens; with `importance_upper` they give the importance weights.
      loss_start: (static) first position that can carry a loss token.
    """

    tokens: Int[Array, "B T"]
    attention_mask: Bool[Array, "B T"]
    loss_mask: Bool[Array, "B T"]
    old_logp: Float[Array, "B T"]
    advantages: Float[Array, "B T"]
    returns: Float[Array, "B T"]
    old_values: Float[Array, "B T"]
    ref_logp: Float[Array, "B T"] | None = None
    rollout_logp: Float[Array, "B T"] | None = None
    loss_start: int = flax.struct.field(pytree_node=False, default=0)


def _loss_mask(batch: PPOBatch) -> Bool[Array, "B T"]:
    if not batch.loss_start:
        return batch.loss_mask
    return batch.loss_mask & (jnp.arange(batch.tokens.shape[1]) >= batch.loss_start)


def _hidden(params: Params, cfg: ModelConfig, tokens, attention_mask) -> Float[Array, "B T D"]:
    hidden, _ = hidden_states(params, cfg, tokens, positions_from_mask(attention_mask), attention_mask)
    return hidden


def values_from_hidden(
    params: Params, hidden: Float[Array, "B T D"], *, start: int = 0
) -> Float[Array, "B T"]:
    """Per-token values: `score_D` on the hidden state before each token (float32, 0 before max(start, 1))."""
    first = max(start, 1)
    v = jnp.einsum("BTD,D->BT", hidden[:, first - 1:-1], params["score_D"].astype(hidden.dtype),
                   preferred_element_type=jnp.float32)
    return jnp.pad(v, ((0, 0), (first, 0)))


def logprobs_from_hidden(
    params: Params, cfg: ModelConfig, hidden: Float[Array, "B T D"], tokens: Int[Array, "B T"], *,
    start: int = 0, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK, with_entropy: bool = True,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"] | None]:
    """Per-token log-probs (and entropy) from hidden states, aligned as `models.policy_logprobs`."""
    first = max(start, 1)
    logp, entropy = token_logprobs(hidden[:, first - 1:-1], lm_head(params, cfg), tokens[:, first:],
                                   temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)
    pad = lambda x: jnp.pad(x, ((0, 0), (first, 0)))
    return pad(logp), None if entropy is None else pad(entropy)


def critic_values(
    params: Params, cfg: ModelConfig, tokens: Int[Array, "B T"], attention_mask: Bool[Array, "B T"], *,
    start: int = 0,
) -> Float[Array, "B T"]:
    """The critic's per-token values of a padded batch (the forward `value` trains); 0 on padding."""
    values = values_from_hidden(params, _hidden(params, cfg, tokens, attention_mask), start=start)
    return jnp.where(attention_mask, values, 0.0)


def policy_and_values(
    params: Params, cfg: ModelConfig, tokens: Int[Array, "B T"], attention_mask: Bool[Array, "B T"], *,
    start: int = 0, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Log-probs and values of a shared-backbone model from ONE forward (`params` holds `score_D`)."""
    hidden = _hidden(params, cfg, tokens, attention_mask)
    logp, _ = logprobs_from_hidden(params, cfg, hidden, tokens, start=start, temperature=temperature,
                                   chunk_size=chunk_size, with_entropy=False)
    return logp, jnp.where(attention_mask, values_from_hidden(params, hidden, start=start), 0.0)


def init_critic(source: Params, *, from_: str = "policy") -> Params:
    """Critic parameters initialised from the policy or from a reward model.

    Args:
      source: the policy's parameters (`from_="policy"`: the backbone is
        copied, the LM head dropped, `score_D` starts at zero so the first
        values are 0), or a reward model's (`from_="reward_model"`: copied as
        is, its score head included, as InstructGPT initialises the value model).
      from_: "policy" or "reward_model".

    Returns:
      A new parameter tree (copies; `source` is untouched).
    """
    if from_ == "reward_model":
        if "score_D" not in source:
            raise ValueError("init_critic(from_='reward_model'): the parameters have no score head 'score_D'")
        return jax.tree.map(jnp.copy, source)
    if from_ != "policy":
        raise ValueError(f"init_critic: from_ must be 'policy' or 'reward_model', got {from_!r}")
    critic = {k: jax.tree.map(jnp.copy, v) for k, v in source.items() if k not in ("lm_head_DV", "score_D")}
    critic["score_D"] = jnp.zeros_like(source["final_norm_D"])
    return critic


def with_value_head(policy: Params) -> Params:
    """Shared-backbone parameters: the policy's tree plus a zero `score_D` (the policy is untouched)."""
    return dict(policy) | {"score_D": jnp.zeros_like(policy["final_norm_D"])}


def shared_param_specs(cfg: ModelConfig) -> Params:
    """`param_specs` of a shared-backbone model: the LM's and the score head."""
    return param_specs(cfg) | {"score_D": param_specs(cfg, head="score")["score_D"]}


def _token_count(batch: PPOBatch) -> Float[Array, ""]:
    return jnp.maximum(jnp.sum(_loss_mask(batch).astype(jnp.float32)), 1.0)


def _combine(metrics_M: Metrics, batch: PPOBatch) -> Metrics:
    del batch
    summed = (*SUMMED, "value_loss", "distill_loss")
    return combine_metrics(metrics_M, lambda name: "num_tokens", summed=summed)


def value(model_config: ModelConfig, *, clip_range: float | None = 0.2) -> Objective:
    """The critic's objective: PPO's clipped value loss (token mean) on a `PPOBatch`.

    The critic is its own parameter set (`init_critic`; specs
    `models.param_specs(cfg, head="score")`) with its own optimizer; run it
    through `step.make_train_step` as any objective.

    Args:
      model_config: the critic's architecture.
      clip_range: the value clip `eps` (None: no clip).

    Returns:
      The objective; metrics are those of `algorithms.value_loss`, `loss` and `num_tokens`.
    """

    def loss(params: Params, ref_params: Params | None, batch: PPOBatch,
             count: Float[Array, ""]) -> tuple[Float[Array, ""], Metrics]:
        del ref_params
        mask = _loss_mask(batch)
        v = critic_values(params, model_config, batch.tokens, batch.attention_mask, start=batch.loss_start)
        total, metrics = value_loss(v, batch.old_values, batch.returns, mask, clip_range=clip_range,
                                    aggregation="token_mean", normalizer=count)
        return total, metrics | {"loss": total, "num_tokens": jnp.sum(mask.astype(jnp.float32))}

    return Objective(_token_count, loss, _combine)


def ppo_actor(
    model_config: ModelConfig,
    *,
    variant: PolicyVariant = "ppo_clip",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: Aggregation = "token_mean",
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_kind: KLKind = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    value_coef: float = 0.0,
    value_clip: float | None = 0.2,
    importance_level: str = "token",
    importance_upper: float | None = None,
    importance_lower: float | None = None,
    logprob_chunk: int = DEFAULT_CHUNK,
) -> Objective:
    """PPO policy loss on a `PPOBatch`, optionally with a shared-backbone value loss and importance weights.

    Args:
      model_config: the policy's architecture.
      variant, clip_low, clip_high, aggregation, dual_clip, kl_coef, kl_kind,
        entropy_coef: as in `algorithms.policy_loss` (a KL term needs `batch.ref_logp`).
      temperature: the sampling temperature; logits are divided by it.
      value_coef: > 0 for a shared backbone: the parameters hold `score_D`
        (`with_value_head`) and `value_coef * value_loss` of the values of
        the same forward is added to the loss.
      value_clip: the value clip `eps` of the shared value loss.
      importance_level, importance_upper, importance_lower: the truncated
        importance weights of `algorithms.importance_weights` between
        `batch.old_logp` and `batch.rollout_logp`, used when `importance_upper`
        is set and the batch has `rollout_logp`.
      logprob_chunk: positions per chunk of the output projection.

    Returns:
      The objective; metrics are those of `policy_loss`, plus the value
      metrics with a shared backbone and the `is_*` / `mismatch_*` metrics
      with importance weights.
    """
    if value_coef < 0:
        raise ValueError(f"value_coef must be >= 0: {value_coef}")
    if kl_coef and kl_kind not in ("k1", "k2", "k3"):
        raise ValueError(f"unknown kl_kind {kl_kind!r}")

    def loss(params: Params, ref_params: Params | None, batch: PPOBatch,
             counts: dict[str, Float[Array, ""]]) -> tuple[Float[Array, ""], Metrics]:
        del ref_params
        if kl_coef and batch.ref_logp is None:
            raise ValueError("ppo_actor: kl_coef is nonzero but the batch has no ref_logp")
        mask = _loss_mask(batch)
        hidden = _hidden(params, model_config, batch.tokens, batch.attention_mask)
        logp, entropy = logprobs_from_hidden(params, model_config, hidden, batch.tokens,
                                             start=batch.loss_start, temperature=temperature,
                                             chunk_size=logprob_chunk)
        if entropy_coef == 0:
            entropy = jax.lax.stop_gradient(entropy)
        weights, is_metrics = off_policy_weights(
            batch.old_logp, batch.rollout_logp, mask, level=importance_level, upper=importance_upper,
            lower=importance_lower)
        total, metrics = policy_loss(
            logp, batch.old_logp, batch.advantages, mask, variant=variant, clip_low=clip_low,
            clip_high=clip_high, aggregation=aggregation, dual_clip=dual_clip,
            ref_logp=None if batch.ref_logp is None else jax.lax.stop_gradient(batch.ref_logp),
            kl_coef=kl_coef, kl_kind=kl_kind, entropy=entropy, entropy_coef=entropy_coef,
            normalizer=counts["policy"], importance_weights=weights)
        metrics = metrics | is_metrics
        if value_coef > 0:
            v = values_from_hidden(params, hidden, start=batch.loss_start)
            v_loss, v_metrics = value_loss(v, batch.old_values, batch.returns, mask, clip_range=value_clip,
                                           aggregation="token_mean", normalizer=counts["tokens"])
            total = total + value_coef * v_loss
            metrics = metrics | v_metrics
        return total, metrics | {"loss": total}

    def normalizer(batch: PPOBatch) -> dict[str, Float[Array, ""]]:
        tokens = _token_count(batch)
        if aggregation == "token_mean":
            return {"policy": tokens, "tokens": tokens}
        rows = jnp.sum(jnp.any(_loss_mask(batch), axis=-1).astype(jnp.float32))
        return {"policy": jnp.maximum(rows, 1.0), "tokens": tokens}

    return Objective(normalizer, loss, _combine)
