"""One process of the multi-host tests (tests/test_multihost.py starts two).

    python tests/multihost_worker.py PHASE PROCESS_ID PORT CHECKPOINT WORKDIR

Each process has 4 simulated CPU devices; `jax.distributed` joins the two
into one runtime of 8 devices with gloo collectives. PHASE "train" loads the
HF checkpoint onto the global mesh, builds the GRPO batch from each process's
own slice of the prompts, takes one update step, exports the model and saves
an orbax checkpoint; PHASE "restore" (a fresh pair) restores that checkpoint.
Results go to WORKDIR/<phase>-<process>.json and, from process 0, .npz files
that the test compares with one process of 8 devices.

The pieces that define the computation (`mesh_config`, `local_rows`,
`build_step`) are imported by the test to compute the single-process reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

N_PROCESSES = 2
LOCAL_DEVICES = 4
N_PROMPTS, GROUP, PROMPT, COMPLETION = 4, 2, 6, 8  # 4 prompts x 2 completions = 8 rows
T = PROMPT + COMPLETION


def mesh_config():
    from ouroboros_jax.config import MeshConfig

    return MeshConfig(data=1, fsdp=4, tensor=2)


def prompt_slice(process_index: int, process_count: int) -> range:
    """The prompts a process reads: a contiguous slice of the global list."""
    per = N_PROMPTS // process_count
    return range(process_index * per, (process_index + 1) * per)


def local_rows(prompts: range, vocab_size: int) -> dict:
    """Rows for the given prompts: deterministic "completions", rewards scored here, group advantages.

    The reward of a completion is the share of its tokens that are even: it is
    computed on the host that holds the completion, never gathered.
    """
    import numpy as np

    from ouroboros_jax.algorithms import group_advantages

    tokens, attention, loss_mask, old_logp, rewards = [], [], [], [], []
    for p in prompts:
        rs = np.random.RandomState(1000 + p)
        prompt_len = 2 + p % (PROMPT - 1)
        prompt = rs.randint(1, vocab_size, PROMPT)
        for g in range(GROUP):
            length = 1 + (3 * p + 5 * g) % COMPLETION
            completion = rs.randint(1, vocab_size, COMPLETION)
            pos = np.arange(T)
            att = (pos >= PROMPT - prompt_len) & (pos < PROMPT + length)
            row = np.where(att, np.concatenate([prompt, completion]), 0)
            tokens.append(row)
            attention.append(att)
            loss_mask.append((pos >= PROMPT) & (pos < PROMPT + length))
            old_logp.append(-2.0 + 0.3 * rs.randn(T))
            rewards.append(float(np.mean(completion[:length] % 2 == 0)))
    r = np.asarray(rewards, np.float32).reshape(len(prompts), GROUP)
    adv = np.asarray(group_advantages(r)).reshape(-1)
    return dict(tokens=np.asarray(tokens, np.int32), attention_mask=np.asarray(attention),
                loss_mask=np.asarray(loss_mask), old_logp=np.asarray(old_logp, np.float32),
                advantages=adv.astype(np.float32), rewards=r.reshape(-1))


def build_step(cfg, mesh):
    """The GRPO update step (preset "grpo") on `mesh`: (step, shardings, optimizer, with_reference)."""
    from ouroboros_jax.config import LOSS_PRESETS
    from ouroboros_jax.models import param_specs
    from ouroboros_jax.objectives import policy_gradient
    from ouroboros_jax.step import make_optimizer, make_train_step
    from ouroboros_jax.trainer import policy_loss_settings

    loss = policy_loss_settings(LOSS_PRESETS["grpo"], max_completion_len=COMPLETION)
    tx = make_optimizer(1e-2)
    objective = policy_gradient(cfg, logprob_chunk=8, **loss)
    step, shardings = make_train_step(objective, tx, mesh, param_specs(cfg), micro_batch_size=4,
                                      compiler_options={"xla_backend_optimization_level": 0})
    return step, shardings, tx, objective.uses_reference


def to_batch(rows: dict, make):
    from ouroboros_jax.batch import Batch

    return Batch(make(rows["tokens"]), make(rows["attention_mask"]), make(rows["loss_mask"]),
                 make(rows["old_logp"]), make(rows["advantages"]), loss_start=PROMPT)


def main(phase: str, process_id: int, port: int, checkpoint: str, workdir: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=N_PROCESSES,
                               process_id=process_id, initialization_timeout=60)
    try:
        result = (train if phase == "train" else restore)(checkpoint, Path(workdir))
        out = Path(workdir) / f"{phase}-{process_id}.json"
        out.write_text(json.dumps(result))
    finally:
        jax.distributed.shutdown()


def _gathered(tree):
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def _save_npz(path: Path, tree) -> None:
    import jax
    import numpy as np

    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    np.savez(path, **flat)


def train(checkpoint: str, workdir: Path) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ouroboros_jax.checkpoint import Checkpointer
    from ouroboros_jax.models import hf
    from ouroboros_jax.sharding import batch_sharding, make_mesh
    from ouroboros_jax.step import init_train_state

    me, n = jax.process_index(), jax.process_count()
    mesh = make_mesh(mesh_config())

    # Count the elements this process reads from the safetensors files.
    read = {"elements": 0}
    original_read = hf._Reader.read

    def counting_read(self, ours, shape, index=None):
        out = original_read(self, ours, shape, index)
        read["elements"] += out.size
        return out

    hf._Reader.read = counting_read
    cfg, params = hf.load_hf_checkpoint(checkpoint, mesh=mesh)
    hf._Reader.read = original_read
    local_unique = 0
    for x in jax.tree.leaves(params):
        seen = {tuple((s.start, s.stop) for s in sh.index) for sh in x.addressable_shards}
        local_unique += len(seen) * x.addressable_shards[0].data.size
    total = sum(x.size for x in jax.tree.leaves(params))

    # Each process builds the rows of its own prompts; the batch is one global array.
    prompts = prompt_slice(me, n)
    rows = local_rows(prompts, cfg.vocab_size)
    sharding = batch_sharding(mesh)
    batch = to_batch(rows, lambda x: jax.make_array_from_process_local_data(sharding, x))

    step, shardings, tx, ref = build_step(cfg, mesh)
    state = init_train_state(params, tx, jax.random.key(0), with_reference=ref,
                             shardings=shardings)
    state, metrics = step(state, batch)
    if me == 0:
        _save_npz(workdir / "params-after.npz", _gathered(state.params))
    else:
        _gathered(state.params)

    writes = {"n": 0}
    original_write = hf._write_shards

    def counting_write(*a, **kw):
        writes["n"] += 1
        return original_write(*a, **kw)

    hf._write_shards = counting_write
    hf.export_hf_checkpoint(state.params, cfg, workdir / "export")
    hf._write_shards = original_write

    # Disaggregated: the sampler's sub-mesh takes 2 devices of each host; the weights move
    # device to device within each host.
    from ouroboros_jax.config import MeshConfig
    from ouroboros_jax.disaggregated import DisaggregationConfig, split_meshes, transfer_weights
    from ouroboros_jax.models import param_shardings

    sub = MeshConfig(data=1, fsdp=2, tensor=2)
    train_mesh, sampler_mesh = split_meshes(DisaggregationConfig(sampler_devices=4), sub, sub)
    _, on_train = hf.load_hf_checkpoint(checkpoint, mesh=train_mesh)
    moved, seconds = transfer_weights(on_train, param_shardings(cfg, sampler_mesh))
    a, b = _gathered(on_train), _gathered(moved)
    sampler_ids = sorted(d.id for d in sampler_mesh.devices.flat)
    transfer = dict(equal=all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                                      strict=True)),
                    on_sampler=all(sorted(d.id for d in x.sharding.device_set) == sampler_ids
                                   for x in jax.tree.leaves(moved)),
                    disjoint=not set(train_mesh.devices.flat) & set(sampler_mesh.devices.flat),
                    seconds=seconds)

    # Metrics: every process logs the step, one line is written (process 0).
    from ouroboros_jax.config import LoggingConfig
    from ouroboros_jax.metrics import MetricsLogger

    logger = MetricsLogger.from_config(LoggingConfig(run_dir=str(workdir / "run"), console=False,
                                                     tensorboard=False))
    logger.log(1, {"loss": metrics["loss"]})
    logger.close()

    # config.json: every process checks its run directory, process 0 alone writes it (a directory
    # of each process's own here, so that a write by process 1 would show).
    from ouroboros_jax.config import ExperimentConfig
    from ouroboros_jax.trainer import CONFIG_FILE, prepare_run_dir

    own_run = workdir / f"run-of-process-{me}"
    prepare_run_dir(dataclasses.replace(ExperimentConfig(), logging=LoggingConfig(run_dir=str(own_run))))
    config_written = (own_run / CONFIG_FILE).exists()

    ckpt = Checkpointer(workdir / "orbax", async_save=False)
    ckpt.save(1, state, metadata={"data_position": N_PROMPTS})
    ckpt.wait()
    return dict(process_index=me, process_count=n, global_devices=len(jax.devices()),
                local_devices=len(jax.local_devices()), mesh_devices=int(mesh.devices.size),
                read_elements=read["elements"], local_unique_elements=int(local_unique),
                total_elements=int(total), prompts=list(prompts),
                batch_rows=int(batch.tokens.shape[0]), local_rewards=rows["rewards"].tolist(),
                loss=float(jnp.asarray(metrics["loss"])), export_writes=writes["n"],
                finite=bool(np.isfinite(float(metrics["loss"]))), transfer=transfer,
                config_written=config_written)


def restore(checkpoint: str, workdir: Path) -> dict:
    import jax

    from ouroboros_jax.checkpoint import Checkpointer, abstract_state
    from ouroboros_jax.models import hf
    from ouroboros_jax.sharding import make_mesh
    from ouroboros_jax.step import init_train_state

    mesh = make_mesh(mesh_config())
    cfg, params = hf.load_hf_checkpoint(checkpoint, mesh=mesh)
    _, shardings, tx, ref = build_step(cfg, mesh)
    target = abstract_state(init_train_state(params, tx, jax.random.key(0), with_reference=ref,
                             shardings=shardings))
    restored = Checkpointer(workdir / "orbax", async_save=False).restore_latest(target)
    assert restored is not None, f"{workdir / 'orbax'}: no checkpoint to restore"
    same_sharding = all(x.sharding.is_equivalent_to(t.sharding, x.ndim) for x, t in
                        zip(jax.tree.leaves(restored.state), jax.tree.leaves(target), strict=True))
    gathered = _gathered(restored.state.params)
    if jax.process_index() == 0:
        _save_npz(workdir / "params-restored.npz", gathered)
    return dict(step=restored.step, metadata=restored.metadata, same_sharding=same_sharding,
                state_step=int(jax.device_get(_gathered(restored.state.step))))


if __name__ == "__main__":
    phase, pid, port, ckpt_dir, work = sys.argv[1:6]
    main(phase, int(pid), int(port), ckpt_dir, work)
