"""Checkpoints: exact resume, sharded restore, retention, crashes and full disks mid-save."""

from __future__ import annotations

import errno
import functools
import gc
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.serialization import serialization

from ouroboros_jax.checkpoint import (
    Checkpointer,
    CheckpointError,
    NonFiniteError,
    abstract_state,
    assert_finite,
    find_nonfinite,
)
from ouroboros_jax.config import (
    CheckpointConfig,
    ExperimentConfig,
    MeshConfig,
    ModelConfig,
    from_dict,
    to_dict,
)
from ouroboros_jax.models.transformer import param_shapes, param_shardings
from ouroboros_jax.sharding import make_mesh

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
OPT = optax.adamw(1e-2)


def _random_params(seed: int = 0):
    # Host-made weights: the model's real tree without compiling its initialiser.
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda shape: rng.standard_normal(shape).astype(np.float32), param_shapes(CFG),
                        is_leaf=lambda x: isinstance(x, tuple))


def _loss(params):
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))


@jax.jit
def _update(state):
    """One optimizer step and one key split: enough to make every state leaf non-trivial."""
    grads = jax.grad(_loss)(state["params"])
    updates, opt_state = OPT.update(grads, state["opt_state"], state["params"])
    rng, _ = jax.random.split(state["rng"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state, "rng": rng, "ref_params": state["ref_params"]}


@functools.cache
def _train_state():
    params = jax.tree.map(jnp.asarray, _random_params())
    state = {"step": jnp.int32(0), "params": params, "opt_state": OPT.init(params),
             "rng": jax.random.key(42), "ref_params": None}
    # Committed like restored arrays, so that `_update` compiles once for both.
    return _update(_update(jax.device_put(state, jax.devices()[0])))


def _assert_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
            assert x.dtype == y.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                      np.asarray(y).reshape(-1).view(np.uint8))


def _small(value: float = 1.0):
    return {"step": jnp.int32(int(value)), "w": jnp.full((4, 4), value)}


def test_exact_resume_is_bit_equal(tmp_path):
    state = _train_state()
    meta = {"data_position": np.int64(17), "config": to_dict(ExperimentConfig()), "note": "x"}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(2, state, meta)
        ckpt.wait()
    restored = Checkpointer(tmp_path / "ckpt").restore_latest(abstract_state(state))
    assert restored is not None and restored.step == 2
    _assert_bit_equal(restored.state, state)
    assert restored.state["ref_params"] is None
    assert restored.metadata["data_position"] == 17
    assert from_dict(ExperimentConfig, restored.metadata["config"]) == ExperimentConfig()
    # The resumed run continues exactly as the uninterrupted one.
    _assert_bit_equal(_update(restored.state), _update(state))


def _some(tree):
    # Sharded and replicated leaves, few enough that orbax's per-replica slicing compiles stay cheap.
    return {"embed_VD": tree["embed_VD"], "final_norm_D": tree["final_norm_D"],
            "layers": {k: tree["layers"][k] for k in ("q_LDNH", "down_LFD")}}


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 simulated devices")
def test_sharded_save_restores_into_requested_shardings(tmp_path):
    saved_mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    params = jax.device_put(_some(_random_params(1)), _some(param_shardings(CFG, saved_mesh)))
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, {"params": params})
        # Restore onto another layout: straight into the target shardings.
        target_mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
        shardings = _some(param_shardings(CFG, target_mesh))
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              params, shardings)
        restored = ckpt.restore(1, {"params": target}).state["params"]
    for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(params),
                                   jax.tree.leaves(shardings), strict=True):
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not restored["layers"]["q_LDNH"].sharding.is_fully_replicated


def test_keeps_last_n_and_the_best(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, best_metric="eval/accuracy", async_save=False)
    accuracies = [0.1, 0.9, 0.3, float("nan"), None, 0.2]
    for step, acc in enumerate(accuracies, start=1):
        metrics = None if acc is None else {"eval/accuracy": acc, "loss": 1.0}
        ckpt.save(step, _small(step), metrics=metrics)
    # The 2 most recent (5, 6) and the best ranked (2); NaN (4) is never ranked.
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
    ckpt.close()
    # The ranking survives a restart.
    again = Checkpointer(tmp_path, keep=2, best_metric="eval/accuracy", async_save=False)
    again.save(7, _small(7), metrics={"eval/accuracy": 0.5})
    assert again.all_steps() == [2, 6, 7] and again.best_step() == 2
    again.close()


def test_best_tracking_without_ranked_steps(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, best_metric="eval/accuracy", async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, _small(step), metrics={"loss": 1.0} if step == 2 else None)
    assert ckpt.all_steps() == [2, 3] and ckpt.best_step() is None
    ckpt.close()


def test_from_config_min_mode(tmp_path):
    cfg = CheckpointConfig(directory=str(tmp_path), keep=1, best_metric="min:eval/loss", async_save=False)
    ckpt = Checkpointer.from_config(cfg)
    assert ckpt is not None and (ckpt.best_metric, ckpt.best_mode) == ("eval/loss", "min")
    for step, loss in enumerate([3.0, 1.0, 2.0], start=1):
        ckpt.save(step, _small(step), metrics={"eval/loss": loss})
    assert ckpt.all_steps() == [2, 3] and ckpt.best_step() == 2
    ckpt.close()
    assert Checkpointer.from_config(CheckpointConfig()) is None


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from ouroboros_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], keep=1)
    ckpt.save(1, {"w": jnp.full((64, 64), 1.0)}, {"pos": 1})
    ckpt.wait()

    async def killed(self, *args, **kwargs):
        os._exit(17)  # every file of step 2 is written; the commit never happens

    atomicity.AtomicRenameTemporaryPath.finalize = killed
    ckpt.save(2, {"w": jnp.full((64, 64), 2.0)}, {"pos": 2})
    ckpt.wait()
""")


def test_killed_during_save_keeps_previous_checkpoint(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert any(".orbax-checkpoint-tmp" in name for name in os.listdir(tmp_path))

    ckpt = Checkpointer(tmp_path, keep=1)
    target = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    restored = ckpt.restore_latest(target)
    assert restored.step == 1 and restored.metadata == {"pos": 1}
    np.testing.assert_array_equal(restored.state["w"], np.ones((64, 64)))
    # The resumed run saves over the ground the dead one left.
    ckpt.save(2, {"w": jnp.full((64, 64), 3.0)})
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["2"]


def test_torn_committed_step_is_set_aside(tmp_path):
    import shutil

    ckpt = Checkpointer(tmp_path, keep=5, async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, _small(step))
    shutil.rmtree(tmp_path / "3" / "state")  # damaged after its commit
    restored = ckpt.restore_latest(abstract_state(_small()))
    assert restored.step == 2
    np.testing.assert_array_equal(restored.state["w"], np.full((4, 4), 2.0))
    assert ckpt.all_steps() == [1, 2] and (tmp_path / "3.unreadable").is_dir()
    ckpt.close()


@pytest.mark.parametrize("async_save", [True, False])
def test_full_disk_raises_and_keeps_previous(tmp_path, monkeypatch, async_save):
    ckpt = Checkpointer(tmp_path, keep=1, async_save=async_save)
    ckpt.save(1, _small(1.0), {"pos": 1})
    ckpt.wait()

    async def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serialization, "async_serialize_from_host", disk_full)
    with pytest.raises(CheckpointError, match=r"step 2 .*disk full.*intact \(latest: step 1\)"):
        ckpt.save(2, _small(2.0), {"pos": 2})
        ckpt.wait()
    assert ckpt.all_steps() == [1] and sorted(os.listdir(tmp_path)) == ["1"]
    restored = Checkpointer(tmp_path).restore_latest(abstract_state(_small()))
    assert restored.step == 1 and restored.metadata == {"pos": 1}

    monkeypatch.undo()  # space freed: the next save goes through and retention resumes
    assert ckpt.save(3, _small(3.0))
    ckpt.close()
    assert ckpt.all_steps() == [3]


def test_async_save_copies_before_returning(tmp_path):
    state = _small(5.0)
    ckpt = Checkpointer(tmp_path, async_save=True)
    ckpt.save(5, state)
    # What a donated update step does to the buffers right after `save` returns.
    for x in jax.tree.leaves(state):
        x.delete()
    ckpt.wait()
    restored = ckpt.restore_latest(abstract_state(_small()))
    np.testing.assert_array_equal(restored.state["w"], np.full((4, 4), 5.0))
    ckpt.close()


def test_resaving_a_step(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.save(1, _small(1.0))
        assert not ckpt.save(1, _small(9.0))  # same run: already saved
    # A resumed run reaching a step the dead run saved replaces it.
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.save(1, _small(4.0))
        np.testing.assert_array_equal(ckpt.restore(1, abstract_state(_small())).state["w"],
                                      np.full((4, 4), 4.0))


# The failed restore leaves a tensorstore handle for the garbage collector; harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_restore_errors_and_empty_directory(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    assert ckpt.restore_latest() is None and ckpt.latest_step() is None
    ckpt.save(3, _small(3.0))
    with pytest.raises(CheckpointError, match=r"no checkpoint step 4 .*available: \[3\]"):
        ckpt.restore(4)
    with pytest.raises(CheckpointError, match="cannot restore checkpoint step 3"):
        ckpt.restore(3, {"step": jax.ShapeDtypeStruct((), jnp.int32),
                         "w": jax.ShapeDtypeStruct((5, 4), jnp.float32)})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        ckpt.save(4, _small(), {"bad": object()})
    ckpt.close()
    gc.collect()  # collect the failed restore's handle here, under this test's warning filter


def test_assert_finite_names_step_and_leaf():
    tree = {"params": {"a": jnp.ones(3), "layers": {"w": jnp.array([1.0, jnp.nan])}},
            "step": jnp.int32(3), "rng": jax.random.key(0), "loss": 0.5}
    assert find_nonfinite(tree) == "['params']['layers']['w']"
    with pytest.raises(NonFiniteError, match=r"step 7: .*in state\['params'\]\['layers'\]\['w'\]"):
        assert_finite(tree, 7)
    with pytest.raises(NonFiniteError, match=r"in metrics\['loss'\]"):
        assert_finite({"loss": float("inf")}, 8, name="metrics")
    assert_finite(_train_state(), 2)
    assert_finite({"x": jnp.ones(2, jnp.bfloat16), "n": np.int64(1)}, 2)


# ---------------------------------------------------------------------------
# Only finite, verified state: refused at save, rejected at restore.


def _poisoned(state, value=float("inf")):
    """`state` with one entry of the optimizer's first moment set to `value`."""
    mu = state["opt_state"][0].mu
    bad_mu = {**mu, "final_norm_D": mu["final_norm_D"].at[3].set(value)}
    return {**state, "opt_state": (state["opt_state"][0]._replace(mu=bad_mu), *state["opt_state"][1:])}


def test_save_refuses_nonfinite_state_and_keeps_the_last_good(tmp_path):
    state = _train_state()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state, {"pos": 1})
        expected = (r"step 2: non-finite value \(NaN or inf\) in state\['opt_state'\]\[0\]\.mu"
                    r"\['final_norm_D'\]; not saved, so the newest checkpoint in .* stays step 1")
        with pytest.raises(NonFiniteError, match=expected):
            ckpt.save(2, _poisoned(state), {"pos": 2})
        assert ckpt.all_steps() == [1] and sorted(os.listdir(tmp_path)) == ["1"]
    # A resumed run reaching a step the earlier run saved: the good step is not replaced.
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(NonFiniteError, match=r"state\['params'\]\['embed_VD'\]"):
            params = {**state["params"], "embed_VD": state["params"]["embed_VD"] * jnp.nan}
            ckpt.save(1, {**state, "params": params})
        restored = ckpt.restore_latest(abstract_state(state))
    assert restored.step == 1 and restored.metadata == {"pos": 1} and restored.rejected == ()
    _assert_bit_equal(restored.state, state)


def _flip_in_data_files(step_dir, flip):
    """Apply `flip(bytearray, offset)` at a quarter and three quarters of each large data file."""
    flipped = 0
    for root, _, files in os.walk(step_dir / "state"):
        for name in files:
            path = os.path.join(root, name)
            # Data files hold the arrays; only the two 64x64 leaves make one this large.
            if os.sep + "d" + os.sep in path and os.path.getsize(path) > 10_000:
                data = bytearray(open(path, "rb").read())
                for at in (len(data) // 4, 3 * len(data) // 4):
                    flip(data, at)
                    flipped += 1
                open(path, "wb").write(bytes(data))  # same size, same name
    return flipped


def _weights_state(step):
    w = jnp.asarray(np.random.default_rng(step).standard_normal((64, 64)).astype(np.float32))
    return {"step": jnp.int32(step), "params": {"w": w, "b": jnp.ones(64)},
            "ref_params": {"w": w + 1.0, "b": jnp.ones(64)}}


@pytest.mark.parametrize("kind", ["finite", "nan"])
def test_byte_flips_in_data_files_are_rejected(tmp_path, caplog, kind):
    def flip(data, at):
        if kind == "finite":  # one low mantissa bit: the value stays a plausible float
            data[at] ^= 0x01
        else:  # 0xFF bytes decode as NaN
            data[at:at + 8] = b"\xff" * 8

    with Checkpointer(tmp_path, keep=5, async_save=False) as ckpt:
        ckpt.save(1, _weights_state(1), {"pos": 1})
        ckpt.save(2, _weights_state(2), {"pos": 2})
    assert _flip_in_data_files(tmp_path / "2", flip) >= 2  # in params/w and ref_params/w
    ckpt = Checkpointer(tmp_path, keep=5, async_save=False)
    target = abstract_state(_weights_state(0))
    corrupt = (r"checkpoint step 2 in .* is corrupt: (ref_)?params/w: its data differs from what was "
               r"saved \(fingerprint \w{16} at save")
    with pytest.raises(CheckpointError, match=corrupt):
        ckpt.restore(2, target)
    with caplog.at_level("WARNING", logger="ouroboros_jax.checkpoint"):
        restored = ckpt.restore_latest(target)
    assert restored.step == 1 and restored.metadata == {"pos": 1}
    _assert_bit_equal(restored.state, _weights_state(1))
    assert len(restored.rejected) == 1 and restored.rejected[0].startswith("step 2: checkpoint step 2")
    assert "rejected checkpoint step 2: checkpoint step 2" in caplog.text and "is corrupt" in caplog.text
    assert ckpt.all_steps() == [1] and (tmp_path / "2.unreadable").is_dir()
    ckpt.close()


def test_nonfinite_checkpoint_without_fingerprints_is_rejected(tmp_path):
    import orbax.checkpoint as ocp

    # Steps written as before fingerprints existed: the state and metadata items only.
    manager = ocp.CheckpointManager(tmp_path, item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    for step, state in ((1, _small(1.0)), (2, {**_small(2.0), "w": jnp.full((4, 4), jnp.nan)})):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave({"pos": step})))
    manager.close()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(CheckpointError, match=r"step 2 .* holds non-finite values \(NaN or inf\) in "
                                                  r"state\['w'\]"):
            ckpt.restore(2, abstract_state(_small()))
        restored = ckpt.restore_latest(abstract_state(_small()))
    assert restored.step == 1 and restored.metadata == {"pos": 1}  # old steps still restore
    np.testing.assert_array_equal(restored.state["w"], np.ones((4, 4)))
    assert "non-finite" in restored.rejected[0]


def test_one_checkpoint_error_class():
    from ouroboros_jax import errors
    from ouroboros_jax.models import safetensors_io

    assert CheckpointError is errors.CheckpointError is safetensors_io.CheckpointError
    # Code that caught either former class still catches it.
    assert issubclass(CheckpointError, RuntimeError) and issubclass(CheckpointError, ValueError)
