"""The Bradley-Terry objective of a reward model on preference pairs.

A reward model is the decoder backbone with a scalar head (`models.reward`),
scored at the last real token of prompt + response; the loss of a
`batch.PairBatch` is `algorithms.bradley_terry_loss` of the chosen and the
rejected scores, averaged over the full batch's real pairs.

Dimension legend (docs/dimensions.md): B pairs, T positions.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from ouroboros_jax.algorithms import bradley_terry_loss
from ouroboros_jax.batch import PairBatch
from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.reward import reward_scores
from ouroboros_jax.models.transformer import Params
from ouroboros_jax.objectives.base import Metrics, Objective
from ouroboros_jax.objectives.preference import combine_pair_metrics, pair_count


def bradley_terry(model_config: ModelConfig, *, center_coef: float = 0.0) -> Objective:
    """Pairwise Bradley-Terry loss of a reward model (parameters with the score head `score_D`).

    Args:
      model_config: the reward model's architecture.
      center_coef: weight of the centring penalty `(c + r) ** 2` (TRL's
        `center_rewards_coefficient`).

    Returns:
      The objective; its metrics are `bradley_terry_loss`'s and `num_pairs`.
    """

    def loss(params: Params, ref_params: Params | None, batch: PairBatch,
             count: Float[Array, ""]) -> tuple[Float[Array, ""], Metrics]:
        del ref_params
        B = batch.pair_mask.shape[0]
        tokens = jnp.concatenate([batch.chosen_tokens, batch.rejected_tokens])
        mask = jnp.concatenate([batch.chosen_mask, batch.rejected_mask])
        scores = reward_scores(params, model_config, tokens, mask)
        value, metrics = bradley_terry_loss(scores[:B], scores[B:], center_coef=center_coef,
                                            mask=batch.pair_mask, normalizer=count)
        return value, metrics | {"num_pairs": jnp.sum(batch.pair_mask.astype(jnp.float32))}

    return Objective(pair_count, loss, combine_pair_metrics)
