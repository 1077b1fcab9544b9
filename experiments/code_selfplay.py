"""Proposer/solver self-play on the code executor, from a Hugging Face checkpoint.

    python experiments/code_selfplay.py --model.path /ckpt/Qwen2.5-Coder-1.5B-Instruct
    python experiments/code_selfplay.py --model.path /ckpt/Qwen2.5-Coder-1.5B-Instruct \\
        --selfplay.steps 200 --selfplay.sampling.group_size 8 --selfplay.seed_file my_seeds.jsonl
    python experiments/code_selfplay.py --help       # every field of the typed config

One policy plays both roles (see `ouroboros_jax.selfplay.code_selfplay`): as
proposer it writes a Python function `f` with inputs for each task type
(deduction, abduction, induction); the sandbox runs every proposal twice in
fresh interpreters and keeps the deterministic ones whose outputs are plain
literals; as solver it predicts outputs, inputs or programs, and the executor
checks them. The solver is rewarded for being right, the proposer for tasks
the solver solves sometimes but not always (1 - success rate), advantages are
normalised within each (task type, role) group, and both roles train in one
update per step. The task buffer starts from a few hand-written seed programs
(plus `--selfplay.seed_file`) and grows with every valid new task.

Prompts go through the checkpoint's chat template (with `system_prompt`) when
it has one and `chat_template` is on. The run directory gets config.json,
metrics.jsonl (curves: `python -m ouroboros_jax.metrics RUN_DIR`), the final
task buffer as tasks.jsonl, and, with `--export_dir`, the trained policy as a
Hugging Face checkpoint. The script ends with one line:
`code_selfplay: steps=N valid proposals first=0.xx last=0.yy solver accuracy first=0.xx last=0.yy ...`.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hf_run import stop_token_ids

from ouroboros_jax.config import (
    LOSS_PRESETS,
    ConfigError,
    LoggingConfig,
    LossConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    SamplingConfig,
    save_json,
)
from ouroboros_jax.metrics import MetricsLogger
from ouroboros_jax.models import Tokenizer, export_hf_checkpoint, load_hf_checkpoint
from ouroboros_jax.selfplay.code_selfplay import CodeSelfPlayConfig, run_code_selfplay
from ouroboros_jax.sharding import initialize_distributed, make_mesh

SYSTEM_PROMPT = "You are an expert Python programmer. Follow the requested format exactly."


@dataclasses.dataclass(frozen=True)
class CodeSelfPlayExperiment:
    """Self-play on the code executor from a Hugging Face checkpoint (`model.path`)."""

    name: str = "code_selfplay"
    # Architecture fields come from the checkpoint; these set the numerics.
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(
        path="", dtype="float32", compute_dtype="bfloat16", max_seq_len=32768))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    selfplay: CodeSelfPlayConfig = dataclasses.field(default_factory=lambda: CodeSelfPlayConfig(
        steps=100, sampling=SamplingConfig(group_size=8, max_new_tokens=384), proposer_prompts=2,
        solve_per_type=8, references=2, max_prompt_len=1024, propose_max_new_tokens=384, workers=8,
        micro_batch_size=8))
    loss: LossConfig = dataclasses.field(default_factory=lambda: dataclasses.replace(
        LOSS_PRESETS["grpo"], kl_coef=0.0))
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        learning_rate=1e-6, max_grad_norm=1.0))
    logging: LoggingConfig = dataclasses.field(default_factory=lambda: LoggingConfig(
        run_dir="runs/code_selfplay"))
    chat_template: bool = True
    system_prompt: str = SYSTEM_PROMPT
    export_dir: str = ""


def parse(argv: Sequence[str] | None = None) -> CodeSelfPlayExperiment:
    import tyro

    return tyro.cli(CodeSelfPlayExperiment, default=CodeSelfPlayExperiment(),
                    args=list(sys.argv[1:] if argv is None else argv), description=__doc__,
                    use_underscores=True, config=(tyro.conf.FlagConversionOff,))


def load_policy(cfg: CodeSelfPlayExperiment, mesh):
    """Model config, parameters (placed on `mesh`) and tokenizer from `cfg.model.path`."""
    if not cfg.model.path:
        raise ConfigError("model.path: name a Hugging Face checkpoint directory (config.json, *.safetensors, "
                          "tokenizer.json), e.g. --model.path /ckpt/Qwen2.5-Coder-1.5B-Instruct")
    model_config, params = load_hf_checkpoint(cfg.model.path, dtype=cfg.model.dtype, mesh=mesh)
    model_config = dataclasses.replace(model_config, compute_dtype=cfg.model.compute_dtype,
                                       remat=cfg.model.remat)
    tokenizer = Tokenizer.from_dir(cfg.model.path)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"model.path: tokenizer.json has {tokenizer.vocab_size} tokens, more than the "
                          f"model's vocab_size {model_config.vocab_size} in {cfg.model.path}/config.json")
    return model_config, params, tokenizer


def prompt_encoder(tokenizer: Tokenizer, *, chat: bool, system_prompt: str):
    """Prompt text -> ids: the chat template when there is one (and `chat`), else plain text."""
    if chat and tokenizer.chat_template:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []

        def encode(text: str) -> list[int]:
            messages = [*system, {"role": "user", "content": text}]
            return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        return encode
    prefix = f"{system_prompt}\n\n" if system_prompt else ""
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    return lambda text: bos + tokenizer.encode(prefix + text)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    cfg = parse(argv)
    t_start = time.perf_counter()
    initialize_distributed()
    mesh = make_mesh(cfg.mesh)
    model_config, params, tokenizer = load_policy(cfg, mesh)
    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(cfg, run_dir / "config.json")
    chat = cfg.chat_template and bool(tokenizer.chat_template)
    encode = prompt_encoder(tokenizer, chat=chat, system_prompt=cfg.system_prompt)
    stops = stop_token_ids(cfg.model.path, tokenizer, chat=chat)
    print(f"code_selfplay: {model_config.num_params():,} parameters from {cfg.model.path}; "
          f"{cfg.selfplay.steps} steps, task types {', '.join(cfg.selfplay.task_types)}")
    with MetricsLogger.from_config(cfg.logging, total_steps=cfg.selfplay.steps) as logger:
        result = run_code_selfplay(
            cfg.selfplay, model_config=model_config, params=params, loss=cfg.loss, optimizer=cfg.optimizer,
            encode=encode, decode=tokenizer.decode, stop_token_ids=stops, mesh=mesh, logger=logger)
    result.buffer.to_jsonl(run_dir / "tasks.jsonl")
    if cfg.export_dir:
        export_hf_checkpoint(result.state.params, model_config, cfg.export_dir)
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (Path(cfg.model.path) / name).is_file():
                shutil.copy(Path(cfg.model.path) / name, Path(cfg.export_dir) / name)
    first, last = result.history[0], result.history[-1]
    buffer = " ".join(f"{k}={n}" for k, n in result.buffer.counts().items())
    print(f"code_selfplay: steps={len(result.history)} "
          f"valid proposals first={first['propose/valid_frac']:.2f} "
          f"last={last['propose/valid_frac']:.2f} solver accuracy first={first['solve/accuracy']:.2f} "
          f"last={last['solve/accuracy']:.2f} buffer {buffer} ({time.perf_counter() - t_start:.0f} s)")
    return last


if __name__ == "__main__":
    main()
