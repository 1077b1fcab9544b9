"""Masked reductions and the loss aggregation modes of the GRPO family.

A policy loss is first computed per token, ``loss[B, T]``, and then reduced to a
scalar. How it is reduced is a real algorithmic choice: it decides how much
weight a long completion gets relative to a short one.

With ``m`` the completion mask, ``n_i = sum_t m[i, t]`` the length of sequence
``i`` and ``S`` the number of sequences with at least one completion token
(fully masked rows are padding and do not count):

- ``token_mean`` (DAPO, Yu et al. 2025, arXiv 2503.14476)::

      sum_{i,t} m loss / sum_{i,t} m

- ``seq_mean_token_mean`` (original GRPO, Shao et al. 2024, arXiv 2402.03300)::

      (1 / S) sum_i (sum_t m loss) / n_i

- ``seq_mean_token_sum``::

      (1 / S) sum_i sum_t m loss

- ``seq_mean_token_sum_norm`` (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783)::

      (1 / S) sum_i (sum_t m loss) / max_len

  with ``max_len`` a constant (the maximum completion length; default ``T``).
  This is TRL's ``dr_grpo`` normalisation; verl's ``seq-mean-token-sum-norm``
  omits the ``1 / S`` factor.

``normalizer`` replaces the data-dependent denominator (``sum m`` for
``token_mean``, ``S`` for the ``seq_mean_*`` modes) by a given value. A caller
that accumulates gradients over micro-batches passes the full-batch count so
that the sum of the micro-batch losses equals the full-batch loss.

Dimension legend: B batch (sequences), T time (completion tokens).
"""

from __future__ import annotations

import typing
from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
AGGREGATIONS: tuple[str, ...] = typing.get_args(Aggregation)


def _weights(x: Array, mask: Array) -> Array:
    """The mask as 0/1 weights in the floating dtype of ``x``."""
    return (mask != 0).astype(x.dtype)


def masked_sum(
    x: Float[Array, "*dims"], mask: Shaped[Array, "*dims"], axis: int | None = None
) -> Float[Array, "*reduced"]:
    """Sum of ``x`` over positions where ``mask`` is nonzero.

    Masked positions are replaced by zero with ``jnp.where`` before the sum, so a
    NaN or inf there neither reaches the result nor its gradient.

    Args:
      x: values.
      mask: same shape as ``x``; nonzero marks the positions that count.
      axis: axis to reduce; None reduces all.

    Returns:
      The masked sum.
    """
    keep = mask != 0
    return jnp.sum(jnp.where(keep, x, jnp.zeros_like(x)), axis=axis)


def masked_mean(
    x: Float[Array, "*dims"], mask: Shaped[Array, "*dims"], axis: int | None = None
) -> Float[Array, "*reduced"]:
    """Mean of ``x`` over positions where ``mask`` is nonzero; 0 where none is.

    Args:
      x: values.
      mask: same shape as ``x``; nonzero marks the positions that count.
      axis: axis to reduce; None reduces all.

    Returns:
      The masked mean, exactly 0 for an empty selection (never NaN).
    """
    count = jnp.sum(_weights(x, mask), axis=axis)
    return masked_sum(x, mask, axis=axis) / jnp.maximum(count, 1.0)


def masked_std(x: Float[Array, "*dims"], mask: Shaped[Array, "*dims"]) -> Float[Array, ""]:
    """Population standard deviation of ``x`` over the masked positions (0 if empty).

    Used for metrics only; the advantage estimators use Bessel's correction.
    """
    mean = masked_mean(x, mask)
    return jnp.sqrt(masked_mean(jnp.square(x - mean), mask))


def masked_min(x: Float[Array, "*dims"], mask: Shaped[Array, "*dims"]) -> Float[Array, ""]:
    """Minimum of ``x`` over the masked positions; 0 if there are none."""
    keep = mask != 0
    value = jnp.min(jnp.where(keep, x, jnp.inf))
    return jnp.where(jnp.any(keep), value, jnp.zeros_like(value))


def masked_max(x: Float[Array, "*dims"], mask: Shaped[Array, "*dims"]) -> Float[Array, ""]:
    """Maximum of ``x`` over the masked positions; 0 if there are none."""
    keep = mask != 0
    value = jnp.max(jnp.where(keep, x, -jnp.inf))
    return jnp.where(jnp.any(keep), value, jnp.zeros_like(value))


def valid_sequences(mask: Shaped[Array, "B T"]) -> Shaped[Array, " B"]:
    """Boolean [B]: sequences with at least one completion token."""
    return jnp.any(mask != 0, axis=-1)


def aggregate_loss(
    loss: Float[Array, "B T"],
    mask: Shaped[Array, "B T"],
    mode: Aggregation,
    *,
    max_len: int | float | None = None,
    normalizer: float | Float[Array, ""] | None = None,
) -> Float[Array, ""]:
    """Reduce a per-token loss to a scalar with one of the aggregation modes.

    Args:
      loss: per-token loss; values at masked positions are ignored (may be NaN).
      mask: completion mask, nonzero for completion tokens.
      mode: one of ``token_mean``, ``seq_mean_token_mean``, ``seq_mean_token_sum``,
        ``seq_mean_token_sum_norm`` (formulas in the module docstring).
      max_len: the constant normaliser of ``seq_mean_token_sum_norm``;
        default ``T``. Ignored by the other modes.
      normalizer: replaces the data-dependent denominator (token count for
        ``token_mean``, number of non-empty sequences for the ``seq_mean_*``
        modes), e.g. the full-batch count under micro-batching.

    Returns:
      The scalar loss.

    Raises:
      ValueError: for an unknown mode.
    """
    per_seq_sum = masked_sum(loss, mask, axis=-1)
    n_tokens = jnp.sum(_weights(loss, mask), axis=-1)
    n_seqs = jnp.sum(valid_sequences(mask).astype(loss.dtype))
    seq_denominator = jnp.maximum(n_seqs, 1.0) if normalizer is None else normalizer
    match mode:
        case "token_mean":
            denominator = jnp.maximum(jnp.sum(n_tokens), 1.0) if normalizer is None else normalizer
            return jnp.sum(per_seq_sum) / denominator
        case "seq_mean_token_mean":
            per_seq = per_seq_sum / jnp.maximum(n_tokens, 1.0)
            return jnp.sum(per_seq) / seq_denominator
        case "seq_mean_token_sum":
            return jnp.sum(per_seq_sum) / seq_denominator
        case "seq_mean_token_sum_norm":
            length = loss.shape[-1] if max_len is None else max_len
            return jnp.sum(per_seq_sum / length) / seq_denominator
        case _:
            raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")
