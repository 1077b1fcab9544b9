"""Configs that would train on nothing, or on inf, are refused at construction, naming the field."""

from __future__ import annotations

import dataclasses
import math

import pytest

from ouroboros_jax.config import (
    LOSS_PRESETS,
    ConfigError,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    SamplingConfig,
    TrainConfig,
    VerifierConfig,
    WarmStartConfig,
    overlong_buffer,
)
from ouroboros_jax.trainer import rollout_settings


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: OptimizerConfig(learning_rate=math.inf),
         r"optimizer\.learning_rate: must be in \(0, 1\.0\]"),
        (lambda: OptimizerConfig(learning_rate=1e39), r"optimizer\.learning_rate: .*\(got 1e\+39\)"),
        (lambda: OptimizerConfig(learning_rate=math.nan), r"optimizer\.learning_rate"),
        (lambda: WarmStartConfig(learning_rate=1e39), r"warmstart\.learning_rate"),
        (lambda: OptimizerConfig(weight_decay=-0.1), r"optimizer\.weight_decay: must be finite and >= 0"),
        (lambda: OptimizerConfig(eps=-1e-8), r"optimizer\.eps: must be a positive finite number"),
        (lambda: ModelConfig(norm_eps=-1e-6), r"model\.norm_eps: must be a positive finite number"),
        (lambda: SamplingConfig(temperature=math.inf), r"sampling\.temperature: must be finite"),
        (lambda: VerifierConfig(names=("math",), weights=(math.nan,)),
         r"verifier\.weights\[0\]: must be a finite number \(the weight of 'math'\)"),
        (lambda: VerifierConfig(timeout_s=math.inf),
         r"verifier\.timeout_s: must be a positive finite number"),
        (lambda: VerifierConfig(names=("maths",)),
         r"verifier\.names: 'maths' is not a registered verifier; known: .*math_any"),
        (lambda: LossConfig(kl_coef=math.inf), r"loss\.kl_coef: must be a finite number"),
        (lambda: ExperimentConfig(sampling=SamplingConfig(group_size=1)),
         r"sampling\.group_size: must be >= 2: loss\.advantage='grpo' compares each completion .*exactly 0"),
        (lambda: ExperimentConfig(sampling=SamplingConfig(max_new_tokens=16),
                                  loss=dataclasses.replace(LOSS_PRESETS["dapo"], overlong_buffer=16)),
         r"loss\.overlong_buffer: must be below sampling\.max_new_tokens=16.*--loss\.overlong_buffer to at "
         r"most 15, or 0 for a fifth of the completion length \(3\)"),
    ],
)
def test_absurd_values_are_refused_naming_the_field(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_the_dapo_preset_scales_its_overlong_buffer_to_the_completion_length():
    # the quickstart's 5-token answers: a 16-token buffer made every completion "overlong"
    cfg = ExperimentConfig(sampling=SamplingConfig(max_new_tokens=5), loss=LOSS_PRESETS["dapo"])
    assert overlong_buffer(cfg.loss, 5) == 1
    assert rollout_settings(cfg.sampling, cfg.loss).overlong_buffer == 1
    assert overlong_buffer(cfg.loss, 20480) == 4096  # the paper's setting
    assert overlong_buffer(dataclasses.replace(cfg.loss, overlong_buffer=256), 1024) == 256


def test_reasonable_values_still_build():
    assert OptimizerConfig(learning_rate=1.0, weight_decay=0.1).learning_rate == 1.0
    assert VerifierConfig(names=("format", "math_any"), weights=(0.5, 1.0)).weights == (0.5, 1.0)
    assert VerifierConfig(names=("verifiers.format:verify",)).names == ("verifiers.format:verify",)
    sft = ExperimentConfig(sampling=SamplingConfig(group_size=1), loss=LossConfig(variant="sft"),
                           train=TrainConfig(mini_batch_size=8, micro_batch_size=0))
    assert sft.sampling.group_size == 1


def test_a_collapsed_url_run_dir_is_refused_and_a_url_is_kept():
    from ouroboros_jax.config import LoggingConfig

    with pytest.raises(ConfigError, match=r"logging\.run_dir: gs:/bucket/run: looks like the URL gs://bucket/run"):
        LoggingConfig(run_dir="gs:/bucket/run")
    assert LoggingConfig(run_dir="gs://bucket/run").run_dir == "gs://bucket/run"
