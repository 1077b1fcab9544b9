"""Quickstart: a tiny model learns 2-digit addition on a CPU, then GRPO sharpens it.

    python experiments/quickstart.py                 # the embedded default, about 6 minutes on 2 idle cores
    python experiments/quickstart.py --help          # every field of the typed config
    python experiments/quickstart.py --train.steps 60 --seed 1

1. A character-level Qwen2-shaped model (~0.3M parameters) is trained from
   scratch on "What is 47 + 85?" -> "132" (operands of exactly two digits).
   The warm-start stops at a skill, not a step count: as soon as its greedy
   accuracy on training problems reaches 0.7 (checked every 50 steps), so
   every seed starts RL from a comparable model. Its samples are then still
   unreliable: sampled pass@1 around 0.4-0.55 but pass@16 above 0.9 on the
   held-out problems, i.e. the right answer is usually among its guesses.
2. GRPO against the math verifier (reward 1 for the right number), 300 steps
   of 32 prompts x 8 samples (4 AdamW updates of 64 rows each per step, no
   KL term), turns that pass@k into pass@1.
3. It writes the run directory (config.json, metrics.jsonl, TensorBoard events,
   PNG curves) and ends with one summary line:
   `quickstart: held-out accuracy before=0.xx after=0.yy (N steps, T s)`,
   where accuracy is the sampled pass@1 (temperature 1) on the same 200
   held-out problems before and after RL; pass@16 and greedy accuracy are
   printed beside it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax

import verifiers
from ouroboros_jax import paths
from ouroboros_jax.config import (
    LOSS_PRESETS,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    SamplingConfig,
    TrainConfig,
    VerifierConfig,
    WarmStartConfig,
    parse_cli,
)
from ouroboros_jax.data import arithmetic_source
from ouroboros_jax.evaluation import evaluate
from ouroboros_jax.export import export_with_tokenizer
from ouroboros_jax.metrics import MetricsLogger, plot_run
from ouroboros_jax.models import Tokenizer, init_sharded
from ouroboros_jax.plots import WARMSTART_DIR
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.supervised import supervised_warmstart
from ouroboros_jax.trainer import Task, prepare_run_dir, train, use_compilation_cache, verifier_spec

TOKENIZER = Tokenizer.char_level("0123456789+-*=? .Whatis")

DEFAULT = ExperimentConfig(
    name="quickstart",
    seed=0,
    model=ModelConfig(family="qwen2", vocab_size=TOKENIZER.vocab_size, d_model=128, n_layers=2, n_heads=4,
                      n_kv_heads=4, head_dim=32, d_ff=256, max_seq_len=64, tie_embeddings=True),
    sampling=SamplingConfig(group_size=8, max_new_tokens=5, temperature=1.0, prompt_len_buckets=(24,),
                            eval_num_samples=16),
    loss=dataclasses.replace(LOSS_PRESETS["grpo"], kl_coef=0.0),
    optimizer=OptimizerConfig(learning_rate=1e-4, b2=0.99, max_grad_norm=1.0),
    train=TrainConfig(steps=300, prompts_per_step=32, mini_batch_size=64, micro_batch_size=64,
                      eval_every=50, eval_size=200),
    data=DataConfig(source="arithmetic", digits=2, fixed_width=True),
    warmstart=WarmStartConfig(steps=1000, batch_size=64, learning_rate=1e-3, target_accuracy=0.7),
    verifier=VerifierConfig(names=("math_any",), weights=(1.0,), num_workers=1, timeout_s=10.0),
    logging=LoggingConfig(run_dir="runs/quickstart"),
    compilation_cache_dir="~/.cache/ouroboros_jax/xla",  # a second run skips most of the compiling
)


def encode(examples) -> list[list[int]]:
    return TOKENIZER.encode_batch([ex.prompt for ex in examples])


def decode(ids) -> str:
    return TOKENIZER.decode(list(ids))


def warm_start(cfg: ExperimentConfig, params, mesh, *, verbose: bool = True, log: bool = True):
    """Supervised warm-start on clean demonstrations until greedy accuracy on training problems
    reaches `cfg.warmstart.target_accuracy` (checked every `check_every` steps; 0: run all
    `cfg.warmstart.steps`). With `log`, each check goes to RUN_DIR/warmstart/metrics.jsonl
    (plotted as the warm-start panel)."""
    logger = MetricsLogger(paths.join(cfg.logging.run_dir, WARMSTART_DIR), console=False,
                           tensorboard=False) if log else None
    if logger is not None:
        logger.truncate_after(-1)  # a fresh warm-start: the checks of an earlier one are gone
    problems = dict(digits=cfg.data.digits, operations=cfg.data.operations, fixed_width=cfg.data.fixed_width)
    warm_source = arithmetic_source(seed=cfg.data.seed + 1, **problems)
    check = arithmetic_source(seed=cfg.data.seed + 2, **problems).take(128)  # training split, not held-out
    grade = verifiers.resolve(verifier_spec(cfg.verifier))
    eos = TOKENIZER.eos_id

    def skilled_enough(params, step: int) -> bool:
        """Greedy accuracy on training problems: stop the warm-start at the target skill."""
        scores = evaluate(params, cfg.model, check, encode(check), decode=decode, num_samples=8,
                          score=lambda texts, golds: [grade(t, g) for t, g in zip(texts, golds, strict=True)],
                          max_new_tokens=cfg.sampling.max_new_tokens, stop_token_ids=(eos,),
                          rng=jax.random.key(cfg.seed + step), mesh=mesh,
                          prompt_len_buckets=cfg.sampling.prompt_len_buckets)
        greedy, sampled = scores["eval/greedy_acc"], scores["eval/pass@1"]
        if logger is not None:
            logger.log(step, {"warmstart/greedy_acc": greedy, "warmstart/pass@1": sampled})
        if verbose:
            print(f"quickstart: warm-start step {step}: greedy {greedy:.2f} sampled {sampled:.2f}",
                  flush=True)
        return greedy >= cfg.warmstart.target_accuracy

    try:
        return supervised_warmstart(
            params, cfg.model, warm_source, encode=encode,
            answer_ids=lambda ex: TOKENIZER.encode(str(ex.gold["answer"])) + [eos],
            steps=cfg.warmstart.steps, batch_size=cfg.warmstart.batch_size,
            learning_rate=cfg.warmstart.learning_rate, seed=cfg.seed, mesh=mesh,
            until=skilled_enough if cfg.warmstart.target_accuracy > 0 else None,
            check_every=cfg.warmstart.check_every)
    finally:
        if logger is not None:
            logger.close()


def make_task(cfg: ExperimentConfig) -> Task:
    """The arithmetic task: training and held-out problems, and every named verifier with its weight."""
    problems = dict(digits=cfg.data.digits, operations=cfg.data.operations, fixed_width=cfg.data.fixed_width)
    train_source = arithmetic_source(seed=cfg.data.seed, **problems)
    heldout = arithmetic_source(seed=cfg.data.seed, heldout=True, **problems)
    return Task(train_source=train_source, encode=encode, decode=decode, verifier=verifier_spec(cfg.verifier),
                stop_token_ids=(TOKENIZER.eos_id,), eval_examples=heldout.take(cfg.train.eval_size),
                encode_completion=lambda text: TOKENIZER.encode(text) + [TOKENIZER.eos_id])


def export_policy(params, cfg: ExperimentConfig, directory: str) -> Path:
    """`--export_dir`: the policy as a Hugging Face checkpoint (weights, config.json with this
    tokenizer's special token ids, the tokenizer files). Every process calls it; process 0 writes."""
    return export_with_tokenizer(params, cfg.model, TOKENIZER, directory)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(DEFAULT, args=argv, description=__doc__)
    if cfg.train.eval_every <= 0 or cfg.train.eval_size <= 0:
        raise ConfigError("train.eval_every and train.eval_size must be > 0: the quickstart reports held-out "
                          "accuracy before and after RL")
    t_start = time.perf_counter()
    use_compilation_cache(cfg.compilation_cache_dir)  # before the warm-start compiles anything
    mesh = make_mesh(cfg.mesh)
    params = init_sharded(cfg.model, jax.random.key(cfg.seed), mesh)
    task = make_task(cfg)

    size = f"quickstart: {cfg.model.num_params():,} parameters"
    if prepare_run_dir(cfg):  # a checkpoint to resume from: the warm-started weights are in it
        print(f"{size}; the warm-start is skipped (resuming)")
    else:
        print(f"{size}, warm-start up to {cfg.warmstart.steps} steps")
        params = warm_start(cfg, params, mesh)

    result = train(cfg, model_config=cfg.model, params=params, task=task, mesh=mesh)
    if cfg.export_dir:  # weights, config.json and this script's character-level tokenizer
        export_policy(result.state.params, cfg, cfg.export_dir)
    before, after = result.evals[0], result.evals[-1]
    k = cfg.sampling.eval_num_samples
    plot_run(result.run_dir)
    print(f"quickstart: pass@{k} before={before[f'eval/pass@{k}']:.2f} after={after[f'eval/pass@{k}']:.2f}; "
          f"greedy before={before['eval/greedy_acc']:.2f} after={after['eval/greedy_acc']:.2f}; "
          f"curves in {result.run_dir}")
    elapsed = time.perf_counter() - t_start
    steps = result.resumed_from + len(result.history)  # < train.steps when train.time_limit_s ends it
    print(f"quickstart: held-out accuracy before={before['eval/pass@1']:.2f} "
          f"after={after['eval/pass@1']:.2f} ({steps} steps, {elapsed:.0f} s)")


if __name__ == "__main__":
    main()
