"""Export a saved run's policy as a Hugging Face checkpoint.

    python -m ouroboros_jax.export RUN_DIR OUT [--step N] [--dtype bfloat16]

Reads RUN_DIR/config.json (the experiment), restores the newest checkpoint
(or step N) of the run, and writes OUT: safetensors, config.json and, when the
run started from a Hugging Face checkpoint (`model.path`), its tokenizer
files and special token ids. `transformers.AutoModelForCausalLM` loads OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import jax
from jax.sharding import SingleDeviceSharding

from ouroboros_jax import checkpoint as ckpt
from ouroboros_jax import paths
from ouroboros_jax.config import ConfigError, ExperimentConfig, ModelConfig, from_dict
from ouroboros_jax.models.hf import config_from_hf, export_hf_checkpoint
from ouroboros_jax.models.safetensors_io import CheckpointError
from ouroboros_jax.models.transformer import init_params
from ouroboros_jax.step import init_train_state
from ouroboros_jax.trainer import CONFIG_FILE, checkpoint_directory, optimizer_from_config, policy_objective


def export_with_tokenizer(params, model_config: ModelConfig, tokenizer,
                          directory: str | os.PathLike[str]) -> Path:
    """`params` as a Hugging Face checkpoint with `tokenizer` (a `models.Tokenizer`): the weights,
    config.json carrying the tokenizer's special token ids, and the tokenizer files; what the
    scripts with their own (character-level) tokenizer write for `--export_dir`. Every process
    calls it (the weights are gathered); process 0 writes."""
    out = export_hf_checkpoint(params, model_config, directory, extra_config=tokenizer.special_token_ids())
    if jax.process_index() == 0:
        tokenizer.save(out)
    return out


def run_model_config(cfg: ExperimentConfig) -> ModelConfig:
    """The architecture a run trained: its HF checkpoint's when `model.path` is set, else `cfg.model`."""
    if not cfg.model.path:
        return cfg.model
    hf_config = Path(cfg.model.path) / "config.json"
    if not hf_config.is_file():
        raise CheckpointError(f"model.path: {hf_config} not found (the run started from this checkpoint)")
    model_config, _ = config_from_hf(json.loads(hf_config.read_text()), path=cfg.model.path,
                                     dtype=cfg.model.dtype)
    return model_config


def export_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, step: int | None = None,
               dtype: str | None = None) -> Path:
    """Write the policy of a saved run (newest checkpoint, or `step`) as a Hugging Face checkpoint.

    Raises:
      ConfigError: RUN_DIR has no config.json, or it does not load.
      CheckpointError: the run saved no checkpoint (or not `step`).
    """
    saved = paths.as_path(run_dir) / CONFIG_FILE
    if not saved.exists():
        raise ConfigError(f"{saved}: not found; RUN_DIR must be the --logging.run_dir of a run")
    try:
        cfg = from_dict(ExperimentConfig, json.loads(saved.read_text()))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{saved}: not valid JSON ({err})") from None
    # The run may have been moved: its checkpoints are found relative to RUN_DIR.
    cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, run_dir=str(run_dir)))
    directory = checkpoint_directory(cfg) or paths.join(str(run_dir), "checkpoints")
    if not paths.as_path(directory).exists():
        raise CheckpointError(f"{directory}: no checkpoints in this run (train with --checkpoint.save_every)")
    model_config = run_model_config(cfg)
    optimizer = optimizer_from_config(cfg.optimizer, total_steps=max(cfg.train.steps, 1))
    objective = policy_objective(model_config, cfg.loss, max_completion_len=cfg.sampling.max_new_tokens)
    abstract = jax.eval_shape(
        lambda: init_train_state(init_params(model_config, jax.random.key(0)), optimizer,
                                 jax.random.key(cfg.seed), with_reference=objective.uses_reference))
    device = SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    checkpointer = ckpt.Checkpointer(directory, async_save=False)
    try:
        restored = (checkpointer.restore(step, abstract) if step is not None
                    else checkpointer.restore_latest(abstract))
    finally:
        checkpointer.close()
    if restored is None:
        raise CheckpointError(f"{directory}: no checkpoint to export")
    return export_hf_checkpoint(restored.state.params, model_config, out, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ouroboros_jax.export",
                                     description="Export a saved run's policy as a Hugging Face checkpoint.")
    parser.add_argument("run_dir", help="the run directory (--logging.run_dir of the run)")
    parser.add_argument("out", help="directory to write the Hugging Face checkpoint to")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="dtype of the written tensors (default: the model's)")
    args = parser.parse_args(argv)
    try:
        written = export_run(args.run_dir, args.out, step=args.step, dtype=args.dtype)
    except (ConfigError, CheckpointError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    print(f"export: wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
