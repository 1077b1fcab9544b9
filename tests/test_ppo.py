"""The PPO loop: scores -> KL-shaped token rewards -> GAE (hand-computed), PPO-ptx, and the trainer
running `--preset ppo` end to end with a separate and a shared critic."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.batch import Batch
from ouroboros_jax.config import (
    LOSS_PRESETS,
    CheckpointConfig,
    ConfigError,
    ExperimentConfig,
    LoggingConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    PPOConfig,
    SamplingConfig,
    TrainConfig,
    VerifierConfig,
    parse_cli,
)
from ouroboros_jax.data import arithmetic_source
from ouroboros_jax.models import Tokenizer, init_params
from ouroboros_jax.objectives import sft
from ouroboros_jax.objectives.value import PPOBatch, ppo_actor
from ouroboros_jax.ppo import PPOState, PtxBatch, compile_ppo, token_targets, with_ptx
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.trainer import Task, train

TOK = Tokenizer.char_level("0123456789+-*=? .Whatis")


def test_token_targets_by_hand():
    # One row, completion tokens at t = 1, 2, 3; score 1; KL coef 0.5.
    mask = jnp.array([[False, True, True, True]])
    old = jnp.array([[0.0, -1.0, -2.0, -1.0]])
    ref = jnp.array([[0.0, -1.5, -2.0, -0.5]])
    values = jnp.array([[0.0, 0.2, 0.4, 0.6]])
    rewards, adv, returns = token_targets(jnp.array([1.0]), mask, old, ref, values, kl_coef=0.5, gamma=1.0,
                                          lam=0.5, whiten=False)
    # r_t = -0.5 * (old - ref) + score on the last token.
    np.testing.assert_allclose(rewards, [[0.0, -0.25, 0.0, 1.25]], atol=1e-6)
    # deltas: d3 = 1.25 - 0.6 = 0.65; d2 = 0 + 0.6 - 0.4 = 0.2; d1 = -0.25 + 0.4 - 0.2 = -0.05
    # A3 = 0.65; A2 = 0.2 + 0.5 * 0.65 = 0.525; A1 = -0.05 + 0.5 * 0.525 = 0.2125
    np.testing.assert_allclose(adv, [[0.0, 0.2125, 0.525, 0.65]], atol=1e-6)
    np.testing.assert_allclose(returns, [[0.0, 0.4125, 0.925, 1.25]], atol=1e-6)


def test_ppo_config_and_preset():
    cfg = parse_cli(args=["--preset", "ppo", "--ppo.critic", "shared"])
    assert cfg.ppo.enabled and cfg.ppo.critic == "shared"
    assert (cfg.ppo.gamma, cfg.ppo.lam) == (1.0, 0.95)
    assert cfg.loss == LOSS_PRESETS["ppo"] and cfg.loss.aggregation == "token_mean"
    assert not parse_cli(args=["--preset", "grpo"]).ppo.enabled
    with pytest.raises(ConfigError, match="ppo.lam"):
        PPOConfig(lam=1.5)
    with pytest.raises(ConfigError, match="ppo.critic"):
        PPOConfig(critic="both")
    cfg = _config("unused", "separate")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ref_update_every=5))
    with pytest.raises(ConfigError, match="ref_update_every"):
        compile_ppo(cfg, cfg.model, None, None)


@pytest.mark.slow  # about 20 s of eager CPU work on a loaded machine
def test_ptx_adds_the_weighted_supervised_loss():
    cfg = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=32)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 16, (2, 6)), jnp.int32)
    ones = jnp.ones((2, 6), bool)
    loss_mask = ones.at[:, :2].set(False)
    zeros = jnp.zeros((2, 6))
    adv = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
    ppo_b = PPOBatch(tokens=tokens, attention_mask=ones, loss_mask=loss_mask, old_logp=zeros, advantages=adv,
                     returns=zeros, old_values=zeros)
    sft_b = Batch(tokens=tokens[::-1], attention_mask=ones, loss_mask=loss_mask, old_logp=zeros,
                  advantages=jnp.ones(2))
    actor, supervised = ppo_actor(cfg), sft(cfg)
    mixed = with_ptx(actor, supervised, 0.3)
    batch = PtxBatch(ppo_b, sft_b)
    total, metrics = mixed.loss(params, None, batch, mixed.normalizer(batch))
    a, _ = actor.loss(params, None, ppo_b, actor.normalizer(ppo_b))
    s, _ = supervised.loss(params, None, sft_b, supervised.normalizer(sft_b))
    np.testing.assert_allclose(total, a + 0.3 * s, rtol=1e-6)
    np.testing.assert_allclose(metrics["ptx_loss"], s, rtol=1e-6)
    with pytest.raises(ValueError, match="ptx"):
        with_ptx(actor, supervised, -1.0)


def _config(run_dir, critic: str) -> ExperimentConfig:
    return ExperimentConfig(
        seed=3,
        model=ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                          head_dim=16, d_ff=64, max_seq_len=64),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),
        sampling=SamplingConfig(group_size=2, max_new_tokens=4, prompt_len_buckets=(24,), eval_num_samples=2),
        loss=LOSS_PRESETS["ppo"],
        ppo=PPOConfig(enabled=True, critic=critic, critic_learning_rate=1e-3),
        optimizer=OptimizerConfig(learning_rate=1e-3),
        train=TrainConfig(steps=2, prompts_per_step=4, mini_batch_size=4, micro_batch_size=2, inner_epochs=2,
                          eval_every=0),
        checkpoint=CheckpointConfig(save_every=0, keep=1, async_save=False),
        logging=LoggingConfig(run_dir=str(run_dir), console=False, tensorboard=False),
        verifier=VerifierConfig(names=("math_any",), weights=(1.0,), num_workers=1),
    )


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_trainer_runs_ppo(tmp_path, critic):
    cfg = _config(tmp_path / critic, critic)
    task = Task(train_source=arithmetic_source(seed=0, digits=1), encode=lambda exs: TOK.encode_batch(
        [e.prompt for e in exs]), decode=lambda ids: TOK.decode(list(ids)), verifier="math_any",
        stop_token_ids=(TOK.eos_id,))
    params = init_params(cfg.model, jax.random.key(0))
    before = jax.tree.map(np.asarray, params)
    result = train(cfg, model_config=cfg.model, params=params, task=task,
                   mesh=make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    assert isinstance(result.state, PPOState)
    assert (result.state.critic is None) == (critic == "shared")
    last = result.history[-1]
    assert last["train/finite"] == 1.0
    # 2 epochs x 2 mini-batches per step: the actor moved, and the value loss was computed.
    assert int(result.state.actor.step) == 8
    key = "train/critic_value_loss" if critic == "separate" else "train/value_loss"
    assert np.isfinite(last[key]) and last[key] > 0
    actor_layers = result.state.actor.params["layers"]
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), actor_layers, before["layers"])
    assert max(jax.tree.leaves(moved)) > 0
    assert "ppo/kl_ref_k1" in last
