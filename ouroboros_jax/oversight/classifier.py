"""Small classifiers (MLPs on feature vectors) trained through the one update step.

The oversight experiments (recursive reward modeling, weak-to-strong
supervision) need many small reward models and classifiers trained fast on
CPU. Each is an MLP, `mlp_apply(params, features [B, F]) -> logits [B]`, whose
parameters are a plain pytree; it is trained by `step.make_train_step` on the
`objectives.binary_classification` objective, like every other model here.

Dimension legend (docs/dimensions.md): B rows, F features, H hidden units.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ouroboros_jax.config import MeshConfig
from ouroboros_jax.objectives.classification import binary_classification, label_batch
from ouroboros_jax.sharding import Logical, make_mesh
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step

Params = dict[str, jax.Array]


def init_mlp(rng: jax.Array, num_features: int, hidden: Sequence[int]) -> Params:
    """An MLP F -> H_1 -> ... -> H_n -> 1 (ReLU), He-initialised; `hidden=()` is logistic regression."""
    if num_features < 1:
        raise ValueError(f"init_mlp: num_features must be >= 1 (got {num_features})")
    widths = [num_features, *hidden, 1]
    if any(w < 1 for w in widths):
        raise ValueError(f"init_mlp: every hidden width must be >= 1 (got {tuple(hidden)})")
    params: Params = {}
    keys = jax.random.split(rng, len(widths) - 1)
    for i, (key, fan_in, fan_out) in enumerate(zip(keys, widths[:-1], widths[1:], strict=True)):
        params[f"w{i}"] = jax.random.normal(key, (fan_in, fan_out), jnp.float32) * np.sqrt(2.0 / fan_in)
        params[f"b{i}"] = jnp.zeros((fan_out,), jnp.float32)
    return params


def mlp_apply(params: Params, features: Float[Array, "B F"]) -> Float[Array, " B"]:
    """The MLP's logit of every row."""
    layers = len(params) // 2
    x = features
    for i in range(layers):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < layers - 1:
            x = jax.nn.relu(x)
    return x[:, 0]


def mlp_specs(params: Params) -> dict[str, Logical]:
    """Replicated logical specs of an MLP's parameters (they are small)."""
    return {k: Logical(tuple(v.shape), (None,) * v.ndim) for k, v in params.items()}


@dataclasses.dataclass
class ClassifierResult:
    params: Params
    history: list[dict[str, float]]


def train_classifier(
    params: Params, features: Float[np.ndarray, "B F"], targets: Float[np.ndarray, " B"], *,
    steps: int, batch_size: int, learning_rate: float, confidence_coef: float = 0.0,
    confidence_warmup: float = 0.2, weight_decay: float = 0.0, seed: int = 0,
) -> ClassifierResult:
    """Train an MLP on (features, target probabilities) with `objectives.binary_classification`.

    Args:
      confidence_coef: the auxiliary confidence weight (0: plain cross-entropy).
      confidence_warmup: fraction of the steps over which the confidence weight
        rises linearly from 0 to `confidence_coef` (as in Burns et al. 2023).

    Returns:
      The trained parameters and each step's metrics.
    """
    features = np.asarray(features, np.float32)
    targets = np.asarray(targets, np.float32)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"train_classifier: features must be a non-empty [B, F] array, got {features.shape}")
    if targets.shape != (features.shape[0],):
        raise ValueError(f"train_classifier: targets has shape {targets.shape}, "
                         f"expected ({features.shape[0]},)")
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    optimizer = make_optimizer(learning_rate, weight_decay=weight_decay)
    objective = binary_classification(mlp_apply, confidence_coef=confidence_coef)
    step_fn, shardings = make_train_step(objective, optimizer, mesh, mlp_specs(params))
    state = init_train_state(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(seed),
                             shardings=shardings)
    rng = np.random.default_rng(seed)
    n = features.shape[0]
    order, at, history = rng.permutation(n), 0, []
    warm = max(1, int(confidence_warmup * steps))
    for i in range(steps):
        if at + batch_size > n:
            order, at = rng.permutation(n), 0
        rows = order[at:at + batch_size]
        at += batch_size
        batch = label_batch(features[rows], targets[rows], num_rows=batch_size,
                            confidence_scale=min(1.0, (i + 1) / warm))
        state, metrics = step_fn(state, batch)
        history.append(metrics)
    history = [{k: float(v) for k, v in m.items()} for m in jax.device_get(history)]
    return ClassifierResult(jax.device_get(state.params), history)


_predict = jax.jit(lambda params, x: jax.nn.sigmoid(mlp_apply(params, x)))


def predict_proba(params: Params, features: Float[np.ndarray, "B F"]) -> Float[np.ndarray, " B"]:
    """P(label = 1) of every row."""
    return np.asarray(_predict(params, jnp.asarray(features, jnp.float32)), np.float64)


def accuracy(probs: Float[np.ndarray, " B"], labels: Float[np.ndarray, " B"]) -> float:
    """Fraction of rows where the prediction (> 0.5) matches the 0/1 label."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if probs.shape != labels.shape:
        raise ValueError(f"accuracy: {probs.shape} predictions for {labels.shape} labels")
    return float(np.mean((probs > 0.5) == (labels > 0.5))) if probs.size else float("nan")
