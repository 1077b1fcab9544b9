"""Countdown with Dr. GRPO: reach a target number with + - * /, each given number used once.

    python experiments/countdown_dr_grpo.py --model.path /ckpt/Qwen2.5-1.5B-Instruct
    python experiments/countdown_dr_grpo.py --model.path /ckpt/Qwen2.5-0.5B --data.num_numbers 4
    python experiments/countdown_dr_grpo.py --help   # every field of the typed config

Data: the embedded procedural Countdown task, nothing to download. Problem i
is generated from (data.seed, i), every problem has a solution that uses all
`data.num_numbers` numbers, and training and held-out problems never overlap.

The model is asked to think inside <think> </think> and give its equation
inside <answer> </answer> (the TinyZero format). The countdown verifier reads
the equation, checks that it uses exactly the given numbers and only + - * /
and parentheses, and evaluates it exactly with fractions (nothing is
executed); reward 1 when it equals the target, else 0.
The loss is the `dr_grpo` preset (Liu et al. 2025): group advantages without
std normalisation, per-sequence token sums divided by a constant (the
`sampling.max_new_tokens` budget) instead of each completion's length, no KL.

Defaults are sized for Qwen2.5-0.5B/1.5B on one TPU VM or GPU host: 32 prompts
x 8 samples per step, 512 new tokens, learning rate 1e-6, float32 weights with
bfloat16 compute, fsdp over every device, evaluation and a checkpoint every 50
steps.
"""

from __future__ import annotations

from collections.abc import Sequence

from hf_run import REQUIRED, run

from ouroboros_jax.config import (
    LOSS_PRESETS,
    CheckpointConfig,
    DataConfig,
    ExperimentConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    SamplingConfig,
    TrainConfig,
    VerifierConfig,
    parse_cli,
)
from ouroboros_jax.data import make_source
from ouroboros_jax.trainer import TrainResult

SYSTEM_PROMPT = ("You are a helpful assistant. You first think about the reasoning process in your mind "
                 "and then give the user the answer. Show your work in <think> </think> tags, and "
                 "return the final equation in <answer> </answer> tags, for example "
                 "<answer> (1 + 2) / 3 </answer>.")

DEFAULT = ExperimentConfig(
    name="countdown_dr_grpo",
    seed=0,
    # Architecture fields come from the checkpoint; these set the numerics.
    model=ModelConfig(path="", dtype="float32", compute_dtype="bfloat16", max_seq_len=32768),
    sampling=SamplingConfig(group_size=8, max_new_tokens=512, temperature=1.0,
                            prompt_len_buckets=(128, 256), eval_num_samples=4),
    loss=LOSS_PRESETS["dr_grpo"],
    optimizer=OptimizerConfig(learning_rate=1e-6, b2=0.99, weight_decay=0.01, warmup_steps=10,
                              max_grad_norm=1.0),
    train=TrainConfig(steps=500, prompts_per_step=32, mini_batch_size=256, micro_batch_size=16,
                      eval_every=50, eval_size=256),
    data=DataConfig(source="countdown", num_numbers=3, seed=0, system_prompt=SYSTEM_PROMPT,
                    chat_template=True),
    checkpoint=CheckpointConfig(save_every=50, keep=3, best_metric="eval/pass@1"),
    logging=LoggingConfig(run_dir="runs/countdown_dr_grpo"),
    verifier=VerifierConfig(names=("countdown",), weights=(1.0,), num_workers=8, timeout_s=10.0),
)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """Parse the command line (`argv`, default sys.argv) on top of DEFAULT and run."""
    cfg = parse_cli(DEFAULT, args=argv, description=__doc__, required=REQUIRED)
    train_source = make_source(cfg.data, split="train")
    eval_source = make_source(cfg.data, split="eval") if cfg.train.eval_every else None
    return run(cfg, train_source, eval_source)


if __name__ == "__main__":
    main()
