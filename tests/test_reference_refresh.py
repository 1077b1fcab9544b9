"""`train.ref_update_every`: the KL reference is reset to the policy every N steps, and only then.

With the k3 estimator the KL to the reference is exactly 0 while the policy
equals the reference, so the `train/kl_ref` of each step says whether the
reference was refreshed after the step before it.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ouroboros_jax import checkpoint as ckpt
from ouroboros_jax.config import (
    CheckpointConfig,
    ExperimentConfig,
    LoggingConfig,
    LossConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    SamplingConfig,
    TrainConfig,
    VerifierConfig,
)
from ouroboros_jax.data import arithmetic_source
from ouroboros_jax.models import Tokenizer, init_params
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.trainer import Task, train

TOK = Tokenizer.char_level("0123456789+-*=? .Whatis")
SAME = 1e-6  # |KL| below this: policy and reference are the same parameters
MOVED = 1e-5  # KL above this: the policy has moved away from the reference


def _config(run_dir, *, steps: int, ref_update_every: int, save_every: int = 0) -> ExperimentConfig:
    return ExperimentConfig(
        seed=5,
        model=ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                          head_dim=16, d_ff=64, max_seq_len=64),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),
        sampling=SamplingConfig(group_size=4, max_new_tokens=4, prompt_len_buckets=(24,)),
        loss=LossConfig(kl_coef=0.1),
        optimizer=OptimizerConfig(learning_rate=1e-2),
        train=TrainConfig(steps=steps, prompts_per_step=4, mini_batch_size=16, micro_batch_size=16,
                          eval_every=0, ref_update_every=ref_update_every),
        checkpoint=CheckpointConfig(save_every=save_every, keep=3, async_save=False),
        logging=LoggingConfig(run_dir=str(run_dir), console=False, tensorboard=False),
        verifier=VerifierConfig(names=("math_any",), weights=(1.0,), num_workers=1),
    )


def _task() -> Task:
    return Task(train_source=arithmetic_source(seed=0, digits=1),
                encode=lambda exs: TOK.encode_batch([e.prompt for e in exs]),
                decode=lambda ids: TOK.decode(list(ids)), verifier=_starts_with_digit,
                stop_token_ids=(TOK.eos_id,))


def _starts_with_digit(completion: str, example) -> float:
    """A reward a random model earns about half the time, so groups differ and step 1 has a gradient."""
    return float(completion[:1].isdigit())


def _run(cfg: ExperimentConfig):
    mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
    params = init_params(cfg.model, jax.random.key(0))
    initial = jax.tree.map(np.array, params)  # the step donates the state: keep a host copy
    return initial, train(cfg, model_config=cfg.model, params=params, task=_task(), mesh=mesh)


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs))


@pytest.mark.slow  # end to end, 10-35 s on 2 cores: in the slow set, which CI runs too
def test_reference_is_refreshed_every_n_steps_and_not_otherwise(tmp_path):
    cfg = _config(tmp_path / "every2", steps=3, ref_update_every=2, save_every=1)
    initial, result = _run(cfg)
    kl = [m["train/kl_ref"] for m in result.history]
    assert abs(kl[0]) < SAME  # step 1 starts from the reference
    assert kl[1] > MOVED  # no refresh after step 1
    assert abs(kl[2]) < SAME  # refreshed after step 2: step 3 starts from the reference again
    state = result.state
    assert _max_diff(state.ref_params, state.params) > 1e-4  # no refresh after step 3
    assert _max_diff(state.ref_params, initial) > 1e-4
    # the reference is exactly the policy of step 2, as its checkpoint holds it
    with ckpt.Checkpointer(tmp_path / "every2" / "checkpoints", keep=3) as checkpointer:
        at_two = checkpointer.restore(2, ckpt.abstract_state(state)).state
    assert _max_diff(state.ref_params, at_two.params) == 0.0
    assert _max_diff(at_two.ref_params, at_two.params) == 0.0  # refreshed before the step-2 checkpoint


@pytest.mark.slow  # 8-15 s on 2 cores: in the slow set, which CI runs too
def test_reference_stays_the_initial_policy_without_refresh(tmp_path):
    initial, result = _run(_config(tmp_path / "never", steps=3, ref_update_every=0))
    kl = [m["train/kl_ref"] for m in result.history]
    assert abs(kl[0]) < SAME and kl[1] > MOVED and kl[2] > MOVED
    assert _max_diff(result.state.ref_params, initial) == 0.0
    assert _max_diff(result.state.params, initial) > 1e-4
