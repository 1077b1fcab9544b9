"""Reward / value model: the decoder backbone with a scalar head.

The head is a vector `score_D` (the weight of a bias-free linear layer to one
output, as Hugging Face's ...ForSequenceClassification with num_labels=1), and a
sequence is scored at its last real (non-pad) token.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.transformer import Params, hidden_states, positions_from_mask


def token_values(
    params: Params, cfg: ModelConfig, tokens: Int[Array, "B T"], mask: Bool[Array, "B T"]
) -> Float[Array, "B T"]:
    """The scalar head at every position (float32); pad positions are zero."""
    positions = positions_from_mask(mask)
    hidden, _ = hidden_states(params, cfg, tokens, positions, mask)
    values = jnp.einsum("BTD,D->BT", hidden, params["score_D"].astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    return jnp.where(mask, values, 0.0)


def reward_scores(
    params: Params, cfg: ModelConfig, tokens: Int[Array, "B T"], mask: Bool[Array, "B T"]
) -> Float[Array, " B"]:
    """One score per sequence, read at its last non-pad token.

    Works for left- and right-padded rows: the last index where `mask` is true.
    """
    values = token_values(params, cfg, tokens, mask)
    T = tokens.shape[1]
    last = T - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]
