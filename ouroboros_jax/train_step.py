"""THE update step: `(state, batch) -> (state, metrics)`, one jit-compiled program.

Policy log-probs (chunked over time, see `models.logprobs`), reference
log-probs when a KL term is on, the GRPO-family loss from
`ouroboros_jax.algorithms.policy_loss`, gradients accumulated over
micro-batches with `lax.scan`, then the optax update (AdamW with warmup, a
constant or cosine schedule and global-norm clipping: `make_optimizer`).

Micro-batching gives the same update as the full batch, for every aggregation
mode: the aggregation's data-dependent denominator (the token count for
`token_mean`, the number of non-empty sequences for the `seq_mean_*` modes) is
counted once over the whole batch and passed to every micro-batch as
`normalizer`, so each micro-batch loss is its exact share of the full-batch loss
and their gradients sum to the full-batch gradient. The metrics are combined
with the weight each one has in the full batch (`_combine_metrics`).

Non-finite updates. If the loss or the gradient norm is NaN or inf, the
parameters and optimizer state are left unchanged (`step` does not advance)
and the metric `finite` is 0; the trainer reads it to stop or alert. `loss`
and `grad_norm` carry the non-finite values so logs show what happened.

Dimension legend: B batch (sequences), M micro-batches, T time (prompt and
completion tokens), V vocab.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from ouroboros_jax.algorithms import policy_loss
from ouroboros_jax.config import LossConfig, ModelConfig, OptimizerConfig
from ouroboros_jax.models.logprobs import DEFAULT_CHUNK, policy_logprobs
from ouroboros_jax.models.transformer import Params, param_shapes
from ouroboros_jax.sharding import param_shardings

Metrics = dict[str, Float[Array, ""]]


class Batch(NamedTuple):
    """One mini-batch of rollouts, all arrays aligned with the tokens.

    Attributes:
      tokens: prompt and completion tokens [B, T] (padding anywhere).
      attention_mask: [B, T] True for real tokens, False for padding.
      loss_mask: [B, T] True for the completion tokens the loss is on.
      old_logp: [B, T] log-prob of each token under the policy that sampled it
        (the sampler's), `old_logp[b, t] = log p(tokens[b, t] | tokens[b, :t])`;
        read only where `loss_mask` is True.
      advantages: one per sequence [B], or one per token [B, T].
      ref_logp: optional [B, T] reference log-probs computed elsewhere; when
        None and the state holds reference parameters, the step computes them.
    """

    tokens: Int[Array, "B T"]
    attention_mask: Bool[Array, "B T"]
    loss_mask: Bool[Array, "B T"]
    old_logp: Float[Array, "B T"]
    advantages: Float[Array, " B"] | Float[Array, "B T"]
    ref_logp: Float[Array, "B T"] | None = None


class TrainState(NamedTuple):
    """Everything the update changes, as one pytree.

    Attributes:
      step: number of updates applied (skipped non-finite updates not counted).
      params: policy parameters (float32 master weights).
      opt_state: optax state of the optimizer.
      rng: the run's PRNG key, carried for the caller (the update itself is
        deterministic and leaves it unchanged).
      ref_params: reference-policy parameters for the KL term, or None when no
        reference is needed (KL coefficient 0, or reference log-probs in the batch).
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
      params: initial policy parameters.
      optimizer: the optax transformation (see `make_optimizer`).
      rng: PRNG key carried in the state.
      with_reference: keep a frozen copy of `params` as the reference policy.
      shardings: place the state in these shardings (from `train_state_shardings`).

    Returns:
      The TrainState at step 0.
    """
    # A real copy: the step donates the state, and one buffer cannot be donated twice.
    ref = jax.tree.map(jnp.copy, params) if with_reference else None
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng, ref)
    return state if shardings is None else jax.device_put(state, shardings)


def loss_kwargs(loss: LossConfig, *, max_completion_len: int, temperature: float = 1.0) -> dict[str, Any]:
    """The explicit loss settings of `train_step` from a LossConfig (used at the edges).

    Args:
      loss: the loss section of the experiment config.
      max_completion_len: Dr. GRPO's constant normaliser when `loss.max_len` is unset.
      temperature: the sampling temperature (log-probs are of the tempered policy).

    Returns:
      Keyword arguments for `train_step` / `make_train_step`.
    """
    return dict(
        variant=loss.variant, clip_low=loss.clip_low, clip_high=loss.clip_high,
        aggregation=loss.aggregation, dual_clip=loss.dual_clip,
        max_len=loss.max_len or max_completion_len, kl_coef=loss.kl_coef, kl_kind=loss.kl_kind,
        entropy_coef=loss.entropy_coef, temperature=temperature,
    )


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


def optimizer_from_config(
    cfg: OptimizerConfig, total_steps: int | None = None
) -> optax.GradientTransformation:
    """`make_optimizer` with the values of an OptimizerConfig (used at the edges)."""
    return make_optimizer(
        cfg.learning_rate, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, total_steps=total_steps,
        b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
    )


def learning_rate_of(opt_state: optax.OptState) -> Float[Array, ""] | None:
    """The learning rate recorded in an injected-hyperparameter optimizer state, if any."""
    hyperparams = getattr(opt_state, "hyperparams", None)
    return None if hyperparams is None else hyperparams.get("learning_rate")


# ---------------------------------------------------------------------------
# Loss of one micro-batch


def _microbatch_loss(
    params: Params,
    ref_params: Params | None,
    batch: Batch,
    normalizer: Float[Array, ""],
    *,
    model_config: ModelConfig,
    temperature: float,
    logprob_chunk: int,
    entropy_coef: float,
    loss_start: int,
    **loss_settings: Any,
) -> tuple[Float[Array, ""], Metrics]:
    """The micro-batch's share of the full-batch loss, and its metrics."""
    logprobs = functools.partial(policy_logprobs, model_config=model_config, tokens=batch.tokens,
                                 attention_mask=batch.attention_mask, temperature=temperature,
                                 chunk_size=logprob_chunk, start=loss_start)
    logp, entropy = logprobs(params)
    if entropy_coef == 0:
        # Entropy is a metric only; no backward pass through it.
        entropy = jax.lax.stop_gradient(entropy)
    ref_logp = batch.ref_logp
    if ref_logp is None and ref_params is not None:
        ref_logp, _ = logprobs(jax.lax.stop_gradient(ref_params), with_entropy=False)
    return policy_loss(
        logp, batch.old_logp, batch.advantages, batch.loss_mask,
        ref_logp=None if ref_logp is None else jax.lax.stop_gradient(ref_logp),
        entropy=entropy, entropy_coef=entropy_coef, normalizer=normalizer, **loss_settings,
    )


def _full_batch_normalizer(loss_mask: Bool[Array, "B T"], aggregation: str) -> Float[Array, ""]:
    """The aggregation's denominator counted over the whole mini-batch."""
    if aggregation == "token_mean":
        count = jnp.sum(loss_mask.astype(jnp.float32))
    else:
        count = jnp.sum(jnp.any(loss_mask, axis=-1).astype(jnp.float32))
    return jnp.maximum(count, 1.0)


# ---------------------------------------------------------------------------
# Metrics of several micro-batches

# Already divided by the full-batch normaliser, or counts: they add up.
_SUMMED = ("loss", "pg_loss", "kl_loss", "entropy_loss", "num_tokens", "num_sequences")
_MINIMA = ("ratio_min", "advantage_min")
_MAXIMA = ("ratio_max", "advantage_max")


def _combine_metrics(metrics_M: Metrics, per_sequence_advantages: bool) -> Metrics:
    """Full-batch metrics from per-micro-batch ones (each [M]).

    Means over tokens are re-weighted by each micro-batch's token count
    (advantage statistics by its sequence count when advantages are per
    sequence); minima and maxima skip micro-batches with nothing to count
    (whose value is a placeholder 0). A metric this table does not name is
    treated as a mean over tokens.
    """
    tokens_M, seqs_M = metrics_M["num_tokens"], metrics_M["num_sequences"]
    out: Metrics = {}

    def weighted_mean(x, w):
        return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)

    for name, x in metrics_M.items():
        w = seqs_M if name.startswith("advantage") and per_sequence_advantages else tokens_M
        if name in _SUMMED:
            out[name] = jnp.sum(x)
        elif name in _MINIMA or name in _MAXIMA:
            big = jnp.where(name in _MINIMA, jnp.inf, -jnp.inf)
            pick = jnp.min if name in _MINIMA else jnp.max
            value = pick(jnp.where(w > 0, x, big))
            out[name] = jnp.where(jnp.sum(w) > 0, value, 0.0)
        elif name == "advantage_std":
            mean = weighted_mean(metrics_M["advantage_mean"], w)
            second = weighted_mean(jnp.square(x) + jnp.square(metrics_M["advantage_mean"]), w)
            out[name] = jnp.sqrt(jnp.maximum(second - jnp.square(mean), 0.0))
        else:
            out[name] = weighted_mean(x, w)
    return out


# ---------------------------------------------------------------------------
# The step


def _split_micro(x: Array, num_micro: int) -> Array:
    """[B, ...] -> [M, B/M, ...], micro-batch j holding rows j, j + M, j + 2M, ...

    Strided rather than contiguous: with the batch axis sharded in contiguous
    blocks over devices, every micro-batch then spans all devices, and the
    scan slices locally instead of moving rows between devices.
    """
    return x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)


def _gradients(
    state: TrainState, batch: Batch, num_micro: int, loss_fn
) -> tuple[Params, Metrics]:
    """Full-batch gradients and metrics, accumulated over `num_micro` micro-batches."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (_, metrics), grads = grad_fn(state.params, state.ref_params, batch)
        return grads, metrics

    def accumulate(grad_sum, micro):
        (_, metrics), grads = grad_fn(state.params, state.ref_params, micro)
        return jax.tree.map(jnp.add, grad_sum, grads), metrics

    micro_batches = jax.tree.map(lambda x: _split_micro(x, num_micro), batch)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, metrics_M = jax.lax.scan(accumulate, zeros, micro_batches)
    return grads, _combine_metrics(metrics_M, batch.advantages.ndim == 1)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model_config: ModelConfig,
    optimizer: optax.GradientTransformation,
    variant: str,
    clip_low: float,
    clip_high: float,
    aggregation: str,
    dual_clip: float | None = None,
    max_len: int | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    micro_batch_size: int | None = None,
    logprob_chunk: int = DEFAULT_CHUNK,
    loss_start: int = 0,
) -> tuple[TrainState, Metrics]:
    """One optimizer update on one mini-batch.

    Args:
      state: the training state.
      batch: the mini-batch (see `Batch`).
      model_config: the architecture (static; `compute_dtype` and `remat` apply).
      optimizer: the optax transformation the state was initialised with.
      variant, clip_low, clip_high, aggregation, dual_clip, kl_kind: as in
        `algorithms.policy_loss`.
      max_len: Dr. GRPO's constant normaliser (the maximum completion length);
        required for `seq_mean_token_sum_norm`, where the default T would be
        the prompt-plus-completion width of the batch.
      kl_coef: weight of the KL term; needs `batch.ref_logp` or `state.ref_params`.
      entropy_coef: weight of the entropy bonus.
      temperature: the sampling temperature; logits are divided by it.
      micro_batch_size: sequences per micro-batch (divides B); None: the whole batch.
      logprob_chunk: positions per chunk of the output projection.
      loss_start: first position that can carry a loss token, e.g. the prompt
        width of a [prompt | completion] batch: the output head runs on
        positions from there only (as TRL's `logits_to_keep`); loss-mask
        entries before it are ignored.

    Returns:
      `(new_state, metrics)`: metrics are the scalars of `policy_loss`
      combined over micro-batches, plus `grad_norm` (before clipping),
      `learning_rate` (the one this update used) and `finite` (1.0, or 0.0
      when the update was skipped for a non-finite loss or gradient).
    """
    B = batch.tokens.shape[0]
    micro = micro_batch_size or B
    if B % micro:
        raise ValueError(f"micro_batch_size={micro} must divide the batch size {B}")
    if aggregation == "seq_mean_token_sum_norm" and max_len is None:
        raise ValueError("aggregation 'seq_mean_token_sum_norm' needs max_len (the max completion length)")
    if loss_start:
        after_start = jnp.arange(batch.tokens.shape[1]) >= loss_start
        batch = batch._replace(loss_mask=batch.loss_mask & after_start)
    loss_fn = functools.partial(
        _microbatch_loss, normalizer=_full_batch_normalizer(batch.loss_mask, aggregation),
        model_config=model_config, temperature=temperature, logprob_chunk=logprob_chunk,
        loss_start=loss_start, entropy_coef=entropy_coef, variant=variant, clip_low=clip_low,
        clip_high=clip_high, aggregation=aggregation, dual_clip=dual_clip, max_len=max_len,
        kl_coef=kl_coef, kl_kind=kl_kind,
    )
    grads, metrics = _gradients(state, batch, B // micro, loss_fn)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
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
    model_config: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    with_reference: bool = False,
    head: str = "lm",
) -> TrainState:
    """Shardings of every leaf of the TrainState: optimizer moments as their parameter.

    An optimizer-state leaf whose trailing dict keys name a parameter (and has
    its shape) takes that parameter's sharding; counters, hyperparameters and
    the step are replicated. `head` is "lm" for a policy and "score" for a
    reward model (see `param_shapes`).
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    p_shardings = param_shardings(model_config, mesh, head=head)
    is_shape = lambda x: isinstance(x, tuple)
    shapes = param_shapes(model_config, head=head)
    by_keys = {
        tuple(k.key for k in path): (shape, sharding)
        for (path, shape), sharding in zip(jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)[0],
                                           jax.tree.leaves(p_shardings), strict=True)
    }
    abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=is_shape)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)

    def one(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for start in range(len(keys)):
            shape, sharding = by_keys.get(keys[start:], (None, None))
            if shape is not None and tuple(shape) == tuple(leaf.shape):
                return sharding
        return replicated

    opt_shardings = jax.tree_util.tree_map_with_path(one, abstract_opt)
    ref = p_shardings if with_reference else None
    return TrainState(replicated, p_shardings, opt_shardings, replicated, ref)


def make_train_step(
    model_config: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    with_reference: bool | None = None,
    compiler_options: dict[str, Any] | None = None,
    **step_kwargs: Any,
):
    """`train_step` jitted once, with explicit shardings and the state donated.

    The state is sharded as the parameters (`train_state_shardings`), every
    batch array over (data, fsdp) on its leading axis, the metrics replicated.
    For micro-batches that keep every device busy, `micro_batch_size` should
    be a multiple of data * fsdp.

    Args:
      model_config: the architecture.
      optimizer: the optax transformation.
      mesh: the (data, fsdp, tensor) device mesh.
      with_reference: whether the state holds reference parameters; default:
        when `kl_coef` is nonzero.
      compiler_options: XLA options for this program (e.g. GPU scheduler flags).
      **step_kwargs: the keyword arguments of `train_step` (loss settings,
        micro_batch_size, temperature, logprob_chunk).

    Returns:
      `(step_fn, state_shardings)`: `step_fn(state, batch, loss_start=0) -> (state, metrics)`
      (`loss_start` static, see `train_step`) and the TrainState of shardings
      to create the state in. `step_fn.jitted` is the jitted program, e.g. for
      `step_fn.jitted.lower(state, batch, 0).compile().memory_analysis()`.
    """
    if with_reference is None:
        with_reference = step_kwargs.get("kl_coef", 0.0) != 0
    state_shardings = train_state_shardings(model_config, optimizer, mesh, with_reference=with_reference)
    # One spec for every batch array: its leading (batch) axis over (data, fsdp).
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    def step(state: TrainState, batch: Batch, loss_start: int) -> tuple[TrainState, Metrics]:
        return train_step(state, batch, model_config=model_config, optimizer=optimizer,
                          loss_start=loss_start, **step_kwargs)

    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
        static_argnums=2,
        donate_argnums=0,
        compiler_options=compiler_options,
    )

    def step_fn(state: TrainState, batch: Batch, loss_start: int = 0) -> tuple[TrainState, Metrics]:
        # jit takes no keyword arguments once in_shardings are given; this keeps `loss_start=` callable.
        return jitted(state, batch, loss_start)

    # The jitted program itself, for ahead-of-time use: step_fn.jitted.lower(state, batch, loss_start).
    step_fn.jitted = jitted
    return step_fn, state_shardings
