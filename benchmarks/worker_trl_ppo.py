"""Benchmark worker: TRL's PPOTrainer (torch, CPU) on the PPO workload of `bench_ppo_cpu.py`.

    TRL_PYTHON worker_trl_ppo.py CHECKPOINT_DIR --steps N --prompts P --group G \\
        --prompt-len L --completion-len C

TRL removed its PPOTrainer in 1.13.0; the last release with one is 1.12.0
(`trl.experimental.ppo`), so this runs under an interpreter with `trl==1.12.0`.
Its `train()` is one closed loop (sample, reference and value forwards, score,
KL-shaped rewards, GAE, PPO epochs of actor and critic), so it cannot alternate
step by step with ours: the loop runs `steps + 1` PPO batches and a callback
records the wall time of each (`on_step_end`); the first is not counted, as
our compile step is not. Same checkpoint, prompts and shapes as ours: every
prompt repeated `group` times (TRL's PPO samples one completion per query),
completions always run to `completion_len` tokens (no stop token, the end
token is outside the model's vocabulary), one PPO epoch over one mini-batch
of all rows, a value model (`AutoModelForSequenceClassification`, one label)
loaded from the same checkpoint, KL 0.05 in the reward, gamma 1, lambda 0.95,
float32 and no activation checkpointing (TRL's PPO defaults to bf16 and
checkpointing on; ours runs neither here).
The score is the shared host reward of `workload.py` on the completion text
(`get_reward` is replaced for the reward model only; the value model still
runs its own forward), as ours scores with the verifier function.

Prints one JSON line: the per-step times and the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from workload import Workload, hf_tokenizer, prompt_ids, reward  # noqa: E402

try:
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module
except ImportError as e:  # trl >= 1.13 has no PPO trainer
    raise SystemExit(f"worker_trl_ppo: trl {trl.__version__} has no PPOTrainer ({e}); "
                     "install trl==1.12.0") from e


class StepTimes(transformers.TrainerCallback):
    """The wall time of every PPO batch (rollout + scoring + updates), from the trainer's own loop."""

    def __init__(self) -> None:
        self.marks = [time.perf_counter()]

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())

    @property
    def times(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("directory")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    work = Workload(prompts=a.prompts, group=a.group, prompt_len=a.prompt_len,
                    completion_len=a.completion_len)
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(a.seed)
    tokenizer = hf_tokenizer(a.directory)
    load = lambda cls, **kw: cls.from_pretrained(a.directory, dtype=torch.float32, **kw)
    policy = load(transformers.AutoModelForCausalLM)
    ref = load(transformers.AutoModelForCausalLM)
    value = load(transformers.AutoModelForSequenceClassification, num_labels=1)
    scorer = load(transformers.AutoModelForSequenceClassification, num_labels=1)  # never run: see below
    vocab = policy.config.vocab_size
    queries = [list(map(int, row)) for row in prompt_ids(work, vocab, a.seed) for _ in range(work.group)]

    original = ppo_module.get_reward

    def get_reward(model, query_responses, pad_token_id, context_length):
        if model is not scorer:
            return original(model, query_responses, pad_token_id, context_length)
        texts = [" ".join(f"t{int(i)}" for i in row[context_length:]) for row in query_responses]
        return None, torch.tensor([reward(t) for t in texts], dtype=torch.float32), None

    ppo_module.get_reward = get_reward
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out, per_device_train_batch_size=work.rows, gradient_accumulation_steps=1,
            local_rollout_forward_batch_size=work.rows, num_mini_batches=1, num_ppo_epochs=1,
            total_episodes=work.rows * (a.steps + 1), response_length=work.completion_len, temperature=1.0,
            stop_token=None, missing_eos_penalty=None, kl_coef=0.05, gamma=1.0, lam=0.95, cliprange=0.2,
            cliprange_value=0.2, vf_coef=0.1, learning_rate=1e-6, max_grad_norm=1.0, use_cpu=True,
            bf16=False, report_to=[], logging_steps=10**9, save_strategy="no", num_sample_generations=0,
            gradient_checkpointing=False, seed=a.seed, dataloader_drop_last=True)
        dataset = datasets.Dataset.from_dict({"input_ids": queries})
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref,
                             reward_model=scorer, train_dataset=dataset, value_model=value, callbacks=[timer])
        trainer.train()
    times = timer.times
    print(json.dumps({"times": times, "tokens_per_step": work.tokens, "trl": trl.__version__,
                      "torch": torch.__version__, "transformers": transformers.__version__}), flush=True)


if __name__ == "__main__":
    main()
