"""On-policy distillation: the student's per-token reverse KL to a teacher, on the student's own samples.

The student samples completions; the loss pulls its distribution toward the
teacher's at every sampled token. Per completion token t with the student's
log-prob `s_t` and the teacher's `q_t` of the sampled token, the reverse KL
`KL(student || teacher)` at that position is estimated by `s_t - q_t`, and its
gradient by the score-function form

    loss = agg( stop_gradient(s_t - q_t) * s_t )

(a policy gradient with per-token advantage `-(s_t - q_t)`), as verl, TRL's
GKD (`lmbda=1`, on-policy) and NeMo-RL ship it. The teacher is a second
parameter set through the same forward (`models.policy_logprobs`): it sits in
the training state's reference slot (`TrainState.ref_params`), so it must have
the student's architecture and parameter shardings; replace the state's
reference with it after `init_train_state(..., with_reference=True)`.

Dimension legend (docs/dimensions.md): B rows, T positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ouroboros_jax.algorithms import aggregate_loss, masked_mean
from ouroboros_jax.batch import Batch
from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.logprobs import DEFAULT_CHUNK, policy_logprobs
from ouroboros_jax.models.transformer import Params
from ouroboros_jax.objectives.base import SUMMED, Metrics, Objective, combine_metrics
from ouroboros_jax.objectives.policy import loss_tokens


def distill(
    model_config: ModelConfig, *, temperature: float = 1.0, logprob_chunk: int = DEFAULT_CHUNK
) -> Objective:
    """Per-token reverse KL from the student's samples (`Batch`) to the teacher in `ref_params`.

    Args:
      model_config: the student's (and teacher's) architecture.
      temperature: logits of both are divided by it (the sampling temperature).
      logprob_chunk: positions per chunk of the output projection.

    Returns:
      The objective (`uses_reference=True`: the state holds the teacher).
      Metrics: `distill_kl` (token mean of `s_t - q_t`, the reverse-KL
      estimate), `loss`, `distill_loss`, `num_tokens`.
    """

    def normalizer(batch: Batch) -> Float[Array, ""]:
        return jnp.maximum(jnp.sum(loss_tokens(batch).astype(jnp.float32)), 1.0)

    def loss(params: Params, teacher: Params | None, batch: Batch,
             count: Float[Array, ""]) -> tuple[Float[Array, ""], Metrics]:
        if teacher is None:
            raise ValueError("distill: the training state holds no teacher (init_train_state with "
                             "with_reference=True, then state._replace(ref_params=teacher_params))")
        logprobs = functools.partial(
            policy_logprobs, model_config=model_config, tokens=batch.tokens,
            attention_mask=batch.attention_mask, temperature=temperature, chunk_size=logprob_chunk,
            with_entropy=False, start=batch.loss_start)
        student, _ = logprobs(params)
        teacher_logp, _ = logprobs(jax.lax.stop_gradient(teacher))
        mask = loss_tokens(batch)
        gap = jax.lax.stop_gradient(student - teacher_logp)
        value = aggregate_loss(gap * student, mask, "token_mean", normalizer=count)
        metrics = {"loss": value, "distill_loss": value, "distill_kl": masked_mean(gap, mask),
                   "num_tokens": jnp.sum(mask.astype(jnp.float32))}
        return value, metrics

    def combine(metrics_M: Metrics, batch: Batch) -> Metrics:
        del batch
        return combine_metrics(metrics_M, lambda name: "num_tokens", summed=(*SUMMED, "distill_loss"))

    return Objective(normalizer, loss, combine, uses_reference=True)
