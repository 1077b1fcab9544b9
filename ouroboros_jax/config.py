"""Typed experiment configuration: frozen dataclasses, one per concern.

Every experiment is one `ExperimentConfig`. Each field is overridable from the
command line with a dotted name (`--model.d_model 128`), `--help` lists every
field with its type and default, and the whole object is saved as JSON next to
each run and loads back to an equal object.

Validation happens at construction: a wrong value raises `ConfigError` naming
the field and the rule it broke. Checks that need the device count (the mesh)
happen when the mesh is built, with the same kind of error.

Config is read at the edges (trainer, experiment scripts); models, losses and
verifiers take the explicit values they need.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import math
import os
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

# Every choice is a Literal type, declared once: fields are typed with it (so the CLI lists and
# checks the choices) and the tuple of its values is what validation and error messages use.
# Config imports no JAX: the choices of `ouroboros_jax.algorithms` are declared there again, and
# tests/test_config.py holds the two declarations equal.
Family = Literal["llama", "qwen2", "qwen3"]
DType = Literal["float32", "bfloat16"]
RopeScaling = Literal["", "linear", "llama3"]
PolicyVariant = Literal["ppo_clip", "gspo", "gspo_token", "cispo", "sapo", "sft"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
AdvantageMode = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
KLKind = Literal["k1", "k2", "k3"]
ImportanceLevel = Literal["token", "sequence"]
OverlongMode = Literal["none", "shape", "mask"]
Schedule = Literal["constant", "cosine"]
DataSource = Literal["arithmetic", "countdown", "jsonl", "tfds", "humaneval", "reasoning_gym"]
AnswerFormat = Literal["raw", "gsm8k"]
PromptOverflow = Literal["error", "truncate"]

FAMILIES: tuple[str, ...] = typing.get_args(Family)
DTYPES: tuple[str, ...] = typing.get_args(DType)
ROPE_SCALINGS: tuple[str, ...] = typing.get_args(RopeScaling)
POLICY_VARIANTS: tuple[str, ...] = typing.get_args(PolicyVariant)
AGGREGATIONS: tuple[str, ...] = typing.get_args(Aggregation)
ADVANTAGE_MODES: tuple[str, ...] = typing.get_args(AdvantageMode)
KL_KINDS: tuple[str, ...] = typing.get_args(KLKind)
IMPORTANCE_LEVELS: tuple[str, ...] = typing.get_args(ImportanceLevel)
OVERLONG_MODES: tuple[str, ...] = typing.get_args(OverlongMode)
SCHEDULES: tuple[str, ...] = typing.get_args(Schedule)
DATA_SOURCES: tuple[str, ...] = typing.get_args(DataSource)

# Fields that existed once, and what replaced them: a saved config that still has one is
# rejected with this explanation rather than a bare "unknown field".
REMOVED_FIELDS: dict[str, str] = {
    "loss.algorithm": "it was never read; the loss is set by loss.variant, loss.aggregation, loss.advantage "
                      "and the other loss fields (or --preset NAME)",
}


class ConfigError(ValueError):
    """A configuration value broke a rule; the message names the field and the rule."""


def _require(ok: bool, field_name: str, rule: str, value: Any = None) -> None:
    if not ok:
        shown = "" if value is None else f" (got {value!r})"
        raise ConfigError(f"{field_name}: {rule}{shown}")


def _one_of(value: Any, choices: Sequence[Any], field_name: str) -> None:
    _require(value in choices, field_name, f"must be one of {list(choices)}", value)


def _positive(value: float, field_name: str) -> None:
    _require(value > 0, field_name, "must be positive", value)


def _finite(value: float, field_name: str, rule: str = "must be a finite number") -> None:
    _require(value is None or math.isfinite(value), field_name, rule, value)


# AdamW moves every weight by about the learning rate per update: a rate above this is a typo
# (1e39 for 1e-3 turns every weight into inf after one update).
MAX_LEARNING_RATE = 1.0


def _learning_rate(value: float, field_name: str) -> None:
    _require(math.isfinite(value) and 0 < value <= MAX_LEARNING_RATE, field_name,
             f"must be in (0, {MAX_LEARNING_RATE}] (AdamW moves each weight by about the learning rate "
             "per update)", value)


# The dotted fields set on the command line while `parse_cli` builds a config: a rule that ties two
# fields blames the one the user set, and says where the other's value came from.
_USER_FLAGS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("user_flags",
                                                                            default=frozenset())


def check_micro_batch(micro_batch_size: int, batch_size: int, field_name: str, batch_name: str) -> None:
    """The one meaning of `micro_batch_size` in every config: rows per micro-batch, dividing the
    batch it splits; 0 means the whole batch (no accumulation)."""
    fits = micro_batch_size >= 0 and (micro_batch_size == 0 or batch_size % micro_batch_size == 0)
    user = _USER_FLAGS.get()
    if not fits and batch_name in user and field_name not in user:
        raise ConfigError(
            f"{batch_name}: {batch_size} (set by --{batch_name}) conflicts with {field_name}="
            f"{micro_batch_size} (not set, from the defaults): a micro-batch must divide the batch it "
            f"splits; also set --{field_name} to a divisor of {batch_size}, or 0 for no accumulation")
    _require(micro_batch_size >= 0 and (micro_batch_size == 0 or batch_size % micro_batch_size == 0),
             field_name, f"must divide {batch_name}={batch_size}", micro_batch_size)


@dataclass(frozen=True)
class ModelConfig:
    """Decoder LM architecture and numerics (Llama 3 / Qwen2 / Qwen3 families).

    When `path` names a Hugging Face checkpoint directory, the experiment loads
    the architecture and weights from it and the architecture fields here are
    replaced by the checkpoint's; otherwise a model of this shape is initialised.
    """

    family: Family = "qwen2"
    vocab_size: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    d_ff: int = 128
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling = ""
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    o_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    dtype: DType = "float32"
    compute_dtype: DType = "float32"
    remat: bool = False
    path: str = ""

    def __post_init__(self) -> None:
        _one_of(self.family, FAMILIES, "model.family")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            _positive(getattr(self, name), f"model.{name}")
        _require(self.head_dim > 0 and self.head_dim % 2 == 0, "model.head_dim",
                 "must be a positive even number (rotary embeddings pair dimensions)",
                 self.head_dim)
        _require(self.n_heads % self.n_kv_heads == 0, "model.n_kv_heads",
                 f"must divide model.n_heads={self.n_heads} (grouped-query attention)",
                 self.n_kv_heads)
        _one_of(self.rope_scaling, ROPE_SCALINGS, "model.rope_scaling")
        _positive(self.rope_scaling_factor, "model.rope_scaling_factor")
        _require(math.isfinite(self.norm_eps) and self.norm_eps > 0, "model.norm_eps",
                 "must be a positive finite number (it keeps RMSNorm from dividing by 0)", self.norm_eps)
        _require(math.isfinite(self.rope_theta) and self.rope_theta > 0, "model.rope_theta",
                 "must be a positive finite number", self.rope_theta)
        _one_of(self.dtype, DTYPES, "model.dtype")
        _one_of(self.compute_dtype, DTYPES, "model.compute_dtype")
        _positive(self.max_seq_len, "model.max_seq_len")

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one key/value head."""
        return self.n_heads // self.n_kv_heads

    def num_params(self) -> int:
        """Parameter count (embeddings included, counted once when tied)."""
        d, h = self.d_model, self.head_dim
        attn = d * h * (self.n_heads * 2 + self.n_kv_heads * 2)
        attn += (self.n_heads + 2 * self.n_kv_heads) * h if self.qkv_bias else 0
        attn += d if self.o_bias else 0
        attn += 2 * h if self.qk_norm else 0
        layer = attn + 3 * d * self.d_ff + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * layer + d + head


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape over the axes (data, fsdp, tensor); -1 takes the rest."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = {"mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor}
        for name, size in sizes.items():
            _require(size == -1 or size >= 1, name, "must be >= 1, or -1 for the rest", size)
        _require(list(sizes.values()).count(-1) <= 1, "mesh",
                 "at most one of data, fsdp, tensor may be -1")

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete (data, fsdp, tensor) shape for `num_devices` devices."""
        sizes = {"mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor}
        fixed = 1
        for size in sizes.values():
            fixed *= size if size != -1 else 1
        wild = [name for name, size in sizes.items() if size == -1]
        if wild:
            _require(num_devices % fixed == 0, wild[0],
                     f"cannot fill: the other axes ({fixed} devices) do not divide the "
                     f"{num_devices} devices")
            sizes[wild[0]] = num_devices // fixed
        else:
            _require(fixed == num_devices, "mesh",
                     f"data*fsdp*tensor = {fixed} must equal the device count {num_devices}")
        return sizes["mesh.data"], sizes["mesh.fsdp"], sizes["mesh.tensor"]


@dataclass(frozen=True)
class SamplingConfig:
    """Rollout sampling: group size, lengths and the sampling distribution."""

    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    prompt_len_buckets: tuple[int, ...] = (32, 64, 128, 256, 512)
    eval_temperature: float = 0.0  # sampled evaluation (pass@k, maj@k); 0: the rollout temperature
    eval_num_samples: int = 8

    def __post_init__(self) -> None:
        _positive(self.group_size, "sampling.group_size")
        _positive(self.max_new_tokens, "sampling.max_new_tokens")
        _require(math.isfinite(self.temperature) and self.temperature >= 0, "sampling.temperature",
                 "must be finite and >= 0 (0 is greedy)", self.temperature)
        _require(math.isfinite(self.eval_temperature) and self.eval_temperature >= 0,
                 "sampling.eval_temperature", "must be finite and >= 0 (0: the rollout temperature)",
                 self.eval_temperature)
        _require(0 < self.top_p <= 1, "sampling.top_p", "must be in (0, 1]", self.top_p)
        _require(self.top_k >= 0, "sampling.top_k", "must be >= 0 (0 is off)", self.top_k)
        _require(len(self.prompt_len_buckets) > 0
                 and list(self.prompt_len_buckets) == sorted(set(self.prompt_len_buckets)),
                 "sampling.prompt_len_buckets", "must be a non-empty increasing sequence",
                 self.prompt_len_buckets)
        _positive(self.eval_num_samples, "sampling.eval_num_samples")


@dataclass(frozen=True)
class LossConfig:
    """The policy objective, advantages and the DAPO trainer-side parts.

    Named presets with each paper's defaults live in `LOSS_PRESETS`.
    """

    advantage: AdvantageMode = "grpo"
    variant: PolicyVariant = "ppo_clip"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    aggregation: Aggregation = "seq_mean_token_mean"
    max_len: int | None = None
    kl_coef: float = 0.04
    kl_kind: KLKind = "k3"
    entropy_coef: float = 0.0
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    overlong: OverlongMode = "none"
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    # Off-policy correction (GRPO family and the PPO actor) for batches that carry the sampler's
    # log-probs (`rollout_logp`): per-token factor pi_old / pi_rollout, min(w, upper) (TIS), or 0
    # outside [lower, upper] (IcePop) when `importance_lower` is set; None: off.
    importance_level: ImportanceLevel = "token"
    importance_upper: float | None = None
    importance_lower: float | None = None

    def __post_init__(self) -> None:
        _one_of(self.importance_level, IMPORTANCE_LEVELS, "loss.importance_level")
        for name in ("importance_upper", "importance_lower"):
            _finite(getattr(self, name), f"loss.{name}")
        _require(self.importance_upper is None or self.importance_upper > 0, "loss.importance_upper",
                 "must be > 0 (the largest weight kept) or None", self.importance_upper)
        _require(self.importance_lower is None or (
            self.importance_upper is not None and 0 <= self.importance_lower < self.importance_upper),
            "loss.importance_lower", "needs loss.importance_upper and 0 <= lower < upper",
            self.importance_lower)
        _one_of(self.advantage, ADVANTAGE_MODES, "loss.advantage")
        _one_of(self.variant, POLICY_VARIANTS, "loss.variant")
        _one_of(self.aggregation, AGGREGATIONS, "loss.aggregation")
        _one_of(self.kl_kind, KL_KINDS, "loss.kl_kind")
        _one_of(self.overlong, OVERLONG_MODES, "loss.overlong")
        _require(self.clip_low >= 0, "loss.clip_low", "must be >= 0", self.clip_low)
        _require(self.clip_high >= 0, "loss.clip_high", "must be >= 0", self.clip_high)
        _require(self.dual_clip is None or self.dual_clip > 1, "loss.dual_clip",
                 "must be > 1 (the constant c of dual-clip PPO) or None", self.dual_clip)
        for name in ("clip_low", "clip_high", "dual_clip", "kl_coef", "entropy_coef", "overlong_penalty"):
            _finite(getattr(self, name), f"loss.{name}")
        _require(self.kl_coef >= 0, "loss.kl_coef", "must be >= 0", self.kl_coef)
        _require(self.max_len is None or self.max_len > 0, "loss.max_len",
                 "must be positive or None", self.max_len)
        _positive(self.max_sampling_rounds, "loss.max_sampling_rounds")
        _require(self.overlong_buffer >= 0, "loss.overlong_buffer", "must be >= 0",
                 self.overlong_buffer)


def overlong_buffer(loss: LossConfig, max_new_tokens: int) -> int:
    """The overlong buffer in tokens: `loss.overlong_buffer`, or when it is 0 a fifth of the
    completion length (DAPO's 4096 of 20480 tokens), at least 1."""
    return loss.overlong_buffer or max(1, max_new_tokens // 5)


LOSS_PRESETS: dict[str, LossConfig] = {
    # GRPO, Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300): token-level PPO clip,
    # std-normalised group advantages, k3 KL to the reference with beta 0.04,
    # loss averaged per sequence then over sequences.
    "grpo": LossConfig(),
    # Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training" (arXiv:2503.20783):
    # no std normalisation, token sums divided by a constant (the max length), no KL.
    "dr_grpo": LossConfig(advantage="dr_grpo", aggregation="seq_mean_token_sum_norm", kl_coef=0.0),
    # DAPO, Yu et al. 2025 (arXiv:2503.14476): clip-higher (0.2 / 0.28), token-mean
    # loss, no KL, dynamic sampling and overlong reward shaping in the trainer.
    # The overlong buffer is 0: a fifth of sampling.max_new_tokens, as the paper's 4096 of 20480.
    "dapo": LossConfig(clip_low=0.2, clip_high=0.28,
                       aggregation="token_mean", kl_coef=0.0, dynamic_sampling=True,
                       overlong="shape", overlong_buffer=0, overlong_penalty=1.0),
    # GSPO, Zheng et al. 2025, "Group Sequence Policy Optimization" (arXiv:2507.18071):
    # length-normalised sequence ratio clipped at 3e-4 / 4e-4, no KL.
    "gspo": LossConfig(variant="gspo", clip_low=3e-4, clip_high=4e-4,
                       aggregation="seq_mean_token_mean", kl_coef=0.0),
}


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup and an optional cosine decay; global-norm gradient clipping."""

    learning_rate: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Schedule = "constant"
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _learning_rate(self.learning_rate, "optimizer.learning_rate")
        _require(0 <= self.b1 < 1, "optimizer.b1", "must be in [0, 1)", self.b1)
        _require(0 <= self.b2 < 1, "optimizer.b2", "must be in [0, 1)", self.b2)
        _require(math.isfinite(self.eps) and self.eps > 0, "optimizer.eps",
                 "must be a positive finite number (it keeps Adam from dividing by 0)", self.eps)
        _require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "optimizer.weight_decay",
                 "must be finite and >= 0", self.weight_decay)
        _require(self.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
        _one_of(self.schedule, SCHEDULES, "optimizer.schedule")
        _require(math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0, "optimizer.max_grad_norm",
                 "must be finite and >= 0 (0: off)", self.max_grad_norm)


@dataclass(frozen=True)
class TrainConfig:
    """Batch sizes and the length of the run.

    The rollout batch is `prompts_per_step * sampling.group_size` sequences; it is
    split into mini-batches (one optimizer step each, `inner_epochs` passes), and
    each mini-batch into micro-batches whose gradients accumulate in one program
    (`micro_batch_size` rows each, 0: the whole mini-batch, as everywhere).
    """

    steps: int = 100
    prompts_per_step: int = 8
    mini_batch_size: int = 64
    micro_batch_size: int = 64
    inner_epochs: int = 1
    eval_every: int = 50
    eval_size: int = 64
    ref_update_every: int = 0
    # Stop early once the RL steps' summed `time/step` (rollout, rewards, update; evaluation and
    # checkpointing not counted) reaches this many seconds: runs compared at equal wall time
    # (0: off, run all `steps`). The sum is kept in checkpoints, so a resumed run spends the rest.
    time_limit_s: float = 0.0

    def __post_init__(self) -> None:
        _require(self.time_limit_s >= 0, "train.time_limit_s", "must be >= 0 (0: off)")
        for name in ("steps", "prompts_per_step", "mini_batch_size", "inner_epochs", "eval_size"):
            _positive(getattr(self, name), f"train.{name}")
        check_micro_batch(self.micro_batch_size, self.mini_batch_size, "train.micro_batch_size",
                          "train.mini_batch_size")
        _require(self.eval_every >= 0, "train.eval_every", "must be >= 0 (0: off)")
        _require(self.ref_update_every >= 0, "train.ref_update_every", "must be >= 0 (0: never)")


@dataclass(frozen=True)
class WarmStartConfig:
    """Supervised warm-start on gold answers before RL (0 steps: off).

    Runs the same update step with the "sft" loss variant (token-mean
    negative log-likelihood of the answer tokens).
    """

    steps: int = 0
    batch_size: int = 64
    learning_rate: float = 1e-3
    # Stop early once greedy accuracy on a slice of the training split reaches this (0: run all
    # `steps`): a warm-start that ends at a chosen skill whatever the seed, not at a step count.
    target_accuracy: float = 0.0
    check_every: int = 50

    def __post_init__(self) -> None:
        _require(self.steps >= 0, "warmstart.steps", "must be >= 0 (0: off)", self.steps)
        _require(0.0 <= self.target_accuracy <= 1.0, "warmstart.target_accuracy", "must be in [0, 1]",
                 self.target_accuracy)
        _positive(self.check_every, "warmstart.check_every")
        _positive(self.batch_size, "warmstart.batch_size")
        _learning_rate(self.learning_rate, "warmstart.learning_rate")


@dataclass(frozen=True)
class DataConfig:
    """Where prompts come from and how they become model input."""

    source: DataSource = "arithmetic"
    path: str = ""
    eval_path: str = ""
    prompt_field: str = "question"
    answer_field: str = "answer"
    tfds_name: str = ""
    tfds_data_dir: str = ""
    split: str = "train"
    eval_split: str = "test"
    template: str = "{prompt}"
    system_prompt: str = ""
    chat_template: bool = False
    answer_format: AnswerFormat = "raw"
    prompt_overflow: PromptOverflow = "error"
    digits: int = 3
    fixed_width: bool = False  # arithmetic: every operand has exactly `digits` digits
    operations: tuple[str, ...] = ("+",)
    num_numbers: int = 4
    task: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        _one_of(self.source, DATA_SOURCES, "data.source")
        _one_of(self.answer_format, typing.get_args(AnswerFormat), "data.answer_format")
        _one_of(self.prompt_overflow, typing.get_args(PromptOverflow), "data.prompt_overflow")
        _require(1 <= self.digits <= 18, "data.digits", "must be in [1, 18]", self.digits)
        _require(len(self.operations) > 0 and set(self.operations) <= {"+", "-", "*"}, "data.operations",
                 "must be a non-empty subset of ('+', '-', '*')", self.operations)
        _require(2 <= self.num_numbers <= 8, "data.num_numbers", "must be in [2, 8]", self.num_numbers)
        _require(self.source != "reasoning_gym" or bool(self.task), "data.task",
                 "is required when data.source is 'reasoning_gym'")
        _require(self.source != "jsonl" or bool(self.path), "data.path",
                 "is required when data.source is 'jsonl'")
        _require(self.source != "tfds" or bool(self.tfds_name), "data.tfds_name",
                 "is required when data.source is 'tfds'")
        _require("{prompt}" in self.template, "data.template",
                 "must contain the placeholder {prompt}", self.template)


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints: cadence, retention and resume."""

    directory: str = ""
    save_every: int = 0
    keep: int = 3
    best_metric: str = ""
    async_save: bool = True
    resume: bool = True

    def __post_init__(self) -> None:
        _require(self.save_every >= 0, "checkpoint.save_every", "must be >= 0 (0: off)")
        _positive(self.keep, "checkpoint.keep")


@dataclass(frozen=True)
class LoggingConfig:
    """Run directory and metric writers."""

    run_dir: str = "runs/default"
    log_every: int = 1
    console: bool = True
    jsonl: bool = True
    tensorboard: bool = True
    # A run directory holding another config is refused; True deletes that run first (`--overwrite`).
    overwrite: bool = False

    def __post_init__(self) -> None:
        _positive(self.log_every, "logging.log_every")
        from ouroboros_jax import paths  # imports no JAX

        try:
            paths.check(self.run_dir)
        except ValueError as e:
            raise ConfigError(f"logging.run_dir: {e}") from e


@dataclass(frozen=True)
class VerifierConfig:
    """Which verifiers score completions, their weights, and the worker pool."""

    # Registered names: math, math_any, math_verify, code, code_partial, format, countdown (and any
    # verifiers.register(NAME, fn)), or "pkg.module:function". Every name is used, with its weight.
    names: tuple[str, ...] = ("math",)
    weights: tuple[float, ...] = (1.0,)
    num_workers: int = 2
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _require(len(self.names) > 0, "verifier.names", "must name at least one verifier")
        _require(len(self.weights) == len(self.names), "verifier.weights",
                 f"must have one weight per name ({len(self.names)})", self.weights)
        _positive(self.num_workers, "verifier.num_workers")
        _require(math.isfinite(self.timeout_s) and self.timeout_s > 0, "verifier.timeout_s",
                 "must be a positive finite number of seconds (a hung verifier would stall the run)",
                 self.timeout_s)
        for i, weight in enumerate(self.weights):
            _finite(weight, f"verifier.weights[{i}]", f"must be a finite number (the weight of "
                    f"{self.names[i] if i < len(self.names) else 'a verifier'!r})")
        import verifiers  # imports no JAX

        known = verifiers.names()
        for name in self.names:
            _require(name in known or ":" in name, "verifier.names",
                     f"{name!r} is not a registered verifier; known: {', '.join(known)} "
                     "(or 'pkg.module:function', or verifiers.register(NAME, fn) before the config is built)")


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: every concern's config, composed."""

    name: str = "experiment"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig())  # `--preset ppo`: PPO with a critic
    # The sampler and the update on disjoint sub-meshes (ouroboros_jax.disaggregated); off by default.
    disagg: DisaggregationConfig = field(default_factory=lambda: DisaggregationConfig())
    # XLA's persistent compilation cache ("" leaves JAX's own setting): a program
    # compiled once is loaded from this directory by later runs of the same shapes.
    compilation_cache_dir: str = ""
    # Write the trained policy here as a Hugging Face checkpoint (safetensors, config.json and
    # the tokenizer files of model.path) when the run ends; "" writes none.
    export_dir: str = ""

    def __post_init__(self) -> None:
        _require(self.sampling.group_size >= 2 or self.loss.variant == "sft", "sampling.group_size",
                 f"must be >= 2: loss.advantage={self.loss.advantage!r} compares each completion with the "
                 "others of its prompt, so a group of 1 gives every advantage exactly 0 (nothing is learned)",
                 self.sampling.group_size)
        batch = self.rollout_batch_size
        _require(batch % self.train.mini_batch_size == 0, "train.mini_batch_size",
                 f"must divide the rollout batch train.prompts_per_step * "
                 f"sampling.group_size = {batch}", self.train.mini_batch_size)
        new = self.sampling.max_new_tokens
        shaped = self.loss.overlong == "shape"
        _require(not shaped or overlong_buffer(self.loss, new) < new, "loss.overlong_buffer",
                 f"must be below sampling.max_new_tokens={new}, or every completion is shaped as overlong "
                 f"(penalised whatever its length); set --loss.overlong_buffer to at most {new - 1}, or 0 "
                 f"for a fifth of the completion length ({max(1, new // 5)})", self.loss.overlong_buffer)
        total = self.sampling.max_new_tokens + self.sampling.prompt_len_buckets[-1]
        _require(total <= self.model.max_seq_len, "sampling.max_new_tokens",
                 f"the longest prompt bucket plus max_new_tokens ({total}) exceeds "
                 f"model.max_seq_len={self.model.max_seq_len}")

    @property
    def rollout_batch_size(self) -> int:
        """Sequences per rollout: prompts per step times the group size."""
        return self.train.prompts_per_step * self.sampling.group_size


# ---------------------------------------------------------------------------
# JSON round trip


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(cfg)


T = TypeVar("T")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        return from_dict(tp, value, _prefix=where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        choices = typing.get_args(tp)
        _require(value in choices, where, f"must be one of {list(choices)}", value)
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, _prefix: str = "") -> T:
    """Build a config dataclass from a dict, rejecting unknown fields by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    where = f"{_prefix}." if _prefix else ""
    for name in unknown:
        if where + name in REMOVED_FIELDS:
            raise ConfigError(f"{where}{name}: this field was removed: {REMOVED_FIELDS[where + name]}; "
                              "delete it from the saved config")
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(where + u for u in unknown)}")
    kwargs = {}
    for name, value in data.items():
        where = f"{_prefix}.{name}" if _prefix else name
        kwargs[name] = _coerce(hints[name], value, where)
    return cls(**kwargs)


def save_json(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write the whole config as indented JSON."""
    with open(path, "w") as f:
        json.dump(to_dict(cfg), f, indent=2, sort_keys=True)
        f.write("\n")


def load_json(path: str | os.PathLike[str], cls: type[T] = ExperimentConfig) -> T:  # type: ignore[assignment]
    """Load a config saved by `save_json`; the result equals the saved object."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
    return from_dict(cls, data)


# ---------------------------------------------------------------------------
# Command line


def preset_help(indent: str = "") -> str:
    """What `--preset NAME` sets, per preset: its KL coefficient and the loss fields that differ
    from LossConfig()."""
    base = to_dict(LossConfig())
    lines = []
    for name, preset in LOSS_PRESETS.items():
        fields = to_dict(preset)
        shaped = preset.overlong == "shape"
        changed = {k: v for k, v in fields.items()
                   if v != base[k] or k == "kl_coef" or (k == "overlong_buffer" and shaped)}
        shown = ", ".join(f"loss.{k}={v!r}" for k, v in changed.items())
        notes = [" (KL to the reference on)" if preset.kl_coef else "",
                 " (overlong_buffer 0: a fifth of sampling.max_new_tokens)" if shaped else ""]
        lines.append(f"{indent}{name}: {shown}{''.join(notes)}")
    return "\n".join(lines)


CLI_HELP = """Options read before the fields below:
  --config PATH     start from a saved config.json (e.g. RUN_DIR/config.json); flags apply on top
  --preset NAME     replace the loss section with a named recipe, before the other flags:
{presets}
  --overwrite       a run directory holding another config is refused; this deletes that run
                    first (same as --logging.overwrite)

Booleans take --section.flag / --section.no_flag (or --section.flag True|False)."""


def parse_cli(
    default: ExperimentConfig | None = None,
    args: Sequence[str] | None = None,
    description: str | None = None,
    required: dict[str, str] | None = None,
) -> ExperimentConfig:
    """Parse `--section.field value` overrides on top of `default`.

    `required` maps dotted fields that must be set (non-empty) to what they are: a run
    without one stops with a usage error asking for it, before any data or model is loaded.

    `--preset NAME` (one of LOSS_PRESETS) swaps the loss section for that preset (`ppo` also turns
    on `ppo.enabled`)
    before the other overrides apply; `--config PATH` starts from a saved JSON config;
    `--overwrite` sets `logging.overwrite`. A bad value, preset or config file prints a usage
    error naming it and exits with status 2 (no traceback).
    """
    import tyro

    argv = list(sys.argv[1:] if args is None else args)
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "script"
    base = default or ExperimentConfig()
    argv, config_path = _pop_option(argv, "--config", prog)
    if config_path:
        try:
            base = load_json(config_path)
        except OSError as e:
            _usage_error(prog, f"--config: cannot read {config_path!r}: {e.strerror or e}")
        except ConfigError as e:
            _usage_error(prog, f"--config {config_path}: {e}")
    argv, preset = _pop_option(argv, "--preset", prog)
    if preset:
        if preset not in LOSS_PRESETS:
            _usage_error(prog, f"--preset: must be one of {sorted(LOSS_PRESETS)} (got {preset!r})")
        base = dataclasses.replace(base, loss=LOSS_PRESETS[preset])
        if preset == "ppo":
            base = dataclasses.replace(base, ppo=dataclasses.replace(base.ppo, enabled=True))
    if "--overwrite" in argv:
        argv = [a for a in argv if a != "--overwrite"] + ["--logging.overwrite"]
    argv = _bool_flags(argv)
    text = (description or "").rstrip() + "\n\n" + CLI_HELP.format(presets=preset_help(" " * 20))
    token = _USER_FLAGS.set(frozenset(a[2:].split("=", 1)[0] for a in argv if a.startswith("--")))
    try:
        cfg = tyro.cli(ExperimentConfig, default=base, args=argv, description=text, use_underscores=True)
    finally:
        _USER_FLAGS.reset(token)
    for name, what in (required or {}).items():
        value: Any = cfg
        for part in name.split("."):
            value = getattr(value, part)
        if not value:
            _usage_error(prog, f"--{name} is required: {what}")
    return cfg


def _usage_error(prog: str, message: str) -> typing.NoReturn:
    print(f"{prog}: error: {message}\nFor full helptext, run {prog} --help", file=sys.stderr)
    raise SystemExit(2)


def _bool_fields(cls: Any = None, prefix: str = "") -> set[str]:
    cls = cls or ExperimentConfig
    out: set[str] = set()
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out |= _bool_fields(tp, f"{prefix}{name}.")
        elif tp is bool:
            out.add(prefix + name)
    return out


def _bool_flags(argv: list[str]) -> list[str]:
    """`--a.flag True|False` (and `=True`) as tyro's `--a.flag` / `--a.no_flag`."""
    fields, out, i = _bool_fields(), [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name in fields and not eq and i + 1 < len(argv) and argv[i + 1].lower() in ("true", "false"):
            value, i = argv[i + 1], i + 1
        if name in fields and value.lower() in ("true", "false"):
            section, _, leaf = name.rpartition(".")
            arg = "--" + (name if value.lower() == "true" else f"{section}.no_{leaf}".lstrip("."))
        out.append(arg)
        i += 1
    return out


def _pop_option(argv: list[str], name: str, prog: str = "script") -> tuple[list[str], str]:
    out, value = [], ""
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg == name:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                choices = f": one of {sorted(LOSS_PRESETS)}" if name == "--preset" else ""
                _usage_error(prog, f"{name} needs a value{choices}")
            value = argv[i + 1]
            next(it, None)
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            out.append(arg)
    return out, value


# ---------------------------------------------------------------------------
# PPO with a critic (ouroboros_jax.ppo)

PPOCritic = Literal["separate", "shared"]


@dataclass(frozen=True)
class PPOConfig:
    """PPO with a critic: per-token KL in the reward, GAE, and the critic.

    `enabled` (set by `--preset ppo`) makes the trainer run `ouroboros_jax.ppo`:
    the rollout's scores become per-token rewards with `kl_coef` times the k1
    KL to the reference on every completion token, GAE (`gamma`, `lam`) gives
    advantages and returns, and `train.inner_epochs` PPO epochs over
    `train.mini_batch_size` mini-batches update the actor, then the critic.
    `loss` still sets the clip and the aggregation of the actor's loss.
    """

    enabled: bool = False
    critic: PPOCritic = "separate"  # "shared": value head on the policy's backbone
    critic_learning_rate: float = 1e-5  # the separate critic's own optimizer (else as `optimizer`)
    value_coef: float = 0.5  # weight of the value loss in a shared backbone's loss
    value_clip: float = 0.2
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    # PPO-ptx (InstructGPT): `ptx_coef` times the likelihood loss of demonstrations mixed into
    # every actor update; `ptx_data` is a JSONL file of {"prompt", <ptx_completion_field>} lines.
    ptx_coef: float = 0.0
    ptx_data: str = ""
    ptx_completion_field: str = "response"

    def __post_init__(self) -> None:
        _one_of(self.critic, ("separate", "shared"), "ppo.critic")
        _learning_rate(self.critic_learning_rate, "ppo.critic_learning_rate")
        for name in ("value_coef", "value_clip", "kl_coef", "ptx_coef"):
            _finite(getattr(self, name), f"ppo.{name}")
            _require(getattr(self, name) >= 0, f"ppo.{name}", "must be >= 0", getattr(self, name))
        for name in ("gamma", "lam"):
            _require(0 <= getattr(self, name) <= 1, f"ppo.{name}", "must be in [0, 1]", getattr(self, name))
        if self.ptx_coef > 0:
            _require(bool(self.ptx_data), "ppo.ptx_data", "a JSONL file of demonstrations is required when "
                     "ppo.ptx_coef > 0")
            _require(self.enabled, "ppo.ptx_coef", "PPO-ptx runs in the PPO loop: use --preset ppo "
                     "(ppo.enabled)", self.ptx_coef)
            _require(bool(self.ptx_completion_field), "ppo.ptx_completion_field", "must name a field")


# The actor loss of `--preset ppo` (InstructGPT / verl): token-mean PPO clip, the KL
# in the reward (`ppo.kl_coef`) rather than in the loss.
LOSS_PRESETS["ppo"] = LossConfig(aggregation="token_mean", kl_coef=0.0)


# ---------------------------------------------------------------------------
# Disaggregated rollout and training (ouroboros_jax.disaggregated)


@dataclass(frozen=True)
class DisaggregationConfig:
    """How the devices are split between the sampler and the update (`--disagg.*`).

    Attributes:
      sampler_devices: devices (of the global list, taken from its end; with several hosts,
        the same number from each host's end) that sample; the rest train. 0: colocated,
        both use every device, in turn (the default).
      off_policy: one-step off-policy: the rollout of step t + 1 runs on the weights before
        update t, while update t trains; truncated importance weights correct the staleness.
      max_staleness: the most updates a batch may lag the trained weights (>= 1 with
        off_policy); a batch older than that stops the run.
      is_cap: truncation of the importance weights pi_train / pi_sampler (TIS, > 0).
    """

    sampler_devices: int = 0
    off_policy: bool = False
    max_staleness: int = 1
    is_cap: float = 2.0

    def __post_init__(self) -> None:
        _require(self.sampler_devices >= 0, "disagg.sampler_devices", "must be >= 0 (0: colocated)",
                 self.sampler_devices)
        _require(not self.off_policy or self.sampler_devices > 0, "disagg.off_policy",
                 "needs disagg.sampler_devices > 0: the rollout overlaps the update only on devices of "
                 "its own")
        _require(not self.off_policy or self.max_staleness >= 1, "disagg.max_staleness",
                 "must be >= 1 with disagg.off_policy (the rollout is one update behind)", self.max_staleness)
        _require(math.isfinite(self.is_cap) and self.is_cap > 0, "disagg.is_cap", "must be > 0", self.is_cap)
