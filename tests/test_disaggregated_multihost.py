"""Disaggregation across two JAX processes x 4 simulated CPU devices (`jax.distributed`, gloo).

Each process gives 2 of its devices to the sampler and 2 to the update (multi-controller
JAX moves arrays only between devices of one process). The bare `run_loop` and
`trainer.train --disagg.sampler_devices 4`, both synchronous, end at the colocated
pair's parameters. tests/disagg_multihost_worker.py and
tests/disagg_multihost_trainer_worker.py are one process of each.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "disagg_multihost_worker.py"
TRAINER_WORKER = Path(__file__).parent / "disagg_multihost_trainer_worker.py"
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(worker: Path, workdir: Path) -> None:
    """Start both processes, wait with a time-out, kill both on any failure."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), str(port), str(workdir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the processes did not finish in {TIMEOUT_S} s:\n"
                    + "\n".join(p.communicate()[0][-3000:] for p in procs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out[-4000:]}"


@pytest.mark.slow  # two processes compile two meshes' programs each (~1 min on 2 cores)
def test_two_processes_split_synchronous_equals_colocated(tmp_path):
    _run_pair(WORKER, tmp_path)
    for i in range(2):
        result = json.loads((tmp_path / f"{i}.json").read_text())
        assert result["same_start"] == 0.0
        assert result["train_processes"] == [0, 1]  # the train sub-mesh spans both processes
        assert all(t > 0 for t in result["transfer"])
        # 8 devices vs 4: other reduction orders, which Adam's early steps (about lr x the sign of the
        # gradient, lr 3e-2) amplify where a gradient is near 0: measured 9.9e-5, against a 0.09 move
        assert result["max_diff"] < 5e-4, result
        assert result["moved"] > 1e-3  # the loop trained


@pytest.mark.slow  # two trainer runs in each of two processes (~2 min on 2 cores)
def test_two_processes_train_split_as_colocated(tmp_path):
    """`trainer.train --disagg.sampler_devices 4` over two processes (2 sampler + 2 train devices
    each) samples the same rollouts and ends at the colocated pair's parameters."""
    _run_pair(TRAINER_WORKER, tmp_path)
    for i in range(2):
        result = json.loads((tmp_path / f"trainer-{i}.json").read_text())
        colocated, split = result["rewards"]
        assert result["same_start"] == 0.0 and colocated == split  # the same completions and rewards
        assert all(t > 0 for t in result["transfer"])
        assert result["max_diff"] < 1e-5, result  # measured 6.5e-7 (no q/k/v biases: see the worker)
        assert result["moved"] > 1e-3
