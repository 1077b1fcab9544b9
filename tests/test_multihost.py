"""Multi-host for real: two JAX processes x 4 simulated CPU devices joined by `jax.distributed`.

The processes are started once per phase (tests/multihost_worker.py runs
several checks in one start) and compared with this process, which has 8
simulated devices (conftest), on the same batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("torch", reason="the tiny HF checkpoint is built with torch (pip install -e '.[parity]')")

sys.path.insert(0, str(Path(__file__).parent))
import multihost_worker as worker  # noqa: E402
from hf_fixtures import make_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(phase: str, checkpoint: Path, workdir: Path) -> list[dict]:
    """Start both processes, wait with a timeout, kill both on any failure; their JSON results."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    procs = [subprocess.Popen([sys.executable, str(Path(worker.__file__)), phase, str(i), str(port),
                               str(checkpoint), str(workdir)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(worker.N_PROCESSES)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail(f"{phase}: the processes did not finish in {TIMEOUT_S} s:\n" + "\n".join(logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"{phase}: process {i} exited with {p.returncode}:\n{out[-4000:]}"
    return [json.loads((workdir / f"{phase}-{i}.json").read_text()) for i in range(worker.N_PROCESSES)]


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    checkpoint = tmp / "hf"
    make_checkpoint("llama", checkpoint, vocab_size=96)
    train = run_pair("train", checkpoint, tmp)
    restore = run_pair("restore", checkpoint, tmp)  # a fresh pair
    return tmp, checkpoint, train, restore


@pytest.fixture(scope="module")
def reference(pair):
    """One process with 8 simulated devices: the same load, the same global batch, the same step."""
    from ouroboros_jax.models.hf import load_hf_checkpoint
    from ouroboros_jax.sharding import batch_sharding, make_mesh
    from ouroboros_jax.step import init_train_state

    _, checkpoint, _, _ = pair
    mesh = make_mesh(worker.mesh_config(), jax.devices())
    cfg, params = load_hf_checkpoint(checkpoint, mesh=mesh)
    loaded = jax.device_get(params)
    slices = [worker.local_rows(worker.prompt_slice(i, worker.N_PROCESSES), cfg.vocab_size)
              for i in range(worker.N_PROCESSES)]
    rows = {k: np.concatenate([s[k] for s in slices]) for k in slices[0]}
    batch = worker.to_batch(rows, lambda x: jax.device_put(x, batch_sharding(mesh)))
    step, shardings, tx, ref = worker.build_step(cfg, mesh)
    state, metrics = step(init_train_state(params, tx, jax.random.key(0), with_reference=ref,
                             shardings=shardings), batch)
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}
    return cfg, loaded, flat, float(metrics["loss"]), rows


def test_global_mesh_spans_both_processes(pair):
    _, _, train, _ = pair
    assert [r["process_index"] for r in train] == [0, 1]
    for r in train:
        got = (r["process_count"], r["global_devices"], r["local_devices"], r["mesh_devices"])
        assert got == (2, 8, 4, 8)


def test_each_process_reads_only_its_shards(pair):
    _, _, train, _ = pair
    for r in train:
        # Exactly the distinct slices its 4 devices hold: less than the whole model.
        assert r["read_elements"] == r["local_unique_elements"], r
        assert r["read_elements"] < r["total_elements"], r


def test_one_grpo_step_equals_one_process_of_8_devices(pair, reference):
    tmp, _, train, _ = pair
    _, _, ref_params, ref_loss, _ = reference
    got = load_npz(tmp / "params-after.npz")
    assert got.keys() == ref_params.keys()
    for k in ref_params:
        np.testing.assert_allclose(got[k], ref_params[k], atol=1e-5, err_msg=k)
    for r in train:
        assert r["loss"] == pytest.approx(ref_loss, rel=1e-4, abs=1e-6)
        assert r["finite"]


def test_prompt_slices_and_rewards_stay_where_the_completions_are(pair, reference):
    _, _, train, _ = pair
    _, _, _, _, rows = reference
    assert [r["prompts"] for r in train] == [[0, 1], [2, 3]]
    # Each process scored only its own completions; together they are the global batch's rewards.
    local = [r["local_rewards"] for r in train]
    assert all(len(x) == worker.N_PROMPTS * worker.GROUP // 2 for x in local)
    np.testing.assert_allclose(np.concatenate(local), rows["rewards"], atol=1e-7)
    assert all(r["batch_rows"] == worker.N_PROMPTS * worker.GROUP for r in train)


def test_export_and_metrics_are_written_once_with_all_shards(pair, reference):
    from ouroboros_jax.models.hf import load_hf_checkpoint

    tmp, _, train, _ = pair
    cfg, _, ref_params, _, _ = reference
    assert [r["export_writes"] for r in train] == [1, 0]
    assert [r["config_written"] for r in train] == [True, False]
    lines = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 1
    cfg2, exported = load_hf_checkpoint(tmp / "export")
    assert (cfg2.n_layers, cfg2.d_model, cfg2.vocab_size) == (cfg.n_layers, cfg.d_model, cfg.vocab_size)
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(exported)}
    for k in ref_params:
        np.testing.assert_allclose(flat[k], ref_params[k], atol=1e-5, err_msg=k)


def test_orbax_checkpoint_of_both_restores_into_a_fresh_pair(pair):
    tmp, _, _, restore = pair
    for r in restore:
        assert r["step"] == 1 and r["state_step"] == 1 and r["same_sharding"], r
        assert r["metadata"]["data_position"] == worker.N_PROMPTS
    saved, restored = load_npz(tmp / "params-after.npz"), load_npz(tmp / "params-restored.npz")
    for k in saved:
        np.testing.assert_array_equal(saved[k], restored[k], err_msg=k)


def test_weights_move_from_the_training_to_the_sampling_sub_mesh(pair):
    _, _, train, _ = pair
    for r in train:
        t = r["transfer"]
        assert t["equal"] and t["on_sampler"] and t["disjoint"] and t["seconds"] >= 0, t
