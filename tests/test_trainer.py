"""The RL loop end to end on a tiny model: exact resume, logs, and a clean stop on NaN."""

from __future__ import annotations

import dataclasses
import json
import re
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ouroboros_jax.config import (
    CheckpointConfig,
    ExperimentConfig,
    LoggingConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    SamplingConfig,
    TrainConfig,
    VerifierConfig,
    load_json,
)
from ouroboros_jax.data import arithmetic_source
from ouroboros_jax.models import Tokenizer, init_params
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.trainer import Task, TrainingDiverged, train

TOK = Tokenizer.char_level("0123456789+-*=? .Whatis")


def _config(run_dir, steps: int) -> ExperimentConfig:
    return ExperimentConfig(
        seed=3,
        model=ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                          head_dim=16, d_ff=64, max_seq_len=64),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),
        sampling=SamplingConfig(group_size=4, max_new_tokens=4, prompt_len_buckets=(24,), eval_num_samples=2),
        optimizer=OptimizerConfig(learning_rate=1e-3),
        train=TrainConfig(steps=steps, prompts_per_step=4, mini_batch_size=8, micro_batch_size=4,
                          eval_every=0),
        checkpoint=CheckpointConfig(save_every=1, keep=2, async_save=False),
        logging=LoggingConfig(run_dir=str(run_dir), console=False, tensorboard=False),
        verifier=VerifierConfig(names=("math_any",), weights=(1.0,), num_workers=1),
    )


def _task() -> Task:
    return Task(train_source=arithmetic_source(seed=0, digits=1), encode=lambda exs: TOK.encode_batch(
        [e.prompt for e in exs]), decode=lambda ids: TOK.decode(list(ids)), verifier="math_any",
        stop_token_ids=(TOK.eos_id,))


def _mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def _params(cfg):
    return init_params(cfg.model, jax.random.key(0))


class _Preempted(Exception):
    pass


def _preempted_after(calls: int) -> Task:
    """A task whose prompt source dies on its call number `calls + 1` (a preempted machine)."""
    task = _task()
    take, seen = task.train_source.take, []

    def dying_take(n):
        seen.append(n)
        if len(seen) > calls:
            raise _Preempted
        return take(n)

    task.train_source.take = dying_take
    return task


@pytest.mark.slow  # end to end, 10-35 s on 2 cores: in the slow set, which CI runs too
def test_resumed_run_equals_uninterrupted_run(tmp_path, capsys):
    full = train(_config(tmp_path / "full", 2), model_config=_config(tmp_path, 2).model,
                 params=_params(_config(tmp_path, 2)), task=_task(), mesh=_mesh())
    cfg2 = _config(tmp_path / "split", 2)
    with pytest.raises(_Preempted):  # step 1 is checkpointed, then the machine goes away
        train(cfg2, model_config=cfg2.model, params=_params(cfg2), task=_preempted_after(1), mesh=_mesh())
    # fresh params and a fresh data source: both must come back from the checkpoint
    resumed = train(cfg2, model_config=cfg2.model, params=_params(cfg2), task=_task(), mesh=_mesh())
    assert f"resuming from step 1 of {tmp_path / 'split'}" in capsys.readouterr().out
    assert resumed.resumed_from == 1
    assert len(resumed.history) == 1  # only step 2 ran
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
                 full.state.params, resumed.state.params)
    np.testing.assert_allclose(full.history[-1]["reward/mean"], resumed.history[-1]["reward/mean"])
    np.testing.assert_allclose(full.history[-1]["train/loss"], resumed.history[-1]["train/loss"], atol=1e-6)
    # the run directory holds the config (loading back equal), JSONL metrics and checkpoints
    assert load_json(tmp_path / "split" / "config.json") == cfg2
    lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for key in ("time/sample", "time/verify", "time/update", "reward/mean", "train/loss", "accuracy"):
        assert key in lines[-1]
    steps = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["1", "2"]


@pytest.mark.slow  # 15 s: the slow set (CI runs it) keeps the default suite under 10 minutes
def test_non_finite_update_stops_with_a_clear_error(tmp_path):
    cfg = _config(tmp_path / "nan", 2)
    params = _params(cfg)
    params["final_norm_D"] = params["final_norm_D"].at[0].set(np.nan)
    with pytest.raises(TrainingDiverged, match=r"step 1: the update is not finite.*no checkpoint was saved"):
        train(cfg, model_config=cfg.model, params=params, task=_task(), mesh=_mesh())
    # nothing non-finite was saved: no checkpoint step exists
    ckpts = tmp_path / "nan" / "checkpoints"
    assert not ckpts.exists() or not [p for p in ckpts.iterdir() if p.name.isdigit()]


def _inf_updates_from(count: int) -> optax.GradientTransformation:
    """Updates multiplied by inf from the optimizer's update number `count` on: finite loss and
    gradient, non-finite new parameters (what learning_rate=1e39 does)."""
    def update(updates, state, params=None):
        scale = jnp.where(state >= count, jnp.inf, 1.0)
        return jax.tree.map(lambda u: u * scale, updates), state + 1

    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)


def test_a_poisoned_update_is_never_saved_and_the_error_names_a_finite_checkpoint(tmp_path, monkeypatch):
    import ouroboros_jax.trainer as trainer_mod
    from ouroboros_jax.checkpoint import Checkpointer

    real = trainer_mod.optimizer_from_config
    poisoned = lambda cfg, total_steps=None: optax.chain(real(cfg, total_steps), _inf_updates_from(1))
    monkeypatch.setattr(trainer_mod, "optimizer_from_config", poisoned)
    cfg = dataclasses.replace(_config(tmp_path / "poison", 3),
                              train=dataclasses.replace(_config(tmp_path, 3).train, mini_batch_size=16,
                                                        micro_batch_size=0))  # one update per step
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, model_config=cfg.model, params=_params(cfg), task=_task(), mesh=_mesh())
    ckpts = tmp_path / "poison" / "checkpoints"
    assert "step 2: the update is not finite" in str(err.value)
    assert f"the last good checkpoint is step 1 in {ckpts}" in str(err.value)
    with Checkpointer(str(ckpts), async_save=False) as c:
        assert c.all_steps() == [1]
        restored = c.restore(1)
    leaves = jax.tree.leaves(restored.state["params"])
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_batch_sizes_the_mesh_cannot_split_are_rejected_before_any_compile(tmp_path, monkeypatch):
    import ouroboros_jax.trainer as trainer_mod
    from ouroboros_jax.config import ConfigError

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before the batch sizes were checked")

    monkeypatch.setattr(trainer_mod, "_compile_step", no_compile)
    cfg = _config(tmp_path, steps=1)  # micro-batch 4 rows, 8 batch shards
    mesh = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    with pytest.raises(ConfigError, match=r"train.mini_batch_size: 8 rows.*|train.micro_batch_size: 4 rows"):
        train(cfg, model_config=cfg.model, params=_params(cfg), task=_task(), mesh=mesh)


def test_sampled_evaluation_uses_eval_temperature_when_set(tmp_path, monkeypatch):
    import ouroboros_jax.trainer as trainer_mod

    seen = []
    monkeypatch.setattr(trainer_mod, "evaluate", lambda *a, **kw: seen.append(kw["temperature"]) or {})
    task = dataclasses.replace(_task(), eval_examples=[])
    for eval_temperature, expected in ((0.0, 1.0), (0.5, 0.5)):
        cfg = _config(tmp_path, steps=1)
        sampling = dataclasses.replace(cfg.sampling, eval_temperature=eval_temperature)
        cfg = dataclasses.replace(cfg, sampling=sampling)
        run = trainer_mod._evaluator(cfg, cfg.model, task, types.SimpleNamespace(score=None), None, ())
        run(None, 0)
        assert seen[-1] == expected


@pytest.mark.slow
def test_resume_keeps_the_step_0_evaluation_and_one_record_per_step(tmp_path, capsys):
    cfg = _config(tmp_path / "run", 4)
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, save_every=2),
                              train=dataclasses.replace(cfg.train, eval_every=4, eval_size=2))
    heldout = arithmetic_source(seed=0, digits=1, heldout=True).take(2)
    task = dataclasses.replace(_preempted_after(3), eval_examples=heldout)
    with pytest.raises(_Preempted):  # steps 1-3 logged, step 2 checkpointed, killed in step 4
        train(cfg, model_config=cfg.model, params=_params(cfg), task=task, mesh=_mesh())
    first = json.loads((tmp_path / "run" / "eval_step0.json").read_text())
    resumed = train(cfg, model_config=cfg.model, params=_params(cfg),
                    task=dataclasses.replace(_task(), eval_examples=heldout), mesh=_mesh())
    assert "resuming from step 2 of" in capsys.readouterr().out
    assert resumed.evals[0] == first and len(resumed.evals) == 2  # step 0 read back, step 4 evaluated
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    # docs/metrics.md explains every key the run logged
    glossary = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    keys = {re.sub(r"@\d+$", "@k", k) for r in records for k in r}
    assert not [k for k in sorted(keys) if f"`{k}`" not in glossary]


def test_a_run_directory_of_another_config_is_refused_with_the_diff(tmp_path):
    from ouroboros_jax.config import ConfigError
    from ouroboros_jax.trainer import prepare_run_dir

    cfg = _config(tmp_path / "run", 2)
    assert prepare_run_dir(cfg) == 0
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    other = dataclasses.replace(cfg, seed=4, train=dataclasses.replace(cfg.train, steps=5))
    diff = r"(?s)another config.*seed: 3 -> 4.*train.steps: 2 -> 5.*--overwrite"
    with pytest.raises(ConfigError, match=diff):
        prepare_run_dir(other)
    assert load_json(tmp_path / "run" / "config.json") == cfg  # the first run's config is untouched
    # the same config again is a resume; watching flags may change
    watched = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, console=True))
    assert prepare_run_dir(watched) == 0
    forced = dataclasses.replace(other, logging=dataclasses.replace(other.logging, overwrite=True))
    prepare_run_dir(forced)
    assert load_json(tmp_path / "run" / "config.json") == forced
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0}\n')  # written after the clearing
    prepare_run_dir(forced)  # train() calls it again: what the script wrote since is kept
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_checkpoint_paths_keep_urls():
    from ouroboros_jax.trainer import checkpoint_directory

    cfg = _config("gs://bucket/run", 1)
    assert checkpoint_directory(cfg) == "gs://bucket/run/checkpoints"
    off = dataclasses.replace(cfg, checkpoint=CheckpointConfig(save_every=0))
    assert checkpoint_directory(off) == ""
    elsewhere = dataclasses.replace(cfg, checkpoint=CheckpointConfig(directory="s3://b/ck", save_every=0))
    assert checkpoint_directory(elsewhere) == "s3://b/ck"


@pytest.mark.slow
def test_save_every_0_with_a_checkpoint_directory_saves_the_last_step(tmp_path):
    cfg = _config(tmp_path / "run", 2)
    cfg = dataclasses.replace(cfg, checkpoint=CheckpointConfig(directory=str(tmp_path / "ck"), save_every=0,
                                                               async_save=False))
    train(cfg, model_config=cfg.model, params=_params(cfg), task=_task(), mesh=_mesh())
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["2"]


@pytest.mark.slow  # two trainer runs, 10-16 s on 2 cores
def test_time_limit_stops_after_the_step_that_reaches_it_and_a_resume_spends_the_rest(tmp_path, capsys):
    cfg = dataclasses.replace(_config(tmp_path / "timed", 5),
                              train=dataclasses.replace(_config(tmp_path, 5).train, time_limit_s=1e-6))
    first = train(cfg, model_config=cfg.model, params=_params(cfg), task=_task(), mesh=_mesh())
    assert len(first.history) == 1  # any step takes longer than a microsecond: the budget ends after step 1
    spent = first.history[0]["time/step"]
    assert first.history[0]["time/rl_total"] == pytest.approx(spent)
    assert "train.time_limit_s=1e-06 reached after step 1" in capsys.readouterr().out
    meta = json.loads((tmp_path / "timed" / "checkpoints" / "1" / "meta" / "metadata").read_text())
    assert meta["rl_seconds"] == pytest.approx(spent)
    # a larger budget on resume is not a config change; the time already spent counts against it
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, time_limit_s=spent + 1e-6))
    resumed = train(more, model_config=cfg.model, params=_params(cfg), task=_task(), mesh=_mesh())
    assert resumed.resumed_from == 1 and len(resumed.history) == 1
    assert resumed.history[0]["time/rl_total"] == pytest.approx(spent + resumed.history[0]["time/step"])
    steps = [json.loads(x)["step"] for x in (tmp_path / "timed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
