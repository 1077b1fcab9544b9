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
the rollout of step t + 1 is dispatched on the weights before update t, on a
background thread whose programs run on the sampler's devices while update t
runs on the training devices; the batch is then at most `max_staleness` updates
old, and truncated importance weights (`algorithms.importance_weights`, TIS)
between the training policy and the stale sampling policy correct it.

`SamplerPipeline` is that schedule; `run_loop` drives it with a bare producer
and one update per batch, and `DisaggregatedStep` is the trainer's step on it
(`trainer.train` with `--disagg.sampler_devices N`): rollouts with rewards,
mini-batches, and the checkpoints that make a resumed run continue exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ouroboros_jax import multihost
from ouroboros_jax.algorithms import importance_weights
from ouroboros_jax.batch import Batch
from ouroboros_jax.config import ConfigError, DisaggregationConfig, ExperimentConfig, MeshConfig, ModelConfig
from ouroboros_jax.metrics import PhaseTimer
from ouroboros_jax.models import param_shardings, policy_logprobs
from ouroboros_jax.rewards import WeightedRewards
from ouroboros_jax.rollout import collect, rollout_metrics
from ouroboros_jax.sharding import batch_sharding, make_mesh

Params = Any

__all__ = ["DisaggregatedStep", "DisaggregationConfig", "SamplerPipeline", "correct_staleness", "run_loop",
           "split_meshes", "transfer_weights"]


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
        raise ConfigError(f"disagg.sampler_devices: {cfg.sampler_devices} leaves none of the "
                          f"{len(devices)} devices to train on")
    hosts = sorted({d.process_index for d in devices})
    if len(hosts) == 1:
        cut = len(devices) - cfg.sampler_devices
        return make_mesh(train_mesh, devices[:cut]), make_mesh(sampler_mesh, devices[cut:])
    # Several hosts: every host gives its last devices to the sampler, so each shard moves
    # between two devices of one host (multi-controller JAX cannot reshard across hosts).
    if cfg.sampler_devices % len(hosts):
        raise ConfigError(f"disagg.sampler_devices: {cfg.sampler_devices} does not divide among "
                          f"{len(hosts)} hosts (each host samples on the same number of its devices)")
    per_host = cfg.sampler_devices // len(hosts)
    train, sample = [], []
    for h in hosts:
        local = [d for d in devices if d.process_index == h]
        if per_host >= len(local):
            raise ConfigError(f"disagg.sampler_devices: {per_host} per host leaves none of host "
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


class SamplerPipeline:
    """The sampler's side of the loop: which weights sample which step, the transfer, the overlap.

    `take(step, produce)` returns the rollout of `step`: the one dispatched during the
    previous step (off-policy), else one produced now on the sampler's current weights.
    Off-policy, it then dispatches the rollout of `step + 1` on the same weights, on a
    background thread, so that it runs while the caller trains on the rollout of `step`;
    `updated(params)` after each update moves the new weights to the sampler. `run_loop`
    and the trainer (`DisaggregatedStep`) are two drivers of this one schedule.

    Args:
      cfg: the split and the off-policy settings.
      sampler_shardings: the sampler's parameter shardings (the transfer's target).
      prefetch: steps whose rollout may be dispatched during the previous step (off-policy);
        the others are produced when taken, on the newest weights (the trainer refuses to
        prefetch across a checkpoint, so a resumed run continues exactly).
    """

    def __init__(self, cfg: DisaggregationConfig, sampler_shardings: Any, *,
                 prefetch: Callable[[int], bool] = lambda step: True) -> None:
        self.cfg = cfg
        self._shardings = sampler_shardings
        self._prefetch = prefetch
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rollout") if cfg.off_policy else None
        self._params: Params = None
        self.version = 0  # updates whose weights the sampler has received
        self._pending: tuple[int, Future, int] | None = None  # (step, rollout, version that samples it)

    def load(self, params: Params) -> float:
        """Move `params` (the trained weights) to the sampler; seconds of the transfer."""
        self._params, seconds = transfer_weights(params, self._shardings)
        return seconds

    def updated(self, params: Params) -> float:
        """One update is done: move its weights to the sampler; seconds of the transfer."""
        self.version += 1
        return self.load(params)

    def take(self, step: int, produce: Callable[[Params, int], Any]) -> tuple[Any, int, float]:
        """(the rollout of `step`, its staleness in updates, seconds waited for it).

        Raises:
          RuntimeError: the rollout is more than `max_staleness` updates old.
        """
        if self._params is None:
            raise RuntimeError("SamplerPipeline.take: load() the weights first")
        start = time.perf_counter()
        if self._pending is not None and self._pending[0] == step:
            _, future, sampled_by = self._pending
            self._pending = None
            rollout = future.result()
        else:
            self._drop_pending()
            rollout, sampled_by = produce(self._params, step), self.version
        waited = time.perf_counter() - start
        staleness = self.version - sampled_by
        if self.cfg.off_policy and staleness > self.cfg.max_staleness:
            raise RuntimeError(f"step {step}: the rollout is {staleness} updates old, more than "
                               f"disagg.max_staleness={self.cfg.max_staleness}")
        if self._executor is not None and self._prefetch(step + 1):
            # The next rollout samples on the weights the sampler holds now, before this update.
            future = self._executor.submit(produce, self._params, step + 1)
            self._pending = (step + 1, future, self.version)
        return rollout, staleness, waited

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None

    def close(self) -> None:
        """Wait for a rollout in flight (its result is dropped) and stop the background thread."""
        self._drop_pending()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


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
    """`steps` updates with the sampler on its own sub-mesh: the bare loop (one update per
    batch) that `trainer.train` runs with rollouts, rewards and mini-batches (`DisaggregatedStep`).

    Args:
      state: the TrainState on the training mesh (`state.params` are the policy).
      step_fn: the compiled update step, (state, batch) -> (state, metrics).
      produce: (sampler params, step) -> Batch of that step's rollout, computed on the sampler mesh
        (off-policy: on a background thread).
      sampler_shardings: the sampler's parameter shardings (the transfer's target).
      steps: number of updates.
      cfg: the split and the off-policy settings.
      train_logp: (train params, batch) -> per-token log-probs of the batch under the training
        policy; required with off_policy (the importance-weight correction).
      to_train: moves a produced batch onto the training mesh (default: left as it is).

    Returns:
      The final state and one dict per step: the step's metrics, `time/transfer` (seconds),
      `rollout/staleness` and, off-policy, the importance-weight metrics (`offpolicy/...`).
    """
    if cfg.off_policy and train_logp is None:
        raise ConfigError("disagg.off_policy: needs train_logp for the importance weights")
    history: list[dict[str, float]] = []
    pipeline = SamplerPipeline(cfg, sampler_shardings, prefetch=lambda t: t < steps)
    try:
        pipeline.load(state.params)
        for t in range(steps):
            batch, staleness, _ = pipeline.take(t, produce)
            batch = to_train(batch)
            extra: dict[str, Any] = {}
            if cfg.off_policy:
                batch, extra = correct_staleness(batch, train_logp(state.params, batch), cfg.is_cap)
            state, metrics = step_fn(state, batch)
            seconds = pipeline.updated(state.params)
            host = jax.device_get({**metrics, **{f"offpolicy/{k}": v for k, v in extra.items()}})
            history.append({**{k: float(jnp.mean(v)) for k, v in host.items()},
                            "time/transfer": seconds, "rollout/staleness": float(staleness)})
    finally:
        pipeline.close()
    return state, history


# ---------------------------------------------------------------------------
# The trainer's disaggregated step (`trainer.train` with `--disagg.sampler_devices N`)


def sampler_mesh_config(mesh: MeshConfig) -> MeshConfig:
    """The sampler's mesh shape: the train mesh's tensor axis, rows over fsdp on the other devices
    (tensor -1, "the rest", stays so: every sampler device on the tensor axis)."""
    return MeshConfig(data=1, fsdp=1 if mesh.tensor == -1 else -1, tensor=mesh.tensor)


@functools.partial(jax.jit, static_argnames=("model_config", "start", "temperature"))
def _train_logp(params: Params, tokens: jax.Array, attention: jax.Array, *, model_config: ModelConfig,
                start: int, temperature: float) -> jax.Array:
    return policy_logprobs(params, model_config, tokens, attention, start=start, temperature=temperature,
                           with_entropy=False)[0]


@dataclasses.dataclass(frozen=True)
class _Corrected:
    """A rollout as the update phase reads it (`to_batch`), after the staleness correction."""

    batch: Batch

    def to_batch(self) -> Batch:
        return self.batch


class DisaggregatedStep:
    """`trainer._rl_step` with the sampler on a sub-mesh of its own and the update on the rest.

    The trainer builds it when `disagg.sampler_devices` > 0 and calls it in place of
    `_rl_step` (same arguments); it trains on `train_mesh`. Each call takes the step's
    rollout from the `SamplerPipeline` (sampled on `sampler_mesh`), corrects its staleness
    (off-policy), runs the trainer's update phase, and moves the new weights to the sampler.
    Off-policy, the rollout of a step whose number is a multiple of `checkpoint.save_every`
    is not prefetched: the checkpoint before it holds the data position and the weights
    that sample it, so a resumed run continues exactly as the uninterrupted one. (A run
    stopped by `train.time_limit_s` saves after a step whose successor's prompts the
    prefetch has already drawn: resumed, it goes on from the prompts after those.)

    Args:
      cfg: the experiment (an edge: read here).
      model_config: the policy's architecture.
      mesh: the mesh whose devices are split (None: every global device).
      update: the trainer's update phase, (step_fn, state, rollout, cfg, step) ->
        (state, metrics, tokens), reading the rollout through `to_batch()`.

    Raises:
      ConfigError: PPO with a critic (it runs colocated), off-policy over several processes
        (synchronous only there), or a split that the meshes do not fit.
    """

    def __init__(self, cfg: ExperimentConfig, model_config: ModelConfig, mesh: Mesh | None,
                 update: Callable[..., tuple[Any, dict[str, float], int]]) -> None:
        n = cfg.disagg.sampler_devices
        if jax.process_count() > 1 and cfg.disagg.off_policy:
            raise ConfigError(f"disagg.off_policy: the trainer over {jax.process_count()} processes splits "
                              "the devices synchronously only (a background rollout's collectives could "
                              "interleave with the update's in another order on each process)")
        if cfg.ppo.enabled:
            raise ConfigError(f"disagg.sampler_devices: {n} splits the devices, which the policy-gradient "
                              "loop supports; PPO with a critic (ppo.enabled) runs colocated "
                              "(disagg.sampler_devices 0)")
        devices = None if mesh is None else list(mesh.devices.flat)
        total = len(jax.devices()) if devices is None else len(devices)
        try:
            self.train_mesh, self.sampler_mesh = split_meshes(
                cfg.disagg, cfg.mesh, sampler_mesh_config(cfg.mesh), devices)
        except ConfigError as err:
            if str(err).startswith("disagg."):
                raise
            raise ConfigError(f"disagg.sampler_devices: {n} of the {total} devices sample and "
                              f"{total - n} train; a mesh does not fit its side: {err}") from err
        self._update = update
        self._pipeline = SamplerPipeline(cfg.disagg, param_shardings(model_config, self.sampler_mesh),
                                         prefetch=functools.partial(_may_prefetch, cfg))
        self._loaded = False

    def __call__(self, cfg: ExperimentConfig, model_config: ModelConfig, step_fn: Any, state: Any, task: Any,
                 settings: Any, reward: Any, timer: PhaseTimer, mesh: Any, step: int):
        """Rollout (from the sampler), rewards and update for step `step`; (state, metrics)."""
        timer.reset()
        if not self._loaded:  # the first step of this run (fresh or resumed): the sampler's weights
            self._pipeline.load(state.params)
            self._loaded = True
        produce = functools.partial(self._produce, cfg, model_config, task, settings, reward)
        (rollout, timings), staleness, waited = self._pipeline.take(step, produce)
        source, extra = rollout, {}
        several = multihost.spans_processes(self.sampler_mesh)
        if several:  # the global batch, moved shard by shard to the training devices of each process
            batch = rollout.to_batch()
            batch = transfer_weights(batch, jax.tree.map(lambda _: batch_sharding(self.train_mesh), batch))[0]
            source = _Corrected(batch)
        if cfg.disagg.off_policy:
            batch = jax.device_put(rollout.to_batch(), batch_sharding(self.train_mesh))
            logp = _train_logp(state.params, batch.tokens, batch.attention_mask, model_config=model_config,
                               start=batch.loss_start, temperature=cfg.sampling.temperature or 1.0)
            batch, weights = correct_staleness(batch, logp, cfg.disagg.is_cap)
            source, extra = _Corrected(batch), {f"offpolicy/{k}": float(v) for k, v in
                                                jax.device_get(weights).items()}
        with timer.phase("update"):
            state, metrics, tokens = self._update(step_fn, state, source, cfg, step)
        transfer = self._pipeline.updated(state.params)
        lap = timer.lap() | timings
        if several:  # one clock for every process (train.time_limit_s), the whole batch's metrics
            lap = multihost.slowest(lap)
        metrics |= (multihost.rollout_metrics(rollout) if several else rollout_metrics(rollout)) | lap | extra
        metrics |= {"time/transfer": transfer, "time/rollout_wait": waited,
                    "rollout/staleness": float(staleness),
                    "throughput/tokens_per_s": tokens / lap["time/step"]}
        return state, metrics

    def _produce(self, cfg: ExperimentConfig, model_config: ModelConfig, task: Any, settings: Any,
                 reward: Any, params: Params, step: int) -> tuple[Any, dict[str, float]]:
        """The rollout of `step` on the sampler's `params` and mesh, with its own phase timer
        (off-policy it runs on the background thread, beside the update's)."""
        own = PhaseTimer()
        if isinstance(reward, WeightedRewards):
            reward = dataclasses.replace(reward, timer=own)
        rng = jax.random.fold_in(jax.random.key(cfg.seed), step)
        if multihost.spans_processes(self.sampler_mesh):  # each process samples and scores its share
            if cfg.loss.dynamic_sampling:
                raise ConfigError("loss.dynamic_sampling runs on one process only (the sampler's mesh "
                                  f"spans {jax.process_count()} processes)")
            rollout = multihost.collect_rows(
                task.train_source, task.encode, params, model_config, num_prompts=cfg.train.prompts_per_step,
                settings=settings, decode=task.decode, reward=reward, rng=rng, mesh=self.sampler_mesh,
                timer=own)
        else:
            rollout = collect(
                task.train_source.take, task.encode, params, model_config,
                num_prompts=cfg.train.prompts_per_step, settings=settings, decode=task.decode, reward=reward,
                rng=rng, mesh=self.sampler_mesh, dynamic_sampling=cfg.loss.dynamic_sampling,
                max_rounds=cfg.loss.max_sampling_rounds, timer=own)
        timings = own.lap()
        return rollout, {k: v for k, v in timings.items() if k != "time/step"}

    def close(self) -> None:
        """Stop the background rollout thread (a rollout in flight finishes first)."""
        self._pipeline.close()


def _may_prefetch(cfg: ExperimentConfig, step: int) -> bool:
    every = cfg.checkpoint.save_every
    return step < cfg.train.steps and not (every and step % every == 0)
