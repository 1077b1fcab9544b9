"""MATH-style problems with DAPO: competition math against the math verifier, DAPO's recipe.

    python experiments/math_dapo.py --model.path /ckpt/Qwen2.5-1.5B-Instruct \\
        --data.path math/train.jsonl --data.eval_path math/test.jsonl
    python experiments/math_dapo.py --help           # every field of the typed config

Data: JSONL files, one problem per line, with the problem text and a worked
solution whose final answer is in \\boxed{} (the MATH release format:
`{"problem": ..., "solution": "... \\boxed{\\frac{3}{4}}"}`); a bare answer
works as well. `--data.prompt_field` and `--data.answer_field` map other field
names (e.g. `--data.prompt_field prompt --data.answer_field answer`). A
tensorflow-datasets copy works too: `--data.source tfds --data.tfds_name ...`.

The math verifier takes the last \\boxed{} of the completion and checks it
against the gold's boxed answer with sympy (3/4, 0.75 and \\frac{3}{4} agree).
The loss is the `dapo` preset (Yu et al. 2025): clip-higher (0.2 / 0.28),
token-mean aggregation, no KL and no reference model, dynamic sampling (groups
whose completions all score the same are dropped and more prompts drawn, at
most `loss.max_sampling_rounds` rounds per step) and overlong reward shaping
(a penalty rising linearly to 1 over the last `loss.overlong_buffer` tokens
before `sampling.max_new_tokens`).

Defaults are sized for Qwen2.5-0.5B/1.5B on one TPU VM or GPU host: 32 prompts
x 16 samples per step, 1024 new tokens with a 256-token overlong buffer,
learning rate 1e-6, float32 weights with bfloat16 compute, fsdp over every
device, evaluation and a checkpoint every 50 steps.
"""

from __future__ import annotations

import dataclasses
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

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

DEFAULT = ExperimentConfig(
    name="math_dapo",
    seed=0,
    # Architecture fields come from the checkpoint; these set the numerics.
    model=ModelConfig(path="", dtype="float32", compute_dtype="bfloat16", max_seq_len=32768),
    sampling=SamplingConfig(group_size=16, max_new_tokens=1024, temperature=1.0,
                            prompt_len_buckets=(128, 256, 512), eval_num_samples=4),
    loss=dataclasses.replace(LOSS_PRESETS["dapo"], overlong_buffer=256, max_sampling_rounds=3),
    optimizer=OptimizerConfig(learning_rate=1e-6, b2=0.99, weight_decay=0.1, warmup_steps=10,
                              max_grad_norm=1.0),
    train=TrainConfig(steps=500, prompts_per_step=32, mini_batch_size=128, micro_batch_size=16,
                      eval_every=50, eval_size=256),
    data=DataConfig(source="jsonl", path="data/math/train.jsonl", eval_path="data/math/test.jsonl",
                    prompt_field="problem", answer_field="solution", system_prompt=SYSTEM_PROMPT,
                    chat_template=True, prompt_overflow="truncate"),
    checkpoint=CheckpointConfig(save_every=50, keep=3, best_metric="eval/pass@1"),
    logging=LoggingConfig(run_dir="runs/math_dapo"),
    verifier=VerifierConfig(names=("math",), weights=(1.0,), num_workers=8, timeout_s=10.0),
)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """Parse the command line (`argv`, default sys.argv) on top of DEFAULT and run."""
    cfg = parse_cli(DEFAULT, args=argv, description=__doc__, required=REQUIRED)
    train_source = make_source(cfg.data, split="train")
    eval_source = make_source(cfg.data, split="eval") if cfg.train.eval_every else None
    return run(cfg, train_source, eval_source)


if __name__ == "__main__":
    main()
