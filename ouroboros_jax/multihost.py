"""The rollout of one RL step when the mesh spans several processes (hosts).

With `jax.distributed` every process runs the same program on one global mesh,
and holds only the rows of a batch that its own devices hold. The trainer's
rollout then works per process:

1. the prompt batch is laid out exactly as on one process (the B prompts of
   the step, padded to the batch shards); each process reads from the prompt
   source only the prompts of its rows (`prompt_rows`), and every process
   advances the source by B, so all of them stay at the same data position;
2. the sampler runs once over the global mesh, each process feeding its rows
   (`generate_rows`); row r draws from `fold_in(rng, r)` with r its global
   row, so a run samples the same completions on 1 or N processes;
3. rewards are computed by each process for its own completions;
4. the training batch is one global array assembled from each process's rows
   (`global_batch`), cut into mini-batches on the devices (`take_rows`); the
   update step runs on it unchanged;
5. the step's host metrics (rewards, accuracy, lengths...) are those of the
   whole batch (`rollout_metrics`: a few small arrays are all-gathered).

Nothing here runs on a single process: there the trainer keeps its host path.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, Int

from ouroboros_jax import sampling
from ouroboros_jax.batch import Batch, pack_rows
from ouroboros_jax.config import ConfigError, ModelConfig
from ouroboros_jax.metrics import PhaseTimer
from ouroboros_jax.rewards.base import RewardSource
from ouroboros_jax.rollout import Rollout, RolloutSettings, sample_and_score
from ouroboros_jax.rollout import rollout_metrics as host_rollout_metrics
from ouroboros_jax.sharding import batch_sharding, batch_shards, logical_to_spec, replicated


def spans_processes(mesh: Mesh | None) -> bool:
    """True when `mesh` holds devices of other processes (the multi-process path is needed)."""
    if mesh is None or jax.process_count() == 1:
        return False
    me = jax.process_index()
    return any(d.process_index != me for d in mesh.devices.flat)


def process_block(mesh: Mesh, rows: int) -> range:
    """The rows of a [rows]-row batch (sharded as `batch_sharding(mesh)`) held by this process.

    Raises:
      ConfigError: when this process's devices hold rows that are not one contiguous block
        (a mesh whose batch axes interleave the processes' devices).
    """
    index = batch_sharding(mesh).addressable_devices_indices_map((rows,))
    spans = sorted({s[0].indices(rows)[:2] for s in index.values()})
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        if start != stop:
            raise ConfigError(
                f"mesh {dict(mesh.shape)}: process {jax.process_index()} holds batch rows {spans}, not one "
                "contiguous block; order the mesh's devices so that each process's devices are adjacent "
                "along the batch axes (data, fsdp)")
    return range(spans[0][0], spans[-1][1])


def prompt_rows(mesh: Mesh, num_prompts: int) -> tuple[range, int]:
    """(padded prompt rows this process holds, how many of them are real prompts).

    The prompt batch is padded as the sampler pads it on one process (to the next
    power of two, rounded up to the batch shards); real prompts come first.
    """
    padded = sampling.bucket_size(num_prompts, None, multiple=batch_shards(mesh))
    block = process_block(mesh, padded)
    return block, max(0, min(block.stop, num_prompts) - block.start)


def read_slice(source: Any, mesh: Mesh, num_prompts: int) -> list[Any]:
    """This process's prompts of the next `num_prompts`; the source moves past all of them
    (on every process, so a checkpoint's data position is the same everywhere).

    Raises:
      ConfigError: when some process would hold no prompt (every process scores its own).
    """
    block, real = prompt_rows(mesh, num_prompts)
    padded = sampling.bucket_size(num_prompts, None, multiple=batch_shards(mesh))
    if num_prompts <= padded - len(block):  # the last block holds only padding (the same test everywhere)
        raise ConfigError(
            f"train.prompts_per_step: {num_prompts} prompts leave a process of the {jax.process_count()} "
            f"without prompts (each holds {len(block)} of the {padded} padded rows); use at least "
            f"{padded - len(block) + 1}")
    start = source.position
    source.seek(start + block.start)
    examples = source.take(real)
    source.seek(start + num_prompts)
    return examples


def _max_over_processes(value: int) -> int:
    return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int32))))


def _gather_float64(x: np.ndarray) -> np.ndarray:
    """Every process's `x` (float64, the same shape everywhere) stacked: [processes, ...]. Sent as
    bits, so the values arrive exactly (JAX arrays are 32-bit unless x64 is on)."""
    bits = np.ascontiguousarray(x, np.float64).view(np.uint32)
    return np.ascontiguousarray(multihost_utils.process_allgather(bits)).view(np.float64)


@functools.partial(jax.jit, static_argnames=("sharding",))
def _placed(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, sharding)


def local_rows(x: jax.Array, sharding: NamedSharding) -> np.ndarray:
    """The rows of global array `x` that this process holds under the row `sharding`, in order."""
    x = _placed(x, sharding)
    pieces = {s.index[0].indices(x.shape[0])[0]: s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(pieces[k]) for k in sorted(pieces)])


def generate_rows(
    params: Any, model_config: ModelConfig, prompt_tokens: Sequence[Sequence[int]], *, num_prompts: int,
    mesh: Mesh, max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
    top_k: int = 0, stop_token_ids: Sequence[int] = (), rng: jax.Array,
    prompt_len_buckets: Sequence[int] | None = sampling.DEFAULT_PROMPT_LEN_BUCKETS,
) -> sampling.SampleOutput:
    """`sampling.generate` over a mesh of several processes, each passing only its prompts.

    Args:
      prompt_tokens: this process's prompts (those of `prompt_rows(mesh, num_prompts)`).
      num_prompts: the prompts of all processes together.
      The rest as in `sampling.generate` (the batch bucket is the next power of two).
    Returns:
      The `SampleOutput` of this process's prompts (host arrays), as `generate` returns
      for all of them on one process: the prompt bucket is agreed over the processes.
    """
    cfg, G, C = model_config, num_samples, max_new_tokens
    sampling._check_args(cfg, C, G, temperature, top_p, top_k, stop_token_ids)
    block, real = prompt_rows(mesh, num_prompts)
    if len(prompt_tokens) != real:
        raise ValueError(f"prompt_tokens: {len(prompt_tokens)} prompts, but this process holds {real} "
                         f"of the {num_prompts} (rows {block.start}..{block.stop - 1})")
    tokens, mask = sampling.pack_prompts(prompt_tokens)
    T = _max_over_processes(tokens.shape[1])  # one prompt bucket for all processes
    if T + C > cfg.max_seq_len:
        raise ValueError(f"longest prompt ({T}) + max_new_tokens ({C}) exceeds the model's "
                         f"max_seq_len ({cfg.max_seq_len})")
    P = sampling.bucket_size(T, prompt_len_buckets)
    tokens_p, mask_p = sampling._pad_to_bucket(tokens, mask, len(block), P)
    B_pad = sampling.bucket_size(num_prompts, None, multiple=batch_shards(mesh))
    sampling.check_cache_fits(cfg, mesh, rows=B_pad * G, cache_slots=P + C)
    rows, by_row = NamedSharding(mesh, logical_to_spec(("batch", None))), batch_sharding(mesh)
    inputs = (jax.make_array_from_process_local_data(rows, tokens_p, (B_pad, P)),
              jax.make_array_from_process_local_data(rows, mask_p, (B_pad, P)),
              jax.make_array_from_process_local_data(by_row, np.asarray(block) < num_prompts, (B_pad,)))
    static, knobs, rng = sampling.program_settings(
        cfg, mesh, max_new_tokens=C, num_samples=G, temperature=temperature, top_p=top_p, top_k=top_k,
        stop_token_ids=stop_token_ids, rng=rng, cache_slots=P + C)
    out = sampling._sample_bucket(params, cfg, *inputs, knobs, rng, static=static)
    host = {k: local_rows(v, by_row)[:real * G] for k, v in out.items() if k != "steps"}
    lengths = host["lengths"]
    return sampling.SampleOutput(
        tokens=host["tokens"], mask=np.arange(C)[None, :] < lengths[:, None], logprobs=host["logprobs"],
        policy_logprobs=host["policy_logprobs"], lengths=lengths, truncated=host["truncated"],
        prompt_tokens=np.repeat(tokens_p[:real], G, axis=0), prompt_mask=np.repeat(mask_p[:real], G, axis=0),
        steps=int(np.asarray(_placed(out["steps"], replicated(mesh)))))


@dataclasses.dataclass
class ProcessRollout(Rollout):
    """This process's groups of a rollout over several processes; `to_batch` is the global batch
    of every process's groups (a collective: every process calls it at the same point)."""

    mesh: Any = None
    num_prompts: int = 0

    def to_batch(self) -> Batch:
        """All processes' rows as one global array of num_prompts * G rows, in the order one
        process would have them (prompt-major), sharded by rows over the mesh."""
        block, _ = prompt_rows(self.mesh, self.num_prompts)
        G, s = self.group_size, self.sample
        lengths = np.asarray(s.lengths)
        local = pack_rows(
            [p[m] for p, m in zip(s.prompt_tokens, s.prompt_mask, strict=True)],
            [t[:n] for t, n in zip(s.tokens, lengths, strict=True)],
            completion_logp=[lp[:n] for lp, n in zip(s.policy_logprobs, lengths, strict=True)],
            advantages=self.advantages.reshape(-1), loss_rows=self.loss_rows,
            prompt_width=s.prompt_tokens.shape[1], completion_width=s.tokens.shape[1],
            num_rows=len(block) * G)
        padded = sampling.bucket_size(self.num_prompts, None, multiple=batch_shards(self.mesh)) * G
        sharding = batch_sharding(self.mesh)
        whole = jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(sharding, a, (padded, *a.shape[1:])), local)
        return take_rows(whole, np.arange(self.num_prompts * G))


def collect_rows(
    source: Any, encode: Callable[[Sequence[Any]], Sequence[Sequence[int]]], params: Any,
    model_config: ModelConfig, *, num_prompts: int, settings: RolloutSettings,
    decode: Callable[[Sequence[int]], str], reward: RewardSource, rng: jax.Array, mesh: Mesh,
    timer: PhaseTimer | None = None,
) -> ProcessRollout:
    """`rollout.collect` on several processes: this process's share of the step's prompts, sampled
    on the global mesh and scored here (with the keys `collect` uses, so the completions are those
    of one process). The result holds this process's groups; its `to_batch` and `rollout_metrics`
    see every process's."""
    examples = read_slice(source, mesh, num_prompts)
    generate_fn = functools.partial(generate_rows, num_prompts=num_prompts)
    part = sample_and_score(params, model_config, examples, encode(examples), settings=settings,
                            decode=decode, reward=reward, rng=jax.random.fold_in(rng, 0), mesh=mesh,
                            timer=timer, generate_fn=generate_fn)
    fields = {f.name: getattr(part, f.name) for f in dataclasses.fields(Rollout)}
    return ProcessRollout(**fields | {"groups_drawn": num_prompts}, mesh=mesh, num_prompts=num_prompts)


@functools.partial(jax.jit, static_argnames=("sharding",))
def _take(batch: Batch, rows: Int[Array, " N"], sharding: NamedSharding) -> Batch:
    return jax.lax.with_sharding_constraint(jax.tree.map(lambda a: a[rows], batch), sharding)


def take_rows(batch: Batch, rows: np.ndarray) -> Batch:
    """Rows `rows` of a global batch (sharded by rows), as a global batch sharded by rows: the rows
    move between devices and processes on the devices, never through a host."""
    mesh = batch.tokens.sharding.mesh
    return _take(batch, jax.device_put(np.asarray(rows, np.int32), replicated(mesh)), batch_sharding(mesh))


def rollout_metrics(rollout: ProcessRollout) -> dict[str, float]:
    """`rollout.rollout_metrics` of the whole step's batch: each process's rewards, correctness,
    lengths and verifier failures are all-gathered (a few numbers per row); the reward source's own
    metrics are averaged over the processes, weighted by their rows."""
    block, real = prompt_rows(rollout.mesh, rollout.num_prompts)
    G, n = rollout.group_size, len(block)

    def padded(x: Any) -> np.ndarray:
        return np.concatenate([np.asarray(x, np.float64).reshape(real, G), np.zeros((n - real, G))])

    kinds = [getattr(v, "error", None) for v in rollout.verdicts]
    codes = [0 if k is None else 1 if k == "timeout" else 2 for k in kinds]
    local = np.stack([padded(rollout.rewards), padded(rollout.correct), padded(rollout.sample.lengths),
                      padded(rollout.sample.truncated), padded(codes)])
    everyone = _gather_float64(local)  # [processes, 5, n, G]
    starts = np.asarray(multihost_utils.process_allgather(np.asarray([block.start]))).reshape(-1)
    rows = np.concatenate([everyone[i] for i in np.argsort(starts)], axis=1)[:, :rollout.num_prompts]
    rewards, correct, lengths, truncated, failures = rows
    names = sorted(rollout.metrics)
    values = np.asarray([rollout.metrics[k] * real for k in names] + [real], np.float64)
    summed = _gather_float64(values).sum(axis=0)
    failed = {1: "timeout", 2: "error"}
    whole = SimpleNamespace(
        rewards=rewards, correct=correct.astype(bool), groups_drawn=rollout.groups_drawn,
        sample=SimpleNamespace(lengths=lengths.reshape(-1), truncated=truncated.reshape(-1).astype(bool)),
        verdicts=[SimpleNamespace(error=failed.get(int(c))) for c in failures.reshape(-1)],
        metrics={k: float(v / summed[-1]) for k, v in zip(names, summed[:-1], strict=True)})
    return host_rollout_metrics(whole)


def slowest(timings: dict[str, float]) -> dict[str, float]:
    """Each phase's time as the slowest process measured it: one clock for all processes, so that
    a decision on time (`train.time_limit_s`) stops every process after the same step."""
    names = sorted(timings)
    most = _gather_float64(np.asarray([timings[k] for k in names], np.float64)).max(axis=0)
    return {k: float(v) for k, v in zip(names, most, strict=True)}

