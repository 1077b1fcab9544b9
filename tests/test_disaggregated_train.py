"""`trainer.train` with the sampler and the update on 4 + 4 of 8 simulated devices (`--disagg.*`)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from ouroboros_jax.config import (
    CheckpointConfig,
    ConfigError,
    DisaggregationConfig,
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
from ouroboros_jax.disaggregated import DisaggregatedStep, sampler_mesh_config
from ouroboros_jax.models import Tokenizer, init_params
from ouroboros_jax.trainer import Task, _update, train

TOK = Tokenizer.char_level("0123456789+-*=? .Whatis")
MODEL = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                    d_ff=64, max_seq_len=64)
COLOCATED = DisaggregationConfig()
SPLIT = DisaggregationConfig(sampler_devices=4)
OFF_POLICY = DisaggregationConfig(sampler_devices=4, off_policy=True, max_staleness=1)


def _config(run_dir, steps: int, disagg: DisaggregationConfig = COLOCATED, save_every: int = 0,
            lr: float = 1e-3) -> ExperimentConfig:
    return ExperimentConfig(
        seed=3, model=MODEL, mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        sampling=SamplingConfig(group_size=4, max_new_tokens=4, prompt_len_buckets=(24,)),
        optimizer=OptimizerConfig(learning_rate=lr),
        train=TrainConfig(steps=steps, prompts_per_step=4, mini_batch_size=8, micro_batch_size=8,
                          eval_every=0),
        checkpoint=CheckpointConfig(save_every=save_every, keep=2, async_save=False),
        logging=LoggingConfig(run_dir=str(run_dir), console=False, tensorboard=False),
        verifier=VerifierConfig(names=("math_any",), weights=(1.0,), num_workers=1),
        disagg=disagg)


def _task() -> Task:
    return Task(train_source=arithmetic_source(seed=0, digits=1), encode=lambda exs: TOK.encode_batch(
        [e.prompt for e in exs]), decode=lambda ids: TOK.decode(list(ids)), verifier=_starts_with_digit,
        stop_token_ids=(TOK.eos_id,))


def _starts_with_digit(completion: str, example) -> float:
    """A reward a random model earns about half the time: groups differ, every step has a gradient."""
    return float(completion[:1].isdigit())


def _params():
    return init_params(MODEL, jax.random.key(0))


class _Preempted(Exception):
    pass


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_cli_sets_the_split_and_bad_splits_name_the_field(tmp_path, capsys):
    flags = ["--disagg.sampler_devices", "4", "--disagg.off_policy", "true", "--disagg.max_staleness", "1"]
    cfg = parse_cli(_config(tmp_path, 1), args=flags)
    assert cfg.disagg == OFF_POLICY
    # the sampler keeps the train mesh's tensor axis and puts its rows over the rest
    assert sampler_mesh_config(MeshConfig(data=2, fsdp=-1, tensor=2)).resolve(4) == (1, 2, 2)
    assert sampler_mesh_config(MeshConfig(data=1, fsdp=2, tensor=-1)).resolve(4) == (1, 1, 4)
    with pytest.raises(ConfigError, match=r"disagg.sampler_devices: 8 leaves none of the 8 devices"):
        DisaggregatedStep(_config(tmp_path, 1, DisaggregationConfig(sampler_devices=8)), MODEL, None, _update)
    with pytest.raises(ConfigError, match=r"disagg.sampler_devices: 3 of the 8 devices sample and 5 train; "
                                          r"a mesh does not fit its side: mesh.fsdp: cannot fill"):
        cfg = dataclasses.replace(_config(tmp_path, 1, DisaggregationConfig(sampler_devices=3)),
                                  mesh=MeshConfig(data=1, fsdp=-1, tensor=2))
        DisaggregatedStep(cfg, MODEL, None, _update)
    with pytest.raises(ConfigError, match=r"disagg.sampler_devices: .*PPO with a critic \(ppo.enabled\)"):
        cfg = dataclasses.replace(_config(tmp_path, 1, OFF_POLICY), ppo=PPOConfig(enabled=True))
        DisaggregatedStep(cfg, MODEL, None, _update)
    with pytest.raises(SystemExit):
        parse_cli(_config(tmp_path, 1), args=["--disagg.off_policy", "true"])
    assert "disagg.off_policy: needs disagg.sampler_devices > 0" in capsys.readouterr().err


@pytest.mark.slow  # two runs of the trainer (~15 s on 2 cores)
def test_split_synchronous_training_equals_the_colocated_trainer(tmp_path):
    finals, records = [], []
    for name, disagg in (("colocated", COLOCATED), ("split", SPLIT)):
        cfg = _config(tmp_path / name, 3, disagg, lr=1e-2)
        result = train(cfg, model_config=MODEL, params=_params(), task=_task())
        finals.append(jax.device_get(result.state.params))
        records.append(_records(tmp_path / name))
    split_devices = {d for x in jax.tree.leaves(result.state.params) for d in x.sharding.device_set}
    assert split_devices == set(jax.devices()[:4])  # the update ran on the first half
    # The same rollouts (the same tokens and rewards), hence the same updates up to reduction order.
    for a, b in zip(*records, strict=True):
        assert a["reward/mean"] == b["reward/mean"] and a["length/mean"] == b["length/mean"]
        assert b["rollout/staleness"] == 0 and b["time/transfer"] > 0
    # 8 devices vs 4: other reduction orders (measured up to 1.3e-5 after 3 updates), which Adam's early
    # steps (about the sign of the gradient, lr 1e-2) amplify; the updates moved the weights by ~1e-2.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), *finals)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), finals[0], jax.device_get(_params()))
    assert max(jax.tree.leaves(moved)) > 1e-3  # the runs trained


@pytest.mark.slow  # three runs of the trainer (~30 s on 2 cores)
def test_off_policy_training_is_one_step_behind_and_resumes_exactly(tmp_path):
    # Uninterrupted: 4 steps, checkpoints at 2 and 4. Step 2's rollout is not prefetched across the
    # checkpoint, so the staleness reads 0, 1, 0, 1.
    cfg = _config(tmp_path / "full", 4, OFF_POLICY, save_every=2, lr=1e-2)
    full = train(cfg, model_config=MODEL, params=_params(), task=_task())
    records = _records(tmp_path / "full")
    assert [r["rollout/staleness"] for r in records] == [0, 1, 0, 1]
    stale = records[1]
    assert stale["offpolicy/is_weight_mean"] != 1.0 and 0 < stale["offpolicy/is_ess"] <= 1
    assert records[0]["offpolicy/mismatch_logp_abs_diff"] < 1e-5  # fresh: sampled by the trained weights
    assert stale["offpolicy/mismatch_logp_abs_diff"] > 1e-4  # one update behind
    glossary = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    keys = {re.sub(r"@\d+$", "@k", k) for r in records for k in r}
    assert not [k for k in sorted(keys) if f"`{k}`" not in glossary]

    # Preempted in the fourth step (its prompts are drawn by the rollout prefetched during the third),
    # resumed from the checkpoint of step 2.
    task, calls = _task(), []
    take = task.train_source.take

    def dying_take(n):
        calls.append(n)
        if len(calls) > 3:
            raise _Preempted
        return take(n)

    task.train_source.take = dying_take
    cfg = _config(tmp_path / "resumed", 4, OFF_POLICY, save_every=2, lr=1e-2)
    with pytest.raises(_Preempted):
        train(cfg, model_config=MODEL, params=_params(), task=task)
    resumed = train(cfg, model_config=MODEL, params=_params(), task=_task())
    assert resumed.resumed_from == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.state.params),
                 jax.device_get(resumed.state.params))


@pytest.mark.slow  # 12 off-policy steps of the trainer (~40 s on 2 cores)
def test_off_policy_training_learns_on_the_quickstart_prompts(tmp_path):
    """The quickstart's arithmetic prompts and tokenizer, from a random model, with a reward it can
    earn from the start (the answer begins with a digit, about 10 of the 26 ids): trained one step
    behind, with the staleness corrected, the reward climbs."""
    cfg = dataclasses.replace(_config(tmp_path, 12, OFF_POLICY, lr=1e-2),
                              train=TrainConfig(steps=12, prompts_per_step=8, mini_batch_size=16,
                                                micro_batch_size=16, eval_every=0))
    result = train(cfg, model_config=MODEL, params=_params(), task=_task())
    rewards = [h["reward/mean"] for h in result.history]
    assert [h["rollout/staleness"] for h in result.history] == [0] + [1] * 11
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.25, rewards
