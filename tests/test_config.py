"""Typed configs: validation names the field, JSON round trip, CLI overrides and --help."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from ouroboros_jax.config import (
    LOSS_PRESETS,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    LossConfig,
    MeshConfig,
    ModelConfig,
    SamplingConfig,
    TrainConfig,
    VerifierConfig,
    load_json,
    parse_cli,
    save_json,
)


def test_defaults_are_valid_and_frozen():
    cfg = ExperimentConfig()
    assert cfg.rollout_batch_size == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
    hash(cfg.model)  # static jit argument


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ExperimentConfig(train=TrainConfig(prompts_per_step=3, mini_batch_size=16,
                                                    micro_batch_size=16)),
         r"train\.mini_batch_size: must divide the rollout batch .* = 24 \(got 16\)"),
        (lambda: TrainConfig(mini_batch_size=64, micro_batch_size=24),
         r"train\.micro_batch_size: must divide train\.mini_batch_size=64 \(got 24\)"),
        (lambda: LossConfig(variant="ppo2"), r"loss\.variant: must be one of .*'gspo'.* \(got 'ppo2'\)"),
        (lambda: LossConfig(aggregation="sum"), r"loss\.aggregation: must be one of"),
        (lambda: LossConfig(dual_clip=0.5), r"loss\.dual_clip: must be > 1"),
        (lambda: LossConfig(overlong="shape", overlong_buffer=-1), r"loss\.overlong_buffer"),
        (lambda: ModelConfig(n_heads=6, n_kv_heads=4), r"model\.n_kv_heads: must divide model\.n_heads=6"),
        (lambda: ModelConfig(head_dim=7), r"model\.head_dim: must be a positive even number"),
        (lambda: ModelConfig(family="gpt2"), r"model\.family: must be one of"),
        (lambda: SamplingConfig(top_p=0.0), r"sampling\.top_p: must be in \(0, 1\]"),
        (lambda: SamplingConfig(prompt_len_buckets=(64, 32)), r"sampling\.prompt_len_buckets"),
        (lambda: MeshConfig(data=-1, fsdp=-1), r"mesh: at most one of"),
        (lambda: DataConfig(source="jsonl"), r"data\.path: is required when data\.source is 'jsonl'"),
        (lambda: DataConfig(template="no placeholder"), r"data\.template: must contain"),
        (lambda: VerifierConfig(names=("math", "format"), weights=(1.0,)), r"verifier\.weights"),
        (lambda: ExperimentConfig(sampling=SamplingConfig(max_new_tokens=4000)),
         r"sampling\.max_new_tokens: the longest prompt bucket plus max_new_tokens \(4512\)"),
    ],
)
def test_validation_names_field_and_rule(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_mesh_resolve_against_device_count():
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    with pytest.raises(ConfigError, match=r"mesh\.fsdp: cannot fill"):
        MeshConfig(data=3, fsdp=-1).resolve(8)


def test_json_round_trip_is_equal(tmp_path):
    cfg = ExperimentConfig(
        name="rt", model=ModelConfig(d_model=128, rope_scaling="llama3"), loss=LOSS_PRESETS["dapo"],
        sampling=SamplingConfig(stop_token_ids=(1, 2), top_k=5),
    )
    save_json(cfg, tmp_path / "config.json")
    assert load_json(tmp_path / "config.json") == cfg


def test_json_unknown_and_mistyped_fields(tmp_path):
    (tmp_path / "a.json").write_text('{"model": {"d_modle": 3}}')
    with pytest.raises(ConfigError, match=r"unknown config field\(s\): model\.d_modle"):
        load_json(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('{"train": {"steps": "many"}}')
    with pytest.raises(ConfigError, match=r"train\.steps: expected int"):
        load_json(tmp_path / "b.json")


def test_cli_dotted_overrides_and_presets(tmp_path):
    cfg = parse_cli(args=["--model.d_model", "96", "--loss.clip_high", "0.3", "--sampling.stop_token_ids",
                          "5", "7", "--loss.dual_clip", "3.0"])
    assert cfg.model.d_model == 96 and cfg.loss.clip_high == 0.3
    assert cfg.sampling.stop_token_ids == (5, 7) and cfg.loss.dual_clip == 3.0
    cfg = parse_cli(args=["--preset", "gspo", "--loss.clip_low", "0.001"])
    assert cfg.loss.variant == "gspo" and cfg.loss.clip_high == 4e-4 and cfg.loss.clip_low == 0.001
    save_json(cfg, tmp_path / "c.json")
    again = parse_cli(args=["--config", str(tmp_path / "c.json"), "--seed", "9"])
    assert again == dataclasses.replace(cfg, seed=9)
    with pytest.raises(SystemExit):  # a usage error (tests/test_cli_errors.py)
        parse_cli(args=["--preset", "reinforce"])


def test_cli_help_lists_fields_types_and_defaults():
    code = "from ouroboros_jax.config import parse_cli; parse_cli(args=['--help'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
        "COLUMNS": "200", "PATH": "/usr/bin:/bin"}).stdout
    for text in ("--model.d_model", "--loss.variant", "--train.mini_batch_size", "--mesh.fsdp",
                 "--verifier.names", "--checkpoint.keep", "--logging.run_dir", "--data.source",
                 "--optimizer.learning_rate", "--sampling.top_p"):
        assert text in out, text
    assert "INT" in out and "(default: 64)" in out


def test_cli_validation_error_names_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(args=["--train.micro_batch_size", "24"])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "train.micro_batch_size: must divide" in err.replace("│ ", "").replace(" │", "")


def test_config_choices_equal_the_algorithms_and_the_cli_lists_them():
    """Each choice is declared once per side (config imports no JAX): the two must agree."""
    from ouroboros_jax import algorithms, config

    assert config.POLICY_VARIANTS == algorithms.POLICY_VARIANTS
    assert config.AGGREGATIONS == algorithms.AGGREGATIONS
    assert config.ADVANTAGE_MODES == algorithms.ADVANTAGE_MODES
    assert config.KL_KINDS == algorithms.KL_KINDS
    # the CLI checks a Literal field itself, naming the choices
    with pytest.raises(SystemExit):
        parse_cli(args=["--loss.variant", "ppo2"])


def test_saved_config_with_a_removed_field_is_rejected_with_the_reason(tmp_path):
    (tmp_path / "old.json").write_text('{"loss": {"algorithm": "grpo", "kl_coef": 0.0}}')
    with pytest.raises(ConfigError, match=r"loss\.algorithm: this field was removed: it was never read"):
        load_json(tmp_path / "old.json")
    (tmp_path / "bad.json").write_text('{"loss": {"variant": "ppo2"}}')
    with pytest.raises(ConfigError, match=r"loss\.variant: must be one of \['ppo_clip'"):
        load_json(tmp_path / "bad.json")
    assert TrainConfig(mini_batch_size=64, micro_batch_size=0).micro_batch_size == 0  # 0: the whole batch
