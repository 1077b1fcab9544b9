"""One process of the two-process disaggregation test (tests/test_disaggregated_multihost.py starts two).

    python tests/disagg_multihost_worker.py PROCESS_ID PORT WORKDIR

Each process has 4 simulated CPU devices; `jax.distributed` joins the two into
8. The same three synchronous `run_loop` updates run colocated (all 8 devices)
and split (`sampler_devices=4`: 2 of each process's devices sample, 2 train,
since multi-controller JAX reshards only between devices of one process), and
the process writes WORKDIR/<process>.json with the largest difference of the
two final policies and how far training moved them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

N_PROCESSES = 2
LOCAL_DEVICES = 4
B, PROMPT, COMPLETION = 8, 4, 8
T = PROMPT + COMPLETION
STEPS = 3


def rows(step: int, vocab_size: int) -> dict:
    """The rollout of `step`, the same on every process (a stand-in for sampling)."""
    import numpy as np

    rs = np.random.RandomState(step)
    tokens = rs.randint(1, vocab_size, (B, T)).astype(np.int32)
    pos = np.arange(T)
    length = 1 + rs.randint(0, COMPLETION, B)
    attention = pos < PROMPT + length[:, None]
    return dict(tokens=np.where(attention, tokens, 0), attention=attention,
                loss_mask=(pos >= PROMPT) & attention, advantages=rs.randn(B).astype(np.float32))


def run(split) -> dict:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from ouroboros_jax.batch import Batch
    from ouroboros_jax.config import LOSS_PRESETS, MeshConfig, ModelConfig
    from ouroboros_jax.disaggregated import run_loop, split_meshes, transfer_weights
    from ouroboros_jax.models import init_sharded, param_shardings, param_specs, policy_logprobs
    from ouroboros_jax.objectives import policy_gradient
    from ouroboros_jax.sharding import batch_sharding
    from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step
    from ouroboros_jax.trainer import policy_loss_settings

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
    gather = lambda tree: jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                                       tree)
    fast = {"xla_backend_optimization_level": 0}
    train_mesh, sampler_mesh = split_meshes(split, MeshConfig(), MeshConfig())
    loss = policy_loss_settings(LOSS_PRESETS["dr_grpo"], max_completion_len=COMPLETION)
    tx = make_optimizer(3e-2)
    step, shardings = make_train_step(policy_gradient(cfg, logprob_chunk=8, **loss), tx, train_mesh,
                                      param_specs(cfg), micro_batch_size=4, compiler_options=fast)
    state = init_train_state(init_sharded(cfg, jax.random.key(0), train_mesh), tx, jax.random.key(0),
                             shardings=shardings)
    start = gather(state.params)
    logp = jax.jit(lambda p, t, m: policy_logprobs(p, cfg, t, m, with_entropy=False)[0],
                   compiler_options=fast)

    def produce(params, t: int) -> Batch:
        sharding = batch_sharding(sampler_mesh)
        r = {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
             for k, v in rows(t, cfg.vocab_size).items()}
        old = logp(params, r["tokens"], r["attention"])
        return Batch(r["tokens"], r["attention"], r["loss_mask"], old, r["advantages"], loss_start=PROMPT)

    def to_train(batch: Batch) -> Batch:
        return transfer_weights(batch, jax.tree.map(lambda _: batch_sharding(train_mesh), batch))[0]

    state, history = run_loop(state, step, produce, param_shardings(cfg, sampler_mesh), STEPS, split,
                              to_train=to_train)
    devices = {d.process_index for x in jax.tree.leaves(state.params) for d in x.sharding.device_set}
    return {"start": start, "final": gather(state.params), "transfer": [h["time/transfer"] for h in history],
            "train_processes": sorted(devices)}


def main(process_id: int, port: int, workdir: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    import jax
    import numpy as np

    from ouroboros_jax.config import DisaggregationConfig

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=N_PROCESSES,
                               process_id=process_id, initialization_timeout=60)
    try:
        colocated = run(DisaggregationConfig())
        split = run(DisaggregationConfig(sampler_devices=4))
        gap = lambda a, b: max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))
        result = {"max_diff": gap(colocated["final"], split["final"]),
                  "moved": gap(split["final"], split["start"]),
                  "same_start": gap(colocated["start"], split["start"]), "transfer": split["transfer"],
                  "train_processes": split["train_processes"]}
        (Path(workdir) / f"{process_id}.json").write_text(json.dumps(result))
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
