"""What the real-model experiment scripts share: load a Hugging Face checkpoint, build the task, report.

The scripts (gsm8k_grpo.py, math_dapo.py, code_gspo.py, countdown_dr_grpo.py)
stay flat: config, mesh, checkpoint, data, task, train. This module holds the
steps that are the same in each:

- `load_policy`: the checkpoint in `--model.path` (safetensors + config.json +
  tokenizer.json) loaded straight into its shards, with the config's numerics,
  checked against the sampling lengths and the tokenizer's vocabulary;
- `make_task`: prompts rendered with the checkpoint's chat template (when it
  has one and `data.chat_template` is on) and the config's system prompt,
  stop tokens from the tokenizer and the checkpoint's config files, and the
  verifier named in the config;
- `finish`: PNG curves and one summary line;
- `run`: all of the above around `ouroboros_jax.trainer.train`, the body of
  every script's `main` once its data sources are built.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from ouroboros_jax.config import ConfigError, ExperimentConfig, ModelConfig
from ouroboros_jax.data import PromptSource, make_prompt_encoder
from ouroboros_jax.metrics import plot_run
from ouroboros_jax.models import Tokenizer, export_hf_checkpoint, load_hf_checkpoint
from ouroboros_jax.models.transformer import Params
from ouroboros_jax.sharding import batch_shards, initialize_distributed, make_mesh
from ouroboros_jax.trainer import Task, TrainResult, train, verifier_spec

# Tokens that close a chat turn in common templates (ChatML, Llama 3, Phi, Gemma). A model prompted
# through its chat template ends its answer with one of them, which its EOS id may not be.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
# The smoke test: every checkpoint script end to end in seconds on a CPU, with a tiny random
# checkpoint (`python -m ouroboros_jax.models.tiny DIR`): 2 steps of 4 prompts x 2 samples, 8 new
# tokens, an evaluation of 4 problems at steps 0 and 2, a checkpoint at the end (README "Smoke test").
SMOKE_FLAGS = ("--train.steps", "2", "--train.prompts_per_step", "4", "--sampling.group_size", "2",
               "--train.mini_batch_size", "8", "--train.micro_batch_size", "0",
               "--sampling.max_new_tokens", "8", "--sampling.prompt_len_buckets", "512",
               "--train.eval_every", "2", "--train.eval_size", "4", "--sampling.eval_num_samples", "2",
               "--verifier.num_workers", "1", "--optimizer.warmup_steps", "0")
# Flags every checkpoint script asks for before it loads data (`parse_cli(required=...)`).
REQUIRED = {"model.path": "a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json), "
                          "e.g. --model.path /ckpt/Qwen2.5-1.5B-Instruct"}


def load_policy(cfg: ExperimentConfig, mesh: Any) -> tuple[ModelConfig, Params, Tokenizer]:
    """The policy and tokenizer from the checkpoint directory `cfg.model.path`, placed on `mesh`.

    Parameters are stored in `model.dtype` (keep float32 for RL: updates of a
    1e-6 learning rate vanish in bfloat16 weights) and computed in
    `model.compute_dtype`; `model.remat` is carried over. Every other
    architecture field comes from the checkpoint's config.json.
    """
    if not cfg.model.path:
        raise ConfigError("model.path: name a Hugging Face checkpoint directory (config.json, "
                          "*.safetensors, tokenizer.json), e.g. --model.path /ckpt/Qwen2.5-1.5B-Instruct")
    shards = batch_shards(mesh)
    if cfg.train.mini_batch_size % shards:
        raise ConfigError(f"train.mini_batch_size: must be a multiple of the mesh's batch shards "
                          f"(data x fsdp = {shards}), so each device holds whole rows "
                          f"(got {cfg.train.mini_batch_size})")
    model_config, params = load_hf_checkpoint(cfg.model.path, dtype=cfg.model.dtype, mesh=mesh)
    model_config = dataclasses.replace(model_config, compute_dtype=cfg.model.compute_dtype,
                                       remat=cfg.model.remat)
    longest = cfg.sampling.prompt_len_buckets[-1] + cfg.sampling.max_new_tokens
    if longest > model_config.max_seq_len:
        raise ConfigError(
            f"sampling.max_new_tokens: the longest prompt bucket plus max_new_tokens ({longest}) exceeds "
            f"the checkpoint's max_position_embeddings ({model_config.max_seq_len}) in {cfg.model.path}")
    tokenizer = Tokenizer.from_dir(cfg.model.path)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"model.path: tokenizer.json has {tokenizer.vocab_size} tokens, more than the "
                          f"model's vocab_size {model_config.vocab_size} in {cfg.model.path}/config.json")
    return model_config, params, tokenizer


def stop_token_ids(path: str | Path, tokenizer: Tokenizer, *, chat: bool) -> tuple[int, ...]:
    """Ids that end a completion: the tokenizer's EOS, `eos_token_id` of config.json and
    generation_config.json (an int or a list), and, for chat prompts, the end-of-turn token."""
    ids = {tokenizer.eos_id}
    for name in ("config.json", "generation_config.json"):
        file = Path(path) / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos])
    if chat:
        ids.update(tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS)
    return tuple(sorted(i for i in ids if i is not None))


def make_task(
    cfg: ExperimentConfig, tokenizer: Tokenizer, train_source: PromptSource, eval_examples: Sequence[Any],
) -> Task:
    """The trainer's `Task`: prompts rendered per `cfg.data`, decoding, stop tokens and the verifier.

    With `data.chat_template` on, prompts go through the tokenizer's chat
    template (system prompt as a system turn); a tokenizer without one (a base
    model) gets plain text with the system prompt as its first paragraph.
    """
    data = cfg.data
    if data.chat_template and not tokenizer.chat_template:
        print(f"{cfg.name}: {cfg.model.path} has no chat template; prompts are plain text")
        data = dataclasses.replace(data, chat_template=False)
    encoder = make_prompt_encoder(data, tokenizer, max_len=cfg.sampling.prompt_len_buckets[-1])
    # PPO-ptx demonstrations end as sampled completions do: end of turn in a chat, else EOS.
    turn_ends = [tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS] if data.chat_template else []
    end = next((i for i in turn_ends if i is not None), tokenizer.eos_id)
    eos = [end] if end is not None else []
    return Task(train_source=train_source, encode=encoder.encode_batch, decode=tokenizer.decode,
                verifier=verifier_spec(cfg.verifier),
                stop_token_ids=stop_token_ids(cfg.model.path, tokenizer, chat=data.chat_template),
                eval_examples=list(eval_examples),
                encode_completion=lambda text: tokenizer.encode(text) + eos)


def finish(cfg: ExperimentConfig, result: TrainResult, started: float) -> None:
    """Write the PNG curves (process 0) and print one line: held-out pass@1 before and after."""
    if jax.process_index() == 0:
        plot_run(result.run_dir)
    line = f"{cfg.name}: {len(result.history)} steps in {time.perf_counter() - started:.0f} s"
    if len(result.evals) >= 2:
        before, after = result.evals[0], result.evals[-1]
        line += (f"; held-out pass@1 before={before['eval/pass@1']:.3f} after={after['eval/pass@1']:.3f}, "
                 f"greedy before={before['eval/greedy_acc']:.3f} after={after['eval/greedy_acc']:.3f}")
    print(f"{line}; run directory {result.run_dir}")


def run(cfg: ExperimentConfig, train_source: PromptSource, eval_source: PromptSource | None) -> TrainResult:
    """Mesh, checkpoint, task, the RL loop of `cfg`, curves and a summary line.

    Evaluation reads the first `train.eval_size` examples of `eval_source`
    (None: no evaluation). On a TPU pod or GPU cluster every host runs the same
    script; `initialize_distributed` joins them into one global mesh.
    """
    started = time.perf_counter()
    initialize_distributed()  # a no-op on one host
    mesh = make_mesh(cfg.mesh)
    model_config, params, tokenizer = load_policy(cfg, mesh)
    print(f"{cfg.name}: {model_config.num_params():,} parameters from {cfg.model.path} "
          f"on a {dict(mesh.shape)} mesh")
    eval_examples = eval_source.first(cfg.train.eval_size) if eval_source is not None else []
    task = make_task(cfg, tokenizer, train_source, eval_examples)
    result = train(cfg, model_config=model_config, params=params, task=task, mesh=mesh)
    if cfg.export_dir:  # every process gathers its shards; process 0 writes
        export_hf_checkpoint(result.state.params, model_config, cfg.export_dir)
    finish(cfg, result, started)
    return result
