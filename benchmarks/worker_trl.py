"""Benchmark worker: TRL's GRPOTrainer (torch, CPU) runs the shared GRPO workload (see workload.py).

Started by `common.Worker` with one argument, the `workload.Settings` as JSON.
Each "step" request runs one unit of the chosen mode:

- step: `trainer.training_step` on the prompts, each repeated `group` times as
  TRL's sampler repeats them: TRL generates (transformers `generate`), scores
  with the shared reward, computes advantages, loss and backward; then the
  optimizer step the Hugging Face Trainer loop takes (gradient clip,
  `optimizer.step`, scheduler step, `zero_grad`);
- update: the same on the stored batch, with `_prepare_inputs` replaced by the
  identity so that no generation happens (TRL's own compute_loss, fused
  chunked log-prob head and backward);
- generate: transformers `generate` alone on the repeated prompts.

This process imports neither JAX nor ouroboros_jax, so its resident memory is
TRL's own.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from common import serve  # noqa: E402
from workload import (  # noqa: E402
    Settings,
    hf_generation_config,
    hf_tokenizer,
    load_batch,
    prompt_ids,
    prompt_texts,
    reward,
)

SEEN: dict[str, list] = {"rewards": [], "completions": []}


def reward_func(completions, **_) -> list[float]:
    SEEN["rewards"], SEEN["completions"] = [reward(c) for c in completions], list(completions)
    return list(SEEN["rewards"])


def make_trainer(s: Settings, model, tokenizer) -> trl.GRPOTrainer:
    w = s.work
    args = trl.GRPOConfig(
        output_dir=str(Path(s.directory) / "trl"), per_device_train_batch_size=s.micro,
        gradient_accumulation_steps=w.rows // s.micro, num_generations=w.group,
        max_completion_length=w.completion_len, temperature=1.0, top_p=1.0, top_k=0,
        loss_type="grpo", beta=0.0, epsilon=s.clip, learning_rate=s.learning_rate, weight_decay=0.0,
        max_grad_norm=s.max_grad_norm, use_cpu=True, bf16=False, report_to=[], logging_steps=10**9,
        save_strategy="no", disable_dropout=True, gradient_checkpointing=s.remat, seed=s.seed,
    )
    trainer = trl.GRPOTrainer(model=model, args=args, processing_class=tokenizer, reward_funcs=reward_func,
                              train_dataset=datasets.Dataset.from_dict({"prompt": ["t1"] * w.rows}))
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = w.rows // s.micro  # set by Trainer's own loop
    return trainer


def optimizer_step(trainer: trl.GRPOTrainer) -> float:
    """What the Hugging Face Trainer loop does after the accumulated backward passes."""
    model = trainer.model
    grad_norm = trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    return float(grad_norm)


def main() -> None:
    s = Settings.from_json(sys.argv[1])
    w = s.work
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(s.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(s.directory, dtype=torch.float32)
    tokenizer = hf_tokenizer(s.directory)
    vocab = model.config.vocab_size

    if s.mode == "generate":
        model.eval()
        repeated = torch.tensor(prompt_ids(w, vocab, s.seed), dtype=torch.long).repeat_interleave(w.group, 0)
        attention = torch.ones_like(repeated)
        gen = hf_generation_config(w.completion_len, tokenizer.pad_token_id)

        def run():
            with torch.inference_mode():
                out = model.generate(repeated, attention_mask=attention, generation_config=gen)
            return {"new_tokens": int(out.shape[0] * (out.shape[1] - w.prompt_len))}

    elif s.mode == "update":
        trainer = make_trainer(s, model, tokenizer)
        trainer._prepare_inputs = lambda inputs: inputs  # the batch is given: no generation
        b = {k: torch.from_numpy(v) for k, v in load_batch(s.directory).items()}
        P = w.prompt_len
        inputs = {
            "prompt_ids": b["tokens"][:, :P].long(), "prompt_mask": b["attention"][:, :P].long(),
            "completion_ids": b["tokens"][:, P:].long(), "completion_mask": b["loss_mask"][:, P:].long(),
            "advantages": b["advantages"], "old_per_token_logps": b["old_logp"][:, P:],
        }
        n_micro = w.rows // s.micro
        micro_batches = [{k: v[i::n_micro] for k, v in inputs.items()} for i in range(n_micro)]
        # What the Trainer loop passes: completion tokens in the accumulation window.
        num_items = inputs["completion_mask"].sum()

        def run():
            loss = sum(float(trainer.training_step(trainer.model, mb, num_items)) for mb in micro_batches)
            return {"loss": loss, "grad_norm": optimizer_step(trainer)}

    else:
        if s.micro != w.rows:
            raise ValueError("worker_trl: the full step runs the whole batch at once (micro_batch 0)")
        trainer = make_trainer(s, model, tokenizer)
        # TRL's dataloader repeats each prompt `group` times in a row (RepeatSampler).
        rows = [{"prompt": p} for p in prompt_texts(w, vocab, s.seed) for _ in range(w.group)]

        def run():
            loss = float(trainer.training_step(trainer.model, rows, None))
            return {"loss": loss, "grad_norm": optimizer_step(trainer),
                    "reward": sum(SEEN["rewards"]) / len(SEEN["rewards"]),
                    "new_tokens": sum(len(c.split()) for c in SEEN["completions"])}

    serve({"step": run}, ready={"params": sum(p.numel() for p in model.parameters())})


if __name__ == "__main__":
    main()
