"""Disaggregated rollout and training: the sampler and the update on disjoint sub-meshes.

Both sub-meshes are cut from the one global device list (every host's devices
after `jax.distributed.initialize`), so the new weights move from the training
mesh to the sampling mesh by resharding (`jax.device_put` to the sampler's
shardings: device to device, no host round trip). Each transfer is timed.
With several hosts, multi-controller JAX refuses a reshard between disjoint
device sets, so `split_meshes` gives every host devices on both sides and the
transfer copies each shard between two devices of its own host.

Synchronous mode (`off_policy=False`): the rollout of step t uses the weights
after update t - 1, exactly as the colocated loop. One-step off-policy mode:
the rollout of step t + 1 is dispatched on the weights before update t, so
sampling and training overlap (JAX dispatches both asynchronously, each on its
own devices); the batch is then at most `max_staleness` updates old, and
truncated importance weights (`algorithms.importance_weights`, TIS) between the
training policy and the stale sampling policy correct it.

The loop knows no model, objective or reward: it takes the producer (prompts
-> rollout -> rewards -> Batch, on the sampler's weights), the compiled update
step, and a log-prob function for the correction.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ouroboros_jax.algorithms import importance_weights
from ouroboros_jax.batch import Batch
from ouroboros_jax.config import ConfigError, MeshConfig
from ouroboros_jax.sharding import make_mesh

Params = Any


@dataclasses.dataclass(frozen=True)
class DisaggregationConfig:
    """How the devices are split between the sampler and the update.

    Attributes:
      sampler_devices: devices (of the global list, taken from its end) that sample; the rest
        train. 0: colocated, both use every device.
      off_policy: one-step off-policy: sample step t + 1 on the weights before update t.
      max_staleness: the most updates a batch may lag the trained weights (>= 1 when off_policy).
      is_cap: truncation of the importance weights pi_train / pi_sampler (TIS, > 0).
    """

    sampler_devices: int = 0
    off_policy: bool = False
    max_staleness: int = 1
    is_cap: float = 2.0

    def __post_init__(self) -> None:
        if self.sampler_devices < 0:
            raise ConfigError(f"disaggregation.sampler_devices: must be >= 0 (got {self.sampler_devices})")
        if self.off_policy and self.max_staleness < 1:
            raise ConfigError("disaggregation.max_staleness: must be >= 1 with off_policy "
                              f"(got {self.max_staleness})")
        if self.is_cap <= 0:
            raise ConfigError(f"disaggregation.is_cap: must be > 0 (got {self.is_cap})")


def split_meshes(cfg: DisaggregationConfig, train_mesh: MeshConfig, sampler_mesh: MeshConfig,
                 devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, Mesh]:
    """(train mesh, sampler mesh): disjoint sub-meshes of `devices` (default: all global devices).

    Raises:
      ConfigError: the split leaves no device to one side, or a mesh does not fit its devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if cfg.sampler_devices == 0:
        mesh = make_mesh(train_mesh, devices)
        return mesh, mesh
    if cfg.sampler_devices >= len(devices):
        raise ConfigError(f"disaggregation.sampler_devices: {cfg.sampler_devices} leaves none of the "
                          f"{len(devices)} devices to train on")
    hosts = sorted({d.process_index for d in devices})
    if len(hosts) == 1:
        cut = len(devices) - cfg.sampler_devices
        return make_mesh(train_mesh, devices[:cut]), make_mesh(sampler_mesh, devices[cut:])
    # Several hosts: every host gives its last devices to the sampler, so each shard moves
    # between two devices of one host (multi-controller JAX cannot reshard across hosts).
    if cfg.sampler_devices % len(hosts):
        raise ConfigError(f"disaggregation.sampler_devices: {cfg.sampler_devices} does not divide among "
                          f"{len(hosts)} hosts (each host samples on the same number of its devices)")
    per_host = cfg.sampler_devices // len(hosts)
    train, sample = [], []
    for h in hosts:
        local = [d for d in devices if d.process_index == h]
        if per_host >= len(local):
            raise ConfigError(f"disaggregation.sampler_devices: {per_host} per host leaves none of host "
                              f"{h}'s {len(local)} devices to train on")
        train += local[:len(local) - per_host]
        sample += local[len(local) - per_host:]
    return make_mesh(train_mesh, train), make_mesh(sampler_mesh, sample)


def transfer_weights(params: Params, shardings: Any) -> tuple[Params, float]:
    """Reshard `params` onto the sampler's `shardings` (device to device); (new params, seconds).

    The clock starts once `params` are computed, so the seconds are the transfer alone, not
    the wait for the update that produces them.
    """
    jax.block_until_ready(params)
    start = time.perf_counter()
    if jax.process_count() == 1:
        moved = jax.device_put(params, shardings)
    else:
        moved = jax.tree.map(_reshard_on_each_host, params, shardings)
    jax.block_until_ready(moved)
    return moved, time.perf_counter() - start


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(sl.indices(n)[:2] for sl, n in zip(index, shape, strict=True))


def _reshard_on_each_host(x: jax.Array, sharding: Any) -> jax.Array:
    """`x` in `sharding` on another device set, built from device-to-device copies of this
    host's own shards (`split_meshes` gives every host devices on both sides)."""
    held = {_index_key(s.index, x.shape): s.data for s in x.addressable_shards}
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(x.shape).items():
        key = _index_key(index, x.shape)
        if key not in held:
            raise ValueError(f"shape {x.shape}: the sampler's shard {key} is not held on host "
                             f"{jax.process_index()}; give every host the same mesh layout on both sides")
        arrays.append(jax.device_put(held[key], device))
    return jax.make_array_from_single_device_arrays(x.shape, sharding, arrays)


def correct_staleness(batch: Batch, train_logp: jax.Array, cap: float) -> tuple[Batch, dict[str, jax.Array]]:
    """The batch as if sampled by the training policy: its log-probs become `old_logp`, and the
    advantages carry the truncated importance weights pi_train / pi_sampler on every token."""
    weights, metrics = importance_weights(train_logp, batch.old_logp, batch.loss_mask, upper=cap)
    adv = batch.advantages if batch.advantages.ndim == 2 else batch.advantages[:, None]
    return batch.replace(old_logp=train_logp, advantages=adv * weights), metrics


def run_loop(
    state: Any,
    step_fn: Callable[[Any, Batch], tuple[Any, dict[str, jax.Array]]],
    produce: Callable[[Params, int], Batch],
    sampler_shardings: Any,
    steps: int,
    cfg: DisaggregationConfig,
    *,
    train_logp: Callable[[Params, Batch], jax.Array] | None = None,
    to_train: Callable[[Batch], Batch] = lambda b: b,
) -> tuple[Any, list[dict[str, float]]]:
    """`steps` updates with the sampler on its own sub-mesh.

    Args:
      state: the TrainState on the training mesh (`state.params` are the policy).
      step_fn: the compiled update step, (state, batch) -> (state, metrics).
      produce: (sampler params, step) -> Batch of that step's rollout, computed on the sampler mesh.
      sampler_shardings: the sampler's parameter shardings (the transfer's target).
      steps: number of updates.
      cfg: the split and the off-policy settings.
      train_logp: (train params, batch) -> per-token log-probs of the batch under the training
        policy; required with off_policy (the importance-weight correction).
      to_train: moves a produced batch onto the training mesh (default: left as it is).

    Returns:
      The final state and one dict per step: the step's metrics, `transfer/seconds`,
      `rollout/staleness` and, off-policy, the importance-weight metrics.
    """
    if cfg.off_policy and train_logp is None:
        raise ConfigError("disaggregation.off_policy: needs train_logp for the importance weights")
    history: list[dict[str, float]] = []
    sampler_params, seconds = transfer_weights(state.params, sampler_shardings)
    pending = (produce(sampler_params, 0), 0)  # (batch, version of the weights that sampled it)
    version = 0
    for t in range(steps):
        batch, sampled_by = pending
        staleness = version - sampled_by
        if staleness > cfg.max_staleness and cfg.off_policy:
            raise RuntimeError(f"step {t}: the batch is {staleness} updates old, more than "
                               f"disaggregation.max_staleness={cfg.max_staleness}")
        batch = to_train(batch)
        extra: dict[str, Any] = {}
        if cfg.off_policy:
            # Dispatch the next rollout on the weights the sampler holds now, before the update.
            if t + 1 < steps:
                pending = (produce(sampler_params, t + 1), version)
            batch, extra = correct_staleness(batch, train_logp(state.params, batch), cfg.is_cap)
        state, metrics = step_fn(state, batch)
        version += 1
        sampler_params, seconds = transfer_weights(state.params, sampler_shardings)
        if not cfg.off_policy and t + 1 < steps:
            pending = (produce(sampler_params, t + 1), version)
        host = jax.device_get({**metrics, **extra})
        history.append({**{k: float(jnp.mean(v)) for k, v in host.items()},
                        "transfer/seconds": seconds, "rollout/staleness": float(staleness)})
    return state, history
