"""Sampler and update on disjoint sub-meshes (8 simulated devices split 4 + 4), weights resharded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.batch import Batch
from ouroboros_jax.config import LOSS_PRESETS, ConfigError, MeshConfig, ModelConfig
from ouroboros_jax.disaggregated import (
    DisaggregationConfig,
    correct_staleness,
    run_loop,
    split_meshes,
    transfer_weights,
)
from ouroboros_jax.models import init_params, param_shardings, param_specs, policy_logprobs
from ouroboros_jax.objectives import policy_gradient
from ouroboros_jax.sharding import batch_sharding
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step
from ouroboros_jax.trainer import policy_loss_settings

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
B, PROMPT, COMPLETION = 8, 4, 8
T = PROMPT + COMPLETION
FAST = {"xla_backend_optimization_level": 0}
logp_fn = jax.jit(lambda p, tokens, mask: policy_logprobs(p, CFG, tokens, mask, with_entropy=False)[0],
                  compiler_options=FAST)


def rows(step: int) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(step)
    tokens = rs.randint(1, CFG.vocab_size, (B, T)).astype(np.int32)
    pos = np.arange(T)
    length = 1 + rs.randint(0, COMPLETION, B)
    attention = pos < PROMPT + length[:, None]
    loss_mask = (pos >= PROMPT) & attention
    return dict(tokens=np.where(attention, tokens, 0), attention=attention, loss_mask=loss_mask,
                advantages=rs.randn(B).astype(np.float32))


def producer(mesh):
    """A rollout stand-in on `mesh`: fixed tokens per step, old_logp from the sampler's weights."""
    def produce(params, step: int) -> Batch:
        r = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in rows(step).items()}
        old = logp_fn(params, r["tokens"], r["attention"])
        return Batch(r["tokens"], r["attention"], r["loss_mask"], old, r["advantages"], loss_start=PROMPT)
    return produce


def setup(split: DisaggregationConfig):
    train_mesh, sampler_mesh = split_meshes(split, MeshConfig(), MeshConfig())
    loss = policy_loss_settings(LOSS_PRESETS["dr_grpo"], max_completion_len=COMPLETION)
    tx = make_optimizer(3e-2)
    step, shardings = make_train_step(policy_gradient(CFG, logprob_chunk=8, **loss), tx, train_mesh,
                                      param_specs(CFG), micro_batch_size=4, compiler_options=FAST)
    params = jax.jit(lambda k: init_params(CFG, k), compiler_options=FAST)(jax.random.key(0))
    state = init_train_state(params, tx, jax.random.key(0), shardings=shardings)
    to_train = lambda b: jax.device_put(b, batch_sharding(train_mesh))
    return state, step, producer(sampler_mesh), param_shardings(CFG, sampler_mesh), to_train, train_mesh


def train_logp(params, batch):
    return logp_fn(params, batch.tokens, batch.attention_mask)


def test_split_meshes_are_disjoint_and_refuse_an_empty_side():
    train, sample = split_meshes(DisaggregationConfig(sampler_devices=4), MeshConfig(), MeshConfig())
    assert train.devices.size == sample.devices.size == 4
    assert not set(train.devices.flat) & set(sample.devices.flat)
    colocated = split_meshes(DisaggregationConfig(), MeshConfig(), MeshConfig())
    assert colocated[0] is colocated[1] and colocated[0].devices.size == 8
    with pytest.raises(ConfigError, match="sampler_devices: 8 leaves none"):
        split_meshes(DisaggregationConfig(sampler_devices=8), MeshConfig(), MeshConfig())
    with pytest.raises(ConfigError, match="max_staleness"):
        DisaggregationConfig(sampler_devices=4, off_policy=True, max_staleness=0)
    with pytest.raises(ConfigError, match="disagg.off_policy: needs disagg.sampler_devices > 0"):
        DisaggregationConfig(off_policy=True)


def test_transfer_reshards_onto_the_sampler_devices_with_equal_values():
    _, sample = split_meshes(DisaggregationConfig(sampler_devices=4), MeshConfig(), MeshConfig())
    params = init_params(CFG, jax.random.key(1))
    moved, seconds = transfer_weights(params, param_shardings(CFG, sample))
    assert seconds >= 0
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(moved), strict=True):
        assert set(y.sharding.device_set) == set(sample.devices.flat)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_correct_staleness_is_truncated_importance_weighting():
    old = jnp.log(jnp.array([[0.5, 0.5, 0.2]]))
    new = jnp.log(jnp.array([[0.5, 0.75, 0.9]]))  # ratios 1, 1.5, 4.5 -> truncated at 2
    mask = jnp.array([[False, True, True]])
    batch = Batch(jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3), bool), mask, old, jnp.array([2.0]))
    fixed, _ = correct_staleness(batch, new, cap=2.0)
    np.testing.assert_allclose(fixed.advantages, [[0.0, 3.0, 4.0]], rtol=1e-6)
    np.testing.assert_allclose(fixed.old_logp, new)


@pytest.mark.slow  # 8-15 s on 2 cores: in the slow set, which CI runs too
def test_split_synchronous_loop_equals_the_colocated_loop():
    finals = []
    for split in (DisaggregationConfig(), DisaggregationConfig(sampler_devices=4)):
        state, step, produce, sampler_shardings, to_train, _ = setup(split)
        state, history = run_loop(state, step, produce, sampler_shardings, 3, split, to_train=to_train)
        assert [h["rollout/staleness"] for h in history] == [0.0, 0.0, 0.0]
        assert all(h["time/transfer"] >= 0 for h in history)
        finals.append(jax.device_get(state.params))
    # 8 devices vs 4: other reduction orders, which Adam's early steps (~ sign of the gradient) amplify.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), *finals)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), finals[0],
                         jax.device_get(init_params(CFG, jax.random.key(0))))
    assert max(jax.tree.leaves(moved)) > 1e-3  # the loop trained


@pytest.mark.slow  # compiles the step and the log-probs for a second split (~20 s on 2 cores)
def test_off_policy_samples_one_step_behind_and_weights_the_staleness():
    split = DisaggregationConfig(sampler_devices=4, off_policy=True, max_staleness=1, is_cap=2.0)
    state, step, produce, sampler_shardings, to_train, _ = setup(split)
    seen = []

    def recording(params, t):
        seen.append((t, jax.device_get(params["embed_VD"]).copy()))
        return produce(params, t)

    params0 = jax.device_get(state.params["embed_VD"]).copy()
    state, history = run_loop(state, step, recording, sampler_shardings, 3, split,
                              train_logp=train_logp, to_train=to_train)
    assert [h["rollout/staleness"] for h in history] == [0.0, 1.0, 1.0]
    # Step 1's rollout ran on the weights before update 0: the initial ones.
    assert [t for t, _ in seen] == [0, 1, 2]
    np.testing.assert_array_equal(seen[1][1], params0)
    assert not np.array_equal(seen[2][1], params0)
    assert all(np.isfinite(h["loss"]) for h in history)
    with pytest.raises(ConfigError, match="train_logp"):
        run_loop(state, step, produce, sampler_shardings, 1, split)
