"""One process of the two-process disaggregated trainer test (tests/test_disaggregated_multihost.py).

    python tests/disagg_multihost_trainer_worker.py PROCESS_ID PORT WORKDIR

Two processes x 4 simulated CPU devices run `trainer.train` on the quickstart's task
(tests/multihost_trainer_worker.py's tiny configuration) twice: colocated on all 8
devices, then with `--disagg.sampler_devices 4` (each process samples on 2 of its
devices and trains on the other 2). WORKDIR/trainer-<process>.json holds the largest
difference of the two final policies, how far training moved them, and both runs'
per-step rewards and weight-transfer times.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import multihost_trainer_worker as base  # noqa: E402

STEPS = 2


def run(workdir: Path, *extra: str) -> dict:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from ouroboros_jax.config import MeshConfig
    from ouroboros_jax.disaggregated import sampler_mesh_config, split_meshes
    from ouroboros_jax.models import init_sharded
    from ouroboros_jax.trainer import train

    cfg = base.experiment(workdir, "--train.steps", str(STEPS), "--train.eval_every", "0",
                          "--checkpoint.save_every", "0", *extra)
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=1, fsdp=-1, tensor=2))
    train_mesh, _ = split_meshes(cfg.disagg, cfg.mesh, sampler_mesh_config(cfg.mesh))
    params = init_sharded(cfg.model, jax.random.key(cfg.seed), train_mesh)
    gather = lambda tree: jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                                       tree)
    start = gather(params)
    result = train(cfg, model_config=cfg.model, params=params, task=base.make_task(cfg))
    return {"start": start, "final": gather(result.state.params),
            "rewards": [h["reward/mean"] for h in result.history],
            "transfer": [h.get("time/transfer", 0.0) for h in result.history]}


def main(process_id: int, port: int, workdir: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={base.LOCAL_DEVICES}"
    import jax
    import numpy as np

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=base.N_PROCESSES,
                               process_id=process_id, initialization_timeout=60)
    try:
        colocated = run(Path(workdir) / "colocated")
        split = run(Path(workdir) / "split", "--disagg.sampler_devices", "4")
        gap = lambda a, b: max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))
        result = {"max_diff": gap(colocated["final"], split["final"]),
                  "moved": gap(split["final"], split["start"]),
                  "same_start": gap(colocated["start"], split["start"]),
                  "rewards": [colocated["rewards"], split["rewards"]], "transfer": split["transfer"]}
        (Path(workdir) / f"trainer-{process_id}.json").write_text(json.dumps(result))
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
