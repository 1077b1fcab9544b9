"""PPO-ptx fed by the trainer: `ppo.ptx_coef` / `ppo.ptx_data` (config), the demonstration rows
(`ppo.ptx_demonstrations`), the actor objective `actor loss + coef * SFT loss` (a hand-computed case
and parity with the objectives computed separately), and a trainer run whose demonstration NLL falls."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

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
from ouroboros_jax.objectives.value import PPOBatch
from ouroboros_jax.ppo import PPOState, PtxBatch, actor_objective, ptx_demonstrations
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.trainer import Task, train

TOK = Tokenizer.char_level("0123456789+-*=? .Whatis")
DEMOS = [("What is 1+2?", "3"), ("What is 4+4?", "8"), ("What is 2*3?", "6"), ("What is 9-5?", "4")]


def _task(**overrides) -> Task:
    fields = dict(train_source=arithmetic_source(seed=0, digits=1),
                  encode=lambda exs: TOK.encode_batch([e.prompt for e in exs]),
                  decode=lambda ids: TOK.decode(list(ids)), verifier="math_any", stop_token_ids=(TOK.eos_id,),
                  encode_completion=lambda text: TOK.encode(text) + [TOK.eos_id])
    return Task(**(fields | overrides))


def _write(path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def _demos_file(tmp_path) -> str:
    return _write(tmp_path / "demos.jsonl", [{"prompt": p, "response": r} for p, r in DEMOS])


def _config(run_dir, *, ptx_data: str = "", ptx_coef: float = 0.0, critic: str = "separate",
            max_seq_len: int = 64) -> ExperimentConfig:
    return ExperimentConfig(
        seed=3,
        model=ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                          head_dim=16, d_ff=64, max_seq_len=max_seq_len),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),
        sampling=SamplingConfig(group_size=2, max_new_tokens=4, prompt_len_buckets=(24,), eval_num_samples=2),
        loss=LOSS_PRESETS["ppo"],
        ppo=PPOConfig(enabled=True, critic=critic, critic_learning_rate=1e-3, ptx_coef=ptx_coef,
                      ptx_data=ptx_data),
        optimizer=OptimizerConfig(learning_rate=3e-3),
        train=TrainConfig(steps=3, prompts_per_step=4, mini_batch_size=4, micro_batch_size=2, inner_epochs=2,
                          eval_every=0),
        checkpoint=CheckpointConfig(save_every=0, keep=1, async_save=False),
        logging=LoggingConfig(run_dir=str(run_dir), console=False, tensorboard=False),
        verifier=VerifierConfig(names=("math_any",), weights=(1.0,), num_workers=1),
    )


def test_ptx_config_fields_and_errors():
    cfg = parse_cli(args=["--preset", "ppo", "--ppo.ptx_coef", "0.5", "--ppo.ptx_data", "demos.jsonl"])
    ppo = cfg.ppo
    assert (ppo.ptx_coef, ppo.ptx_data, ppo.ptx_completion_field) == (0.5, "demos.jsonl", "response")
    assert PPOConfig().ptx_coef == 0.0
    with pytest.raises(ConfigError, match="ppo.ptx_data"):
        PPOConfig(enabled=True, ptx_coef=0.5)
    with pytest.raises(ConfigError, match="ppo.ptx_coef"):
        PPOConfig(enabled=True, ptx_coef=-0.1, ptx_data="demos.jsonl")
    with pytest.raises(ConfigError, match="ppo.ptx_coef.*--preset ppo"):
        PPOConfig(enabled=False, ptx_coef=0.5, ptx_data="demos.jsonl")


def test_ptx_demonstration_rows(tmp_path):
    rows = ptx_demonstrations(_demos_file(tmp_path), _task(), max_len=64)
    assert rows.tokens.shape == (4, 16)
    prompt, completion = TOK.encode("What is 1+2?"), TOK.encode("3") + [TOK.eos_id]
    n = len(prompt) + len(completion)
    np.testing.assert_array_equal(rows.tokens[0, :n], prompt + completion)
    np.testing.assert_array_equal(rows.loss_mask[0, :n], [False] * len(prompt) + [True] * len(completion))
    assert not rows.loss_mask[0, n:].any() and rows.attention_mask[0, :n].all()
    np.testing.assert_array_equal(rows.advantages, np.ones(4))


@pytest.mark.parametrize("case, match", [
    ("missing", r"ppo.ptx_data: .*nowhere.jsonl: no such file"),
    ("bad_json", r"ppo.ptx_data: .*demos.jsonl:2: not valid JSON"),
    ("no_field", r"ppo.ptx_data: .*demos.jsonl:1: missing field 'response'"),
    ("empty", r"ppo.ptx_data: .*demos.jsonl line 2: field 'response' must be a non-empty string"),
    ("too_long", r"ppo.ptx_data: .*demos.jsonl line 2: 37 tokens, longer than model.max_seq_len=20"),
    ("no_encoder", r"ppo.ptx_data: .*Task.encode_completion"),
])
def test_ptx_demonstration_errors(tmp_path, case, match):
    good = {"prompt": "What is 1+2?", "response": "3"}
    bad = {"bad_json": "{oops", "no_field": {"prompt": "What is 1+2?"},
           "empty": {"prompt": "What is 2+2?", "response": " "},
           "too_long": {"prompt": "What is 1+2+3+4+5+6+7+8+9?", "response": "45" * 5}}
    lines = [bad["no_field"]] if case == "no_field" else [good] + ([bad[case]] if case in bad else [])
    path = _write(tmp_path / "demos.jsonl", lines)
    if case == "missing":
        path = str(tmp_path / "nowhere.jsonl")
    task = _task(encode_completion=None) if case == "no_encoder" else _task()
    with pytest.raises(ConfigError, match=match):
        ptx_demonstrations(path, task, max_len=20)


def _ptx_batch(rows: Batch, seed: int) -> PtxBatch:
    rng = np.random.default_rng(seed)
    B, T = 4, 12
    tokens = jnp.asarray(rng.integers(1, TOK.vocab_size, (B, T)), jnp.int32)
    ones = jnp.ones((B, T), bool)
    loss_mask = ones.at[:, :5].set(False).at[1, 9:].set(False)
    zeros = jnp.zeros((B, T))
    adv = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
    ppo_b = PPOBatch(tokens=tokens, attention_mask=ones, loss_mask=loss_mask, old_logp=zeros, advantages=adv,
                     returns=zeros, old_values=zeros)
    return PtxBatch(ppo_b, jax.tree.map(jnp.asarray, rows))


def _mixed_and_parts(tmp_path):
    cfg = _config(tmp_path, ptx_data=_demos_file(tmp_path), ptx_coef=0.3)
    batch = _ptx_batch(ptx_demonstrations(cfg.ppo.ptx_data, _task(), max_len=64), seed=0)
    no_ptx = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, ptx_coef=0.0))
    return cfg, batch, actor_objective(cfg, cfg.model), actor_objective(no_ptx, cfg.model), sft(cfg.model)


def _loss(objective, params, batch):
    return objective.loss(params, None, batch, objective.normalizer(batch))


def test_ptx_actor_loss_by_hand(tmp_path):
    # All-zero parameters give zero logits, so every token has log-prob -log V. With old log-probs
    # -log V the ratio is 1 and the PPO loss is -mean(advantages over the loss tokens); the
    # demonstrations' NLL is log V per token; the trainer's actor loss is their sum with coef 0.3.
    cfg, batch, mixed, _, _ = _mixed_and_parts(tmp_path)
    log_v = math.log(TOK.vocab_size)
    batch = batch.replace(ppo=batch.ppo.replace(old_logp=jnp.full(batch.ppo.tokens.shape, -log_v)))
    shapes = jax.eval_shape(lambda: init_params(cfg.model, jax.random.key(0)))
    zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    total, metrics = jax.jit(functools.partial(_loss, mixed))(zero, batch)
    mask = np.asarray(batch.ppo.loss_mask)
    pg = -np.asarray(batch.ppo.advantages)[mask].mean()
    np.testing.assert_allclose(metrics["pg_loss"], pg, rtol=1e-5)
    np.testing.assert_allclose(metrics["ptx_loss"], log_v, rtol=1e-5)
    np.testing.assert_allclose(total, pg + 0.3 * log_v, rtol=1e-5)
    np.testing.assert_allclose(metrics["ptx_num_tokens"], np.asarray(batch.sft.loss_mask).sum())


@pytest.mark.slow  # three objectives compile (~6 s of CPU)
def test_ptx_actor_loss_is_actor_plus_coef_times_sft_computed_separately(tmp_path):
    cfg, batch, mixed, actor, supervised = _mixed_and_parts(tmp_path)

    @jax.jit
    def losses(params, b: PtxBatch):
        total, metrics = _loss(mixed, params, b)
        return total, metrics["ptx_loss"], _loss(actor, params, b.ppo)[0], _loss(supervised, params, b.sft)[0]

    total, ptx_loss, a, s = losses(init_params(cfg.model, jax.random.key(1)), batch)
    assert float(s) > 0 and abs(float(a)) > 0
    np.testing.assert_allclose(total, a + 0.3 * s, rtol=1e-5)
    np.testing.assert_allclose(ptx_loss, s, rtol=1e-5)


def _demo_nll(model_config: ModelConfig, params, rows: Batch) -> float:
    objective = sft(model_config)
    rows = jax.tree.map(jnp.asarray, rows)
    return float(objective.loss(params, None, rows, objective.normalizer(rows))[0])


@pytest.mark.slow  # a trainer run: sampler, actor and critic programs compile (~20 s on 2 cores)
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_trainer_ptx_logs_its_loss_and_the_demonstration_nll_falls(tmp_path, critic):
    cfg = _config(tmp_path / "run", ptx_data=_demos_file(tmp_path), ptx_coef=1.0, critic=critic)
    params = init_params(cfg.model, jax.random.key(0))
    rows = ptx_demonstrations(cfg.ppo.ptx_data, _task(), max_len=64)
    before = _demo_nll(cfg.model, params, rows)
    result = train(cfg, model_config=cfg.model, params=params, task=_task(),
                   mesh=make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    assert isinstance(result.state, PPOState)
    assert int(result.state.actor.step) == 12  # 3 steps x 2 epochs x 2 mini-batches
    first, last = result.history[0], result.history[-1]
    assert last["train/finite"] == 1.0
    assert first["train/ptx_loss"] > last["train/ptx_loss"] > 0
    after = _demo_nll(cfg.model, result.state.params, rows)
    print(f"demonstration NLL {before:.3f} -> {after:.3f}")
    assert after < 0.8 * before
