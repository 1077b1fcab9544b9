"""Preference objectives on pairs: DPO / IPO against a frozen reference, and SPIN.

The loss of a `batch.PairBatch` takes the summed (or, for IPO's paper form,
averaged) response log-probs of the chosen and the rejected row under the
policy and under the reference (`batch.ref_*_logp` when the producer computed
them, else the state's reference parameters), then `algorithms.dpo_loss`
(`kind="dpo"`, variants "sigmoid" and "ipo") or `algorithms.spin_loss`
(`kind="spin"`). The full-batch count is the number of real pairs.

Dimension legend (docs/dimensions.md): B pairs, T positions (P prompt then C response).
"""

from __future__ import annotations

import typing
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ouroboros_jax.algorithms import DPOVariant, dpo_loss, spin_loss
from ouroboros_jax.batch import PairBatch
from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.logprobs import DEFAULT_CHUNK, policy_logprobs
from ouroboros_jax.models.transformer import Params
from ouroboros_jax.objectives.base import Metrics, Objective, combine_metrics

PreferenceKind = Literal["dpo", "spin"]
PREFERENCE_KINDS: tuple[str, ...] = typing.get_args(PreferenceKind)


def sequence_logps(
    params: Params, model_config: ModelConfig, tokens: Int[Array, "B T"], mask: Bool[Array, "B T"], *,
    start: int, average: bool = False, chunk_size: int = DEFAULT_CHUNK,
) -> Float[Array, " B"]:
    """Summed (or, with `average`, mean) log-prob of each row's tokens from position `start` on."""
    logp, _ = policy_logprobs(params, model_config, tokens, mask, with_entropy=False, start=start,
                              chunk_size=chunk_size)
    response = mask & (jnp.arange(tokens.shape[1]) >= start)
    total = jnp.sum(jnp.where(response, logp, 0.0), axis=1)
    if average:
        total = total / jnp.maximum(jnp.sum(response, axis=1), 1)
    return total


def pair_count(batch: PairBatch) -> Float[Array, ""]:
    """The number of real pairs (at least 1): the full-batch denominator of pairwise means."""
    return jnp.maximum(jnp.sum(batch.pair_mask.astype(jnp.float32)), 1.0)


def combine_pair_metrics(metrics_M: Metrics, batch: PairBatch) -> Metrics:
    """Pairwise metrics are means over real pairs: weighted by each micro-batch's `num_pairs`."""
    del batch
    return combine_metrics(metrics_M, lambda name: "num_pairs")


def preference(
    model_config: ModelConfig, *, beta: float, kind: PreferenceKind = "dpo", variant: DPOVariant = "sigmoid",
    label_smoothing: float = 0.0, average_logps: bool = False, logprob_chunk: int = DEFAULT_CHUNK,
) -> Objective:
    """DPO / IPO (`kind="dpo"`) or SPIN (`kind="spin"`) as an objective on a `PairBatch`.

    Args:
      model_config: the policy's architecture.
      beta: DPO's beta (IPO's tau, SPIN's lambda).
      kind: "dpo" (`algorithms.dpo_loss`) or "spin" (`algorithms.spin_loss`:
        the reference is the previous iteration's model).
      variant: "sigmoid" or "ipo".
      label_smoothing: conservative DPO's flip probability ("dpo", "sigmoid" only).
      average_logps: use the mean response log-prob instead of the sum (IPO's paper form).
      logprob_chunk: positions per chunk of the output projection.

    Returns:
      The objective (it uses reference parameters unless every batch carries
      `ref_chosen_logp` / `ref_rejected_logp`). Metrics: those of `dpo_loss`
      and `num_pairs`.
    """
    if kind not in PREFERENCE_KINDS:
        raise ValueError(f"unknown preference objective {kind!r}; expected one of {PREFERENCE_KINDS}")

    def loss(params: Params, ref_params: Params | None, batch: PairBatch,
             count: Float[Array, ""]) -> tuple[Float[Array, ""], Metrics]:
        B = batch.pair_mask.shape[0]
        tokens = jnp.concatenate([batch.chosen_tokens, batch.rejected_tokens])
        mask = jnp.concatenate([batch.chosen_mask, batch.rejected_mask])
        logps = lambda p: sequence_logps(p, model_config, tokens, mask, start=batch.loss_start,
                                         average=average_logps, chunk_size=logprob_chunk)
        if batch.ref_chosen_logp is not None and batch.ref_rejected_logp is not None:
            ref = jnp.concatenate([batch.ref_chosen_logp, batch.ref_rejected_logp])
        elif ref_params is not None:
            ref = logps(ref_params)
        else:
            raise ValueError("preference objective: the batch has no reference log-probs and the state no "
                             "ref_params (make the state with with_reference=True)")
        ref = jax.lax.stop_gradient(ref)
        policy = logps(params)
        args = (policy[:B], policy[B:], ref[:B], ref[B:])
        match kind:
            case "dpo":
                value, metrics = dpo_loss(*args, beta=beta, variant=variant, label_smoothing=label_smoothing,
                                          mask=batch.pair_mask, normalizer=count)
            case "spin":
                value, metrics = spin_loss(*args, beta=beta, variant=variant, mask=batch.pair_mask,
                                           normalizer=count)
        return value, metrics | {"num_pairs": jnp.sum(batch.pair_mask.astype(jnp.float32))}

    return Objective(pair_count, loss, combine_pair_metrics, uses_reference=True)
