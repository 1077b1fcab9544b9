"""THE update step: `(state, batch) -> (state, metrics)`, one jit-compiled program for every objective.

`train_step` is the pure function: the objective's loss and gradients,
accumulated over micro-batches with `lax.scan`, then the optax update (AdamW
with warmup, a constant or cosine schedule and global-norm clipping:
`make_optimizer`). `make_train_step` jits it once, with explicit shardings for
the state (from the parameters' logical axes) and the batch, and the state
donated. Nothing else in the package jits an update.

Micro-batching gives the same update as the full batch: the objective counts
its denominators once over the whole batch (`Objective.normalizer`) and every
micro-batch's loss is divided by those counts, so the micro-batch gradients sum
to the full-batch gradient; the metrics are combined by `Objective.combine`.
Micro-batch j holds rows j, j + M, j + 2M, ... (see `_split_micro`).

Non-finite updates. The update is applied only if the loss, the gradient norm
and every entry of the new parameters and the new optimizer state are finite;
otherwise the parameters and optimizer state are left unchanged (`step` does
not advance) and the metric `finite` is 0, for the caller to stop or alert.
`loss` and `grad_norm` carry the non-finite values so logs show what happened.

Dimension legend (docs/dimensions.md): B rows, M micro-batches.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from ouroboros_jax.objectives.base import Metrics, Objective
from ouroboros_jax.sharding import Logical, batch_sharding, logical_shardings, replicated

Params = Any


class TrainState(NamedTuple):
    """Everything the update changes, as one pytree.

    Attributes:
      step: number of updates applied (skipped non-finite updates not counted).
      params: the trained parameters (float32 master weights).
      opt_state: optax state of the optimizer.
      rng: the run's PRNG key, carried for the caller (the update itself is
        deterministic and leaves it unchanged).
      ref_params: frozen reference parameters (a KL term, DPO), or None when
        the objective needs none.
    """

    step: Int[Array, ""]
    params: Params
    opt_state: optax.OptState
    rng: jax.Array
    ref_params: Params | None = None


def init_train_state(
    params: Params,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    *,
    with_reference: bool = False,
    shardings: TrainState | None = None,
) -> TrainState:
    """A fresh training state; the reference (if any) is a copy of `params`.

    The state holds `params` itself, not a copy, and the compiled step donates
    its input state: pass a copy if the caller keeps using the arrays.

    Args:
      params: initial parameters.
      optimizer: the optax transformation (see `make_optimizer`).
      rng: PRNG key carried in the state.
      with_reference: keep a frozen copy of `params` as the reference.
      shardings: place the state in these shardings (from `make_train_step`).

    Returns:
      The TrainState at step 0.
    """
    def build(params: Params) -> TrainState:
        # A real copy: the step donates the state, and one buffer cannot be donated twice.
        ref = jax.tree.map(jnp.copy, params) if with_reference else None
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng, ref)

    if shardings is not None and jax.process_count() > 1:
        # Several processes: a host value cannot be put on devices of other processes, so
        # the state is built by one program whose outputs carry the global shardings.
        return jax.jit(build, out_shardings=shardings)(params)
    state = build(params)
    return state if shardings is None else jax.device_put(state, shardings)


# ---------------------------------------------------------------------------
# Optimizer


def _decay_mask(params: Params) -> Any:
    """Weight decay on matrices only: norms and biases are left alone (as Hugging Face does)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(w in path[-1].key for w in ("norm", "bias")), params)


def make_optimizer(
    learning_rate: float,
    *,
    warmup_steps: int = 0,
    schedule: str = "constant",
    total_steps: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
) -> optax.GradientTransformation:
    """AdamW with linear warmup from 0, a constant or cosine schedule, and global-norm clipping.

    The learning rate is an injected hyperparameter, so the optimizer state
    records the rate each update used (the `learning_rate` metric).

    Args:
      learning_rate: peak learning rate.
      warmup_steps: linear warmup length (0: none).
      schedule: "constant", or "cosine" (decay to 0 at `total_steps`).
      total_steps: length of the run; required for "cosine".
      b1, b2, eps: Adam moments and epsilon.
      weight_decay: decoupled weight decay on matrices (not norms or biases).
      max_grad_norm: clip the global gradient norm to this (0: no clipping).

    Returns:
      The optax GradientTransformation.
    """
    if schedule == "cosine":
        if not total_steps:
            raise ValueError("schedule 'cosine' needs total_steps")
        decay = optax.cosine_decay_schedule(learning_rate, max(total_steps - warmup_steps, 1))
    elif schedule == "constant":
        decay = optax.constant_schedule(learning_rate)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected 'constant' or 'cosine'")
    lr_schedule = decay
    if warmup_steps:
        warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
        lr_schedule = optax.join_schedules([warmup, decay], [warmup_steps])

    def adamw(learning_rate):
        clip = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
        adam = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=_decay_mask)
        return optax.chain(*clip, adam)

    return optax.inject_hyperparams(adamw)(learning_rate=lr_schedule)


def learning_rate_of(opt_state: optax.OptState) -> Float[Array, ""] | None:
    """The learning rate recorded in an injected-hyperparameter optimizer state, if any."""
    hyperparams = getattr(opt_state, "hyperparams", None)
    return None if hyperparams is None else hyperparams.get("learning_rate")


# ---------------------------------------------------------------------------
# The step


def _split_micro(x: Array, num_micro: int) -> Array:
    """[B, ...] -> [M, B/M, ...], micro-batch j holding rows j, j + M, j + 2M, ...

    Strided rather than contiguous: with the batch axis sharded in contiguous
    blocks over devices, every micro-batch then spans all devices, and the
    scan slices locally instead of moving rows between devices.
    """
    return x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)


def _gradients(state: TrainState, batch: Any, num_micro: int, objective: Objective) -> tuple[Params, Metrics]:
    """Full-batch gradients and metrics, accumulated over `num_micro` micro-batches."""
    counts = objective.normalizer(batch)
    grad_fn = jax.value_and_grad(lambda p, b: objective.loss(p, state.ref_params, b, counts), has_aux=True)
    if num_micro == 1:
        (_, metrics), grads = grad_fn(state.params, batch)
        return grads, metrics

    def accumulate(grad_sum, micro):
        (_, metrics), grads = grad_fn(state.params, micro)
        return jax.tree.map(jnp.add, grad_sum, grads), metrics

    micro_batches = jax.tree.map(lambda x: _split_micro(x, num_micro), batch)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, metrics_M = jax.lax.scan(accumulate, zeros, micro_batches)
    return grads, objective.combine(metrics_M, batch)


def all_finite(tree: Any) -> jax.Array:
    """True when every floating-point entry of the tree is finite (integer leaves always are)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def batch_rows(batch: Any) -> int:
    """The number of rows of a batch pytree (the leading dimension of its arrays)."""
    return jax.tree.leaves(batch)[0].shape[0]


def train_step(
    state: TrainState,
    batch: Any,
    *,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    micro_batch_size: int | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimizer update on one mini-batch (pure; `make_train_step` jits it).

    Args:
      state: the training state.
      batch: the mini-batch the objective reads (`batch.Batch`, `batch.PairBatch`, ...).
      objective: what to minimise (see `objectives`).
      optimizer: the optax transformation the state was initialised with.
      micro_batch_size: rows per micro-batch (divides the batch); None or 0: the whole batch.

    Returns:
      `(new_state, metrics)`: the objective's metrics combined over
      micro-batches, plus `grad_norm` (before clipping), `learning_rate` (the
      one this update used) and `finite` (1.0, or 0.0 when the update was
      skipped: a non-finite loss, gradient, new parameter or optimizer entry).
    """
    B = batch_rows(batch)
    micro = micro_batch_size or B
    if B % micro:
        raise ValueError(f"micro_batch_size={micro} must divide the batch size {B}")
    grads, metrics = _gradients(state, batch, B // micro, objective)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & all_finite(params)
              & all_finite(opt_state))
    keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state._replace(
        step=state.step + finite.astype(state.step.dtype),
        params=keep_if_bad(params, state.params),
        opt_state=keep_if_bad(opt_state, state.opt_state),
    )
    metrics = metrics | {"grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
    lr = learning_rate_of(opt_state)
    if lr is not None:
        metrics["learning_rate"] = lr
    return new_state, metrics


# ---------------------------------------------------------------------------
# Compilation with explicit shardings


def train_state_shardings(
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    param_specs: Params,
    *,
    with_reference: bool = False,
) -> TrainState:
    """Shardings of every leaf of the TrainState, from the parameters' logical axes.

    Parameters (and the reference) follow the rules table. An optimizer-state
    leaf whose trailing dict keys name a parameter (and has its shape) takes
    that parameter's sharding; counters, hyperparameters and the step are
    replicated.

    Args:
      optimizer: the optax transformation.
      mesh: the (data, fsdp, tensor) device mesh.
      param_specs: a tree of `sharding.Logical` (shape and logical axes) with
        the structure of the parameters, e.g. `models.param_specs(cfg)`, or
        `models.param_specs(cfg, head="score")` for a reward model.
      with_reference: whether the state holds reference parameters.
    """
    is_spec = lambda x: isinstance(x, Logical)
    p_shardings = logical_shardings(param_specs, mesh)
    dict_keys = lambda path: tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    flat_specs, _ = jax.tree_util.tree_flatten_with_path(param_specs, is_leaf=is_spec)
    by_keys = {dict_keys(path): (spec.shape, sharding)
               for (path, spec), sharding in zip(flat_specs, jax.tree.leaves(p_shardings), strict=True)}
    abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), param_specs,
                                   is_leaf=is_spec)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)

    def one(path, leaf):
        keys = dict_keys(path)
        for start in range(len(keys)):
            shape, sharding = by_keys.get(keys[start:], (None, None))
            if shape is not None and tuple(shape) == tuple(leaf.shape):
                return sharding
        return replicated(mesh)

    opt_shardings = jax.tree_util.tree_map_with_path(one, abstract_opt)
    ref = p_shardings if with_reference else None
    return TrainState(replicated(mesh), p_shardings, opt_shardings, replicated(mesh), ref)


def make_train_step(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    param_specs: Params,
    *,
    micro_batch_size: int | None = None,
    with_reference: bool | None = None,
    compiler_options: dict[str, Any] | None = None,
):
    """`train_step` jitted once, with explicit shardings and the state donated.

    The state is sharded as the parameters (`train_state_shardings`), every
    batch array over the batch axes (data, fsdp) on its leading axis, the
    metrics replicated. A batch's static fields (e.g. `Batch.loss_start`) are
    part of its structure: each distinct value compiles its own program. For
    micro-batches that keep every device busy, `micro_batch_size` should be a
    multiple of `sharding.batch_shards(mesh)`.

    Args:
      objective: what to minimise (see `objectives`).
      optimizer: the optax transformation.
      mesh: the (data, fsdp, tensor) device mesh.
      param_specs: the parameters' shapes and logical axes (see `train_state_shardings`).
      micro_batch_size: rows per micro-batch; None or 0: the whole batch.
      with_reference: whether the state holds reference parameters; default:
        `objective.uses_reference`.
      compiler_options: XLA options for this program (e.g. GPU scheduler flags).

    Returns:
      `(step_fn, state_shardings)`: `step_fn(state, batch) -> (state, metrics)`
      and the TrainState of shardings to create the state in. `step_fn.jitted`
      is the jitted program, e.g. for
      `step_fn.jitted.lower(state, batch).compile().memory_analysis()`.
    """
    if with_reference is None:
        with_reference = objective.uses_reference
    state_shardings = train_state_shardings(optimizer, mesh, param_specs, with_reference=with_reference)
    step = functools.partial(train_step, objective=objective, optimizer=optimizer,
                             micro_batch_size=micro_batch_size)
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options,
    )

    def step_fn(state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        return jitted(state, batch)

    step_fn.jitted = jitted
    return step_fn, state_shardings
