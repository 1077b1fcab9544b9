"""GSM8K with GRPO: a Hugging Face checkpoint learns grade-school math against the math verifier.

    python experiments/gsm8k_grpo.py --model.path /ckpt/Qwen2.5-1.5B-Instruct
    python experiments/gsm8k_grpo.py --model.path /ckpt/Qwen2.5-0.5B-Instruct \\
        --data.source jsonl --data.path gsm8k/train.jsonl --data.eval_path gsm8k/test.jsonl
    python experiments/gsm8k_grpo.py --help          # every field of the typed config

Data: tensorflow-datasets `gsm8k` by default (prepare it once with
`tfds build gsm8k --file_format array_record`, or point `--data.tfds_data_dir`
at a prepared bucket), or the release JSONL files (`question`, `answer` ending
in `#### <number>`) with `--data.source jsonl`. Training reads the train split,
evaluation the first `train.eval_size` problems of the test split.

Each question goes through the checkpoint's chat template (when it has one)
with a system prompt that asks for the final answer in \\boxed{}; the math
verifier extracts it and compares it with the gold number (reward 1 or 0).
The loss is the `grpo` preset (DeepSeekMath: std-normalised group advantages,
PPO clip 0.2, k3 KL to the frozen checkpoint with beta 0.04).

Defaults are sized for Qwen2.5-0.5B/1.5B on one TPU VM or GPU host: 32 prompts
x 8 samples per step, 512 new tokens, learning rate 1e-6, float32 weights with
bfloat16 compute, parameters and optimizer state sharded over every device
(fsdp), evaluation and a checkpoint every 50 steps. The run directory gets
config.json, metrics.jsonl, TensorBoard events, checkpoints and PNG curves.
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

SYSTEM_PROMPT = ("Solve the math problem. Reason step by step, then write the final answer as a number "
                 "in \\boxed{}.")

DEFAULT = ExperimentConfig(
    name="gsm8k_grpo",
    seed=0,
    # Architecture fields come from the checkpoint; these set the numerics.
    model=ModelConfig(path="", dtype="float32", compute_dtype="bfloat16", max_seq_len=32768),
    sampling=SamplingConfig(group_size=8, max_new_tokens=512, temperature=1.0,
                            prompt_len_buckets=(128, 256, 512), eval_num_samples=4),
    loss=LOSS_PRESETS["grpo"],
    optimizer=OptimizerConfig(learning_rate=1e-6, b2=0.99, weight_decay=0.01, warmup_steps=10,
                              max_grad_norm=1.0),
    train=TrainConfig(steps=500, prompts_per_step=32, mini_batch_size=256, micro_batch_size=16,
                      eval_every=50, eval_size=256),
    data=DataConfig(source="tfds", tfds_name="gsm8k", split="train", eval_split="test",
                    prompt_field="question", answer_field="answer", answer_format="gsm8k",
                    system_prompt=SYSTEM_PROMPT, chat_template=True),
    checkpoint=CheckpointConfig(save_every=50, keep=3, best_metric="eval/pass@1"),
    logging=LoggingConfig(run_dir="runs/gsm8k_grpo"),
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
