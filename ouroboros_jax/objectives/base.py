"""An objective: what the one update step minimises, as a small pure pair of functions.

In the spirit of optax's `(init, update)`, an `Objective` is

- `normalizer(batch) -> counts`: a pytree of full-batch counts (the
  denominators of every mean the loss takes, e.g. the number of loss tokens),
  counted once over the whole mini-batch;
- `loss(params, ref_params, batch, counts) -> (loss, metrics)`: the loss of a
  batch (or of one micro-batch of it), divided by those full-batch counts.

Because the denominators are the full batch's, each micro-batch's loss is its
exact share of the full-batch loss, and the gradients of the micro-batches sum
to the full-batch gradient, whatever the aggregation. `combine(metrics_M,
batch)` then turns per-micro-batch metrics (each [M]) into full-batch ones;
`combine_metrics` is the rule set most objectives use. `uses_reference` says
whether the training state should hold frozen reference parameters.

An objective binds a model forward (`models.policy_logprobs`,
`models.reward_scores`) to a pure loss of `ouroboros_jax.algorithms`; it takes
explicit values, never a config (config adapters live with the trainer).

Dimension legend (docs/dimensions.md): M micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float

Metrics = dict[str, Float[Array, ""]]

# Metrics that are already divided by a full-batch count, and counts: over micro-batches they add up.
SUMMED: tuple[str, ...] = ("loss", "pg_loss", "kl_loss", "entropy_loss", "num_tokens", "num_sequences",
                           "num_pairs")


def combine_metrics(
    metrics_M: Metrics, weight_of: Callable[[str], str], summed: tuple[str, ...] = SUMMED
) -> Metrics:
    """Full-batch metrics from per-micro-batch ones (each [M]), by the metric's name.

    - a name in `summed` (losses already divided by the full-batch count, and
      counts): the sum;
    - `*_min` / `*_max`: the minimum / maximum over micro-batches that count
      anything (weight > 0; an empty micro-batch reports a placeholder 0), and 0
      when none does;
    - `*_std` with a sibling `*_mean`: the pooled standard deviation;
    - anything else is a mean over some unit (tokens, sequences, pairs):
      re-weighted by the count metric `weight_of(name)` of each micro-batch.

    Args:
      metrics_M: the metrics of M micro-batches, each an array [M].
      weight_of: the name of the count metric that weighs metric `name`.
      summed: names that add up.

    Returns:
      One scalar per metric.
    """
    out: Metrics = {}

    def weighted_mean(x, w):
        return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)

    for name, x in metrics_M.items():
        if name in summed:
            out[name] = jnp.sum(x)
            continue
        w = metrics_M[weight_of(name)]
        if name.endswith(("_min", "_max")):
            lowest = name.endswith("_min")
            value = (jnp.min if lowest else jnp.max)(jnp.where(w > 0, x, jnp.inf if lowest else -jnp.inf))
            out[name] = jnp.where(jnp.sum(w) > 0, value, 0.0)
        elif name.endswith("_std") and name[:-4] + "_mean" in metrics_M:
            mean_M = metrics_M[name[:-4] + "_mean"]
            second = weighted_mean(jnp.square(x) + jnp.square(mean_M), w)
            out[name] = jnp.sqrt(jnp.maximum(second - jnp.square(weighted_mean(mean_M, w)), 0.0))
        else:
            out[name] = weighted_mean(x, w)
    return out


class Objective(NamedTuple):
    """What the update step minimises (see the module docstring).

    Attributes:
      normalizer: `batch -> counts`, the full-batch denominators (a pytree of scalars).
      loss: `(params, ref_params, batch, counts) -> (loss, metrics)`; `ref_params`
        is the state's reference (None when it holds none).
      combine: `(metrics_M, batch) -> metrics`, micro-batch metrics [M] to full-batch scalars.
      uses_reference: whether the state needs reference parameters (e.g. a KL term, DPO).
    """

    normalizer: Callable[[Any], Any]
    loss: Callable[[Any, Any, Any, Any], tuple[Float[Array, ""], Metrics]]
    combine: Callable[[Metrics, Any], Metrics]
    uses_reference: bool = False
