"""PPO with a critic through the one update step: the value objective, the shared backbone,
importance weights in the actor loss, and on-policy ratios of exactly 1 (zero mismatch)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.algorithms import importance_weights, policy_loss
from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.models import init_params, param_specs, policy_logprobs
from ouroboros_jax.objectives.value import (
    PPOBatch,
    critic_values,
    init_critic,
    policy_and_values,
    ppo_actor,
    shared_param_specs,
    value,
    with_value_head,
)
from ouroboros_jax.sampling import generate
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
FAST = {"xla_backend_optimization_level": 0}
B, P, C = 8, 4, 6


@pytest.fixture(scope="module")
def policy():
    return init_params(CFG, jax.random.key(0))


def one_mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1), jax.devices()[:1])


def rows(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (B, P + C)).astype(np.int32)
    attention = np.ones((B, P + C), bool)
    attention[:2, :1] = False  # left-padded prompts
    lengths = rng.integers(2, C + 1, B)
    completion = np.arange(C)[None] < lengths[:, None]
    attention[:, P:] = completion
    loss_mask = np.zeros((B, P + C), bool)
    loss_mask[:, P:] = completion
    return jnp.asarray(tokens), jnp.asarray(attention), jnp.asarray(loss_mask)


def ppo_batch(params, seed=0, **extra):
    tokens, attention, loss_mask = rows(seed)
    logp, _ = policy_logprobs(params, CFG, tokens, attention, start=P, with_entropy=False)
    rng = np.random.default_rng(seed + 1)
    returns = jnp.where(loss_mask, jnp.asarray(rng.normal(size=(B, P + C)), jnp.float32), 0.0)
    fields = dict(tokens=tokens, attention_mask=attention, loss_mask=loss_mask, old_logp=logp,
                  advantages=returns, returns=returns, old_values=jnp.zeros_like(returns), loss_start=P)
    return PPOBatch(**(fields | extra))


def test_critic_from_policy_and_reward_model(policy):
    critic = init_critic(policy)
    assert "score_D" in critic and "lm_head_DV" not in critic
    np.testing.assert_array_equal(critic["embed_VD"], policy["embed_VD"])
    rm = init_params(CFG, jax.random.key(1), head="score")
    from_rm = init_critic(rm, from_="reward_model")
    np.testing.assert_array_equal(from_rm["score_D"], rm["score_D"])
    with pytest.raises(ValueError, match="score_D"):
        init_critic(policy, from_="reward_model")
    with pytest.raises(ValueError, match="from_"):
        init_critic(policy, from_="teacher")


@pytest.mark.slow
def test_value_objective_through_the_step_fits_the_returns(policy):
    critic = init_critic(policy)
    batch = ppo_batch(policy)
    mask = np.asarray(batch.loss_mask)
    optimizer = make_optimizer(1e-2)
    step_fn, shardings = make_train_step(value(CFG, clip_range=None), optimizer, one_mesh(),
                                         param_specs(CFG, head="score"), micro_batch_size=4,
                                         compiler_options=FAST)
    state = init_train_state(critic, optimizer, jax.random.key(0), shardings=shardings)
    state, metrics = step_fn(state, batch)
    # A zero score head predicts 0 everywhere: loss = 0.5 * token mean of R^2, exactly.
    returns = np.asarray(batch.returns)
    np.testing.assert_allclose(metrics["value_loss"], 0.5 * np.mean(returns[mask] ** 2), rtol=1e-5)
    first = float(metrics["value_loss"])
    for _ in range(15):
        state, metrics = step_fn(state, batch)
    assert float(metrics["value_loss"]) < 0.7 * first
    values = critic_values(state.params, CFG, batch.tokens, batch.attention_mask, start=P)
    assert np.all(np.asarray(values)[~np.asarray(batch.attention_mask)] == 0.0)


@pytest.mark.slow  # about 20 s of eager CPU work on a loaded machine
def test_shared_backbone_one_forward_matches_separate_forwards(policy):
    shared = with_value_head(policy)
    shared["score_D"] = jax.random.normal(jax.random.key(3), shared["score_D"].shape) * 0.1
    tokens, attention, _ = rows()
    logp, values = policy_and_values(shared, CFG, tokens, attention, start=P)
    want_logp, _ = policy_logprobs(policy, CFG, tokens, attention, start=P, with_entropy=False)
    want_values = critic_values(shared, CFG, tokens, attention, start=P)
    np.testing.assert_allclose(logp, want_logp, atol=1e-6)
    np.testing.assert_allclose(values, want_values, atol=1e-6)
    # Value at token t is the head on the hidden state before it: zero before the completion.
    assert np.all(np.asarray(values)[:, :P] == 0.0)


@pytest.mark.slow
def test_shared_backbone_actor_critic_loss_is_policy_plus_weighted_value(policy):
    shared = with_value_head(policy)
    batch = ppo_batch(policy)
    objective = ppo_actor(CFG, value_coef=0.5, value_clip=0.2)
    total, metrics = objective.loss(shared, None, batch, objective.normalizer(batch))
    mask = batch.loss_mask
    pg, _ = policy_loss(batch.old_logp, batch.old_logp, batch.advantages, mask, variant="ppo_clip",
                        clip_low=0.2, clip_high=0.2, aggregation="token_mean")
    # Zero head: values 0 = old values, so the value loss is 0.5 * mean(R^2).
    v_loss = 0.5 * np.mean(np.asarray(batch.returns)[np.asarray(mask)] ** 2)
    np.testing.assert_allclose(metrics["value_loss"], v_loss, rtol=1e-5)
    np.testing.assert_allclose(total, pg + 0.5 * v_loss, rtol=1e-5, atol=1e-6)
    # The step trains the value head of the shared model too.
    optimizer = make_optimizer(1e-2)
    step_fn, shardings = make_train_step(objective, optimizer, one_mesh(), shared_param_specs(CFG),
                                         compiler_options=FAST)
    state = init_train_state(jax.tree.map(jnp.copy, shared), optimizer, jax.random.key(0),
                             shardings=shardings)
    state, _ = step_fn(state, batch)
    assert float(jnp.abs(state.params["score_D"]).sum()) > 0


@pytest.mark.slow  # about 20 s of eager CPU work on a loaded machine
def test_importance_weights_scale_the_policy_loss_and_are_logged(policy):
    batch = ppo_batch(policy)
    shift = jnp.where(batch.loss_mask, 0.5 * jnp.sin(jnp.arange(P + C, dtype=jnp.float32))[None], 0.0)
    batch = dataclasses.replace(batch, rollout_logp=batch.old_logp - shift)
    objective = ppo_actor(CFG, importance_upper=1.3)
    total, metrics = objective.loss(policy, None, batch, objective.normalizer(batch))
    weights, want = importance_weights(batch.old_logp, batch.rollout_logp, batch.loss_mask, upper=1.3)
    pg, _ = policy_loss(batch.old_logp, batch.old_logp, batch.advantages, batch.loss_mask, variant="ppo_clip",
                        clip_low=0.2, clip_high=0.2, aggregation="token_mean", importance_weights=weights)
    np.testing.assert_allclose(total, pg, rtol=1e-5, atol=1e-6)
    # On-policy ratio 1 here, so the loss is -mean(w * A) by hand.
    mask = np.asarray(batch.loss_mask)
    w_hand = np.minimum(np.exp(np.asarray(shift)), 1.3)
    np.testing.assert_allclose(total, -np.mean((w_hand * np.asarray(batch.advantages))[mask]), rtol=1e-5)
    for name in ("is_weight_mean", "is_weight_max", "is_truncated_frac", "is_ess", "mismatch_logp_abs_diff"):
        np.testing.assert_allclose(metrics[name], want[name], rtol=1e-6)
    np.testing.assert_allclose(metrics["is_weight_max"], 1.3, rtol=1e-6)
    assert 0 < float(metrics["is_truncated_frac"]) < 1


def sampled_ppo_batch(params, cfg, mesh, compute_mesh):
    """Sample completions with the KV-cache sampler and build a PPO batch on its log-probs."""
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (4, P)).tolist()
    out = generate(params, cfg, prompts, max_new_tokens=C, num_samples=2, rng=jax.random.key(7),
                   mesh=mesh)
    tokens, attention = out.sequences()
    width = out.prompt_tokens.shape[1]
    loss_mask = np.zeros_like(attention)
    loss_mask[:, width:] = out.mask
    old_logp = np.zeros(tokens.shape, np.float32)
    old_logp[:, width:] = out.policy_logprobs
    adv = np.where(loss_mask, np.random.default_rng(1).normal(size=tokens.shape), 0.0).astype(np.float32)
    return PPOBatch(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attention),
                    loss_mask=jnp.asarray(loss_mask), old_logp=jnp.asarray(old_logp), advantages=adv,
                    returns=adv, old_values=np.zeros_like(adv), loss_start=width)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_zero_mismatch_first_epoch_ratio_is_one(policy, devices, compute):
    cfg = dataclasses.replace(CFG, compute_dtype=compute)
    mesh = make_mesh(MeshConfig(data=devices, fsdp=1), jax.devices()[:devices])
    batch = sampled_ppo_batch(policy, cfg, mesh if devices > 1 else None, mesh)
    optimizer = make_optimizer(1e-3)
    step_fn, shardings = make_train_step(ppo_actor(cfg, importance_upper=2.0), optimizer, mesh,
                                         param_specs(cfg), compiler_options=FAST)
    batch = dataclasses.replace(batch, rollout_logp=batch.old_logp)
    state = init_train_state(jax.tree.map(jnp.copy, policy), optimizer, jax.random.key(0),
                             shardings=shardings)
    _, metrics = step_fn(state, batch)
    tol = 1e-5  # measured: |ratio - 1| <= 5e-7 in bfloat16 too (the sampler and the update share one forward)
    assert abs(float(metrics["ratio_min"]) - 1) <= tol, metrics
    assert abs(float(metrics["ratio_max"]) - 1) <= tol, metrics
    assert float(metrics["clip_frac"]) == 0.0
    assert float(metrics["finite"]) == 1.0
