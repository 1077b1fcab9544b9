"""One process of the multi-process trainer test (tests/test_multihost_trainer.py starts two).

    python tests/multihost_trainer_worker.py PHASE PROCESS_ID PORT WORKDIR

Each process has 4 simulated CPU devices; `jax.distributed` joins the two into
one runtime of 8 devices (gloo collectives), and `trainer.train` runs the
quickstart's arithmetic task on a tiny model over the global mesh.

PHASE "once": one step, no evaluation, no checkpoint (the default suite's test).
PHASE "killed": train until step 3's rollout starts (checkpoints 1 and 2 are
saved by then), write WORKDIR/ready-<process>, and wait to be killed.
PHASE "resume": a fresh pair on the same run directory: resume and finish.
Each process appends every step's metrics to WORKDIR/<phase>-history-<process>.jsonl,
the prompts it read to WORKDIR/<phase>-prompts-<process>.jsonl, and writes its
result to WORKDIR/<phase>-<process>.json; process 0 saves the final parameters.

`experiment` and `make_task` are imported by the test for the single-process
reference run (one process, 8 devices, the same config).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

N_PROCESSES = 2
LOCAL_DEVICES = 4
STEPS, PROMPTS, GROUP = 3, 4, 4  # 4 prompts x 4 samples = 16 rows a step, 2 updates of 8 rows
KILL_AT_STEP = 3
ROOT = Path(__file__).resolve().parents[1]


def quickstart():
    path = ROOT / "experiments" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart_multihost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def experiment(run_dir: Path, *extra: str):
    """The quickstart's config on a tiny model, checkpointing every step (mesh 1 x 4 x 2).

    No q/k/v biases: the gradient of a key bias is zero up to rounding (softmax ignores a shift),
    and Adam turns that rounding noise into steps of the learning rate's size, which would
    differ between any two reduction orders."""
    from ouroboros_jax.config import MeshConfig, parse_cli

    args = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2",
            "--model.n_kv_heads", "2", "--model.head_dim", "16", "--model.d_ff", "64", "--model.no_qkv_bias",
            "--train.steps", str(STEPS),
            "--train.prompts_per_step", str(PROMPTS), "--sampling.group_size", str(GROUP),
            "--train.mini_batch_size", "8", "--train.micro_batch_size", "0", "--train.eval_every", str(STEPS),
            "--train.eval_size", "4", "--sampling.eval_num_samples", str(GROUP),
            "--optimizer.learning_rate", "1e-2",
            "--checkpoint.save_every", "1", "--checkpoint.no_async_save", "--logging.no_tensorboard",
            "--logging.no_console", "--compilation_cache_dir", "", "--logging.run_dir", str(run_dir), *extra]
    cfg = parse_cli(quickstart().DEFAULT, args=args)
    return dataclasses.replace(cfg, mesh=MeshConfig(data=1, fsdp=4, tensor=2))


def digit_share(completions) -> list[float]:
    """A graded reward a random model already varies on: the share of digits in the completion."""
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions.texts]


def make_task(cfg, prompts_file: Path | None = None, scored_file: Path | None = None, block_at: int = 0):
    """The quickstart's task with the digit-share reward beside the verifier. Records the prompts this
    process reads and the rows it scores; with `block_at`, reading the prompts at that data position
    announces itself (WORKDIR/ready-<process>) and waits to be killed."""
    import jax

    from ouroboros_jax.rewards import FnReward

    task = quickstart().make_task(cfg)
    source, take = task.train_source, task.train_source.take

    def recording_take(n: int):
        if block_at and source.position >= block_at:
            (prompts_file.parent / f"ready-{jax.process_index()}").write_text(str(source.position))
            parent = os.getppid()
            while os.getppid() == parent:  # until the test kills it, or exit if the test itself is gone
                time.sleep(0.2)
            os._exit(1)
        at = source.position
        examples = take(n)
        if prompts_file is not None:
            with prompts_file.open("a") as f:
                f.write(json.dumps({"position": at, "prompts": [e.prompt for e in examples]}) + "\n")
        return examples

    def scored(completions) -> list[float]:
        rewards = digit_share(completions)
        if scored_file is not None:
            with scored_file.open("a") as f:
                f.write(json.dumps(rewards) + "\n")
        return rewards

    source.take = recording_take
    return dataclasses.replace(task, reward_model=FnReward(scored))


class Recorder:
    """The run's metric writers (process 0 writes the files) plus this process's own history."""

    def __init__(self, inner, path: Path):
        self.inner, self.path = inner, path

    def log(self, step: int, metrics):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        return self.inner.log(step, metrics)

    def truncate_after(self, step: int) -> None:
        self.inner.truncate_after(step)

    def close(self) -> None:
        self.inner.close()


def run(phase: str, workdir: Path) -> dict:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from ouroboros_jax.metrics import MetricsLogger
    from ouroboros_jax.models import init_sharded
    from ouroboros_jax.sharding import make_mesh
    from ouroboros_jax.trainer import train

    me = jax.process_index()
    # The killed and the resumed pair compile the same programs: the second reads them from disk.
    quick = ["--train.steps", "1", "--train.eval_every", "0", "--checkpoint.save_every", "0"]
    cfg = experiment(workdir / "run", *(quick if phase == "once" else []))
    cfg = dataclasses.replace(cfg, compilation_cache_dir=str(workdir / "xla"))
    mesh = make_mesh(cfg.mesh)
    params = init_sharded(cfg.model, jax.random.key(cfg.seed), mesh)
    block_at = (KILL_AT_STEP - 1) * PROMPTS if phase == "killed" else 0
    task = make_task(cfg, workdir / f"{phase}-prompts-{me}.jsonl", workdir / f"{phase}-scored-{me}.jsonl",
                     block_at)
    logger = Recorder(MetricsLogger.from_config(cfg.logging), workdir / f"{phase}-history-{me}.jsonl")
    result = train(cfg, model_config=cfg.model, params=params, task=task, mesh=mesh, logger=logger)
    flat = {jax.tree_util.keystr(k): np.asarray(multihost_utils.process_allgather(v, tiled=True))
            for k, v in jax.tree_util.tree_leaves_with_path(result.state.params)}
    if me == 0:
        np.savez(workdir / f"{phase}-params.npz", **flat)
    return dict(process_index=me, resumed_from=result.resumed_from, position=task.train_source.position,
                steps=[int(h["train/finite"]) for h in result.history])


def main(phase: str, process_id: int, port: int, workdir: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=N_PROCESSES,
                               process_id=process_id, initialization_timeout=60)
    try:
        result = run(phase, Path(workdir))
        (Path(workdir) / f"{phase}-{process_id}.json").write_text(json.dumps(result))
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    phase_, pid, port_, work = sys.argv[1:5]
    main(phase_, int(pid), int(port_), work)
