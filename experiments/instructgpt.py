"""InstructGPT's three stages on a Hugging Face checkpoint, every stage from JSONL.

    python experiments/instructgpt.py --model.path CKPT \\
        --demonstrations demos.jsonl --preferences prefs.jsonl --prompts prompts.jsonl

1. Supervised fine-tuning on demonstrations (`{"prompt", "response"}` lines):
   the response tokens' likelihood, `--sft-steps` updates of `--sft-batch` rows.
2. A Bradley-Terry reward model on preference pairs (`{"prompt", "chosen",
   "rejected"}` lines), initialised from the SFT model's backbone with a new
   score head, `--rm-steps` updates of `--rm-batch` pairs.
3. PPO with a critic (`--preset ppo` of the trainer: per-token KL to the SFT
   model in the reward, GAE, a critic initialised from the SFT policy) against
   that reward model alone (the verifier only reports `accuracy`), on the
   prompts of `--prompts` (`{"prompt", "response"}` lines).

Prompts go through the checkpoint's chat template when it has one (as in
every script built on `hf_run`). One run directory holds every stage:
`sft/metrics.jsonl`, `reward_model/metrics.jsonl`, and the PPO run's own
config.json, metrics.jsonl and checkpoints. `--export_dir DIR` writes the PPO
policy to DIR as a Hugging Face checkpoint (with the tokenizer files of
`--model.path`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from hf_run import REQUIRED, finish, load_policy, make_task

from ouroboros_jax import paths
from ouroboros_jax.batch import pack_rows
from ouroboros_jax.config import (
    LOSS_PRESETS,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    PPOConfig,
    SamplingConfig,
    TrainConfig,
    VerifierConfig,
    parse_cli,
)
from ouroboros_jax.data import jsonl_source, read_jsonl
from ouroboros_jax.models import export_hf_checkpoint, param_specs
from ouroboros_jax.objectives import sft
from ouroboros_jax.rewards import ModelReward
from ouroboros_jax.selfplay.preference import PreferencePair, encode_pairs
from ouroboros_jax.selfplay.reward_model import init_reward_model, train_reward_model
from ouroboros_jax.sharding import batch_shards, make_mesh
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step
from ouroboros_jax.trainer import TrainResult, prepare_run_dir, train

DEFAULT = ExperimentConfig(
    name="instructgpt",
    model=ModelConfig(path="", dtype="float32", compute_dtype="bfloat16", max_seq_len=4096),
    sampling=SamplingConfig(group_size=2, max_new_tokens=256, temperature=1.0, prompt_len_buckets=(128, 256),
                            eval_num_samples=2),
    loss=LOSS_PRESETS["ppo"],
    ppo=PPOConfig(enabled=True),
    optimizer=OptimizerConfig(learning_rate=1e-6, b2=0.99, max_grad_norm=1.0),
    train=TrainConfig(steps=200, prompts_per_step=32, mini_batch_size=16, micro_batch_size=8, inner_epochs=2,
                      eval_every=50, eval_size=64),
    data=DataConfig(chat_template=True),  # the prompts come from --prompts; this sets their rendering
    logging=LoggingConfig(run_dir="runs/instructgpt"),
    verifier=VerifierConfig(names=("math_any",), weights=(1.0,), num_workers=1),
)


def _stage_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The stage options (files, SFT and reward-model steps); the rest goes to `parse_cli`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    needed = not {"-h", "--help"} & set(argv)  # --help lists every option without the files
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--demonstrations", required=needed, help="JSONL of {prompt, response}")
    parser.add_argument("--preferences", required=needed, help="JSONL of {prompt, chosen, rejected}")
    parser.add_argument("--prompts", required=needed, help="JSONL of {prompt, response}: PPO's prompts")
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--sft-batch", type=int, default=16)
    parser.add_argument("--sft-lr", type=float, default=1e-5)
    parser.add_argument("--rm-steps", type=int, default=200)
    parser.add_argument("--rm-batch", type=int, default=16)
    parser.add_argument("--rm-lr", type=float, default=1e-5)
    return parser.parse_known_args(argv)


def _write_jsonl(path: str, records: list[dict]) -> None:
    file = paths.as_path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps(r) + "\n" for r in records))


def supervised(params, model_config, encode, tokenizer, demos, *, steps, batch, lr, mesh, seed) -> tuple:
    """Stage 1: SFT on the demonstrations' responses (cycled in a seeded order)."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    prompts = encode(demos)
    responses = [tokenizer.encode(d.gold["answer"]) + eos for d in demos]
    width = -(-max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True)) // 8) * 8
    optimizer = make_optimizer(lr, b2=0.99)
    step_fn, shardings = make_train_step(sft(model_config), optimizer, mesh, param_specs(model_config))
    state = init_train_state(jax.tree.map(lambda x: x.copy(), params), optimizer, jax.random.key(seed),
                             shardings=shardings)
    rng, records = np.random.default_rng(seed), []
    for i in range(steps):
        rows = rng.choice(len(demos), size=batch, replace=len(demos) < batch)
        packed = pack_rows([prompts[r] for r in rows], [responses[r] for r in rows], width=width)
        state, metrics = step_fn(state, packed)
        records.append({"step": i + 1, "sft/loss": float(metrics["loss"])})
    return state.params, records


def main(argv: Sequence[str] | None = None) -> TrainResult:
    stages, rest = _stage_args(argv)
    stage_help = ("Stage options: --demonstrations, --preferences, --prompts (JSONL files, required); "
                  "--sft-steps, --sft-batch, --sft-lr, --rm-steps, --rm-batch, --rm-lr.")
    cfg = parse_cli(DEFAULT, args=rest, description=f"{__doc__}\n{stage_help}", required=REQUIRED)
    started = time.perf_counter()
    prepare_run_dir(cfg)
    mesh = make_mesh(cfg.mesh)
    shards = batch_shards(mesh)
    for name in ("sft_batch", "rm_batch"):
        if getattr(stages, name) % shards:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(stages, name)} must be a multiple of the "
                              f"mesh's {shards} batch shards (data x fsdp)")
    model_config, params, tokenizer = load_policy(cfg, mesh)
    source = jsonl_source(stages.prompts, prompt_field="prompt", answer_field="response", seed=cfg.seed)
    held_out = source.first(cfg.train.eval_size) if cfg.train.eval_every else []
    task = make_task(cfg, tokenizer, source, held_out)

    demos = read_jsonl(stages.demonstrations, prompt_field="prompt", answer_field="response")
    params, sft_log = supervised(params, model_config, task.encode, tokenizer, demos, steps=stages.sft_steps,
                                 batch=stages.sft_batch, lr=stages.sft_lr, mesh=mesh, seed=cfg.seed)
    _write_jsonl(paths.join(cfg.logging.run_dir, "sft", "metrics.jsonl"), sft_log)

    pairs = [PreferencePair(e.prompt, e.gold["answer"], e.gold["rejected"])
             for e in read_jsonl(stages.preferences, prompt_field="prompt", answer_field="chosen")]
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    encoded = encode_pairs(pairs, lambda p: task.encode([dataclasses.replace(demos[0], prompt=p)])[0],
                           lambda r: tokenizer.encode(r) + eos)
    rm = train_reward_model(init_reward_model(params, jax.random.key(cfg.seed)), model_config, encoded,
                            steps=stages.rm_steps, batch_size=stages.rm_batch, learning_rate=stages.rm_lr,
                            mesh=mesh, seed=cfg.seed)
    rm_log = [{"step": i + 1, **{f"reward_model/{k}": float(v) for k, v in m.items()}}
              for i, m in enumerate(rm.history)]
    _write_jsonl(paths.join(cfg.logging.run_dir, "reward_model", "metrics.jsonl"), rm_log)

    task = dataclasses.replace(task, reward_model=ModelReward([rm.params], model_config, mesh=mesh),
                               reward_model_weight=1.0, verifier_weight=0.0)
    result = train(cfg, model_config=model_config, params=params, task=task, mesh=mesh)
    if cfg.export_dir:  # every process gathers its shards; process 0 writes
        export_hf_checkpoint(result.state.params, model_config, cfg.export_dir)
    finish(cfg, result, started)
    return result


if __name__ == "__main__":
    main()
