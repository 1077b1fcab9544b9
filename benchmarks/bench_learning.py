"""Learning efficiency on the quickstart task: ours vs TRL's GRPOTrainer, same algorithm, same start.

The task is experiments/quickstart.py's: "What is a + b?" with 2-digit
operands, a character-level tokenizer, a ~0.3M-parameter Qwen2-shaped model,
reward 1 for the right number (the `math_any` verifier). The model is
warm-started here on clean demonstrations by the quickstart's own warm-start
(until greedy accuracy 0.7 on training problems), then exported once as a
Hugging Face checkpoint with a matching tokenizer (the same ids for every
prompt, checked) and trained from those same weights by both libraries
with the same algorithm settings:

  the quickstart's 32 prompts x 8 completions per step, at most 5 new tokens,
  temperature 1; group-normalised advantages, PPO-clip 0.2, per-sequence
  token-mean loss, no KL; the 256 rows shuffled into 4 mini-batches of 64
  (train.mini_batch_size, read from the quickstart's config), one AdamW step each
  (learning rate 1e-4, beta2 0.99, constant), gradient clip 1.0; the old
  policy of the ratio is the sampling policy (ours: the sampler's log-probs;
  TRL: its extra forward pass, as `steps_per_generation` > 1 asks).

Ours runs the quickstart's own loop (`trainer.train`, verifier pool with one
worker process); TRL runs `GRPOTrainer.train` in a separate process with the
verifier called in-process as its reward function, on the same prompts in
the same order (torch's OpenMP threads wait passively, as in run_cpu.py: see
peers.worker_env). Both final policies are then evaluated by the same evaluator
(ours) on the same held-out problems: sampled pass@1 at temperature 1 over 16
samples, and greedy accuracy.

    python benchmarks/bench_learning.py               # 30 steps each, a few minutes on 2 cores
    python benchmarks/bench_learning.py --steps 60 --seed 1
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import load_average, machine, package_versions, print_table  # noqa: E402
from peers import worker_env  # noqa: E402

SPECIALS = ("<pad>", "<bos>", "<eos>")


def problems(cfg) -> dict:
    """The arithmetic problems of the quickstart's data config (as quickstart.main builds them)."""
    return dict(digits=cfg.data.digits, operations=cfg.data.operations, fixed_width=cfg.data.fixed_width)


def quickstart():
    """experiments/quickstart.py as a module (loaded by path: experiments/ has its own common.py)."""
    if "quickstart" not in sys.modules:
        path = HERE.parent / "experiments" / "quickstart.py"
        spec = importlib.util.spec_from_file_location("quickstart", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["quickstart"] = module
        spec.loader.exec_module(module)
    return sys.modules["quickstart"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="RL steps (rollout + 4 updates) per library")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmstart-steps", type=int, default=None,
                   help="a fixed number of warm-start steps (default: the quickstart's rule, "
                        "until its greedy accuracy target on training problems)")
    p.add_argument("--eval-size", type=int, default=200, help="held-out problems")
    p.add_argument("--libraries", default="ours,trl", help="ours, trl, or both (comma-separated)")
    p.add_argument("--compilation-cache", default=None,
                   help="XLA's persistent compilation cache directory ('' turns it off; default: the "
                        "quickstart's, ~/.cache/ouroboros_jax/xla). A second run loads our compiled programs")
    p.add_argument("--work-dir", default="", help="keep checkpoints and runs here (default: a temp dir)")
    p.add_argument("--trl-run", default="", help=argparse.SUPPRESS)  # internal: the TRL child process
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be >= 1")
    return a


# ---------------------------------------------------------------------------
# The shared start: warm-started weights and a Hugging Face tokenizer


def hf_char_tokenizer(tokenizer, texts):
    """A `transformers` tokenizer with the char tokenizer's ids, checked on `texts`."""
    import transformers
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    vocab = {}
    for i in range(tokenizer.vocab_size):
        text = tokenizer.decode([i], skip_special_tokens=False)
        vocab[text] = i
    rust = RustTokenizer(models.WordLevel(vocab, unk_token=SPECIALS[0]))
    rust.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    rust.decoder = decoders.Fuse()
    rust.add_special_tokens(list(SPECIALS))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=rust, pad_token=SPECIALS[0],
                                              bos_token=SPECIALS[1], eos_token=SPECIALS[2])
    for text in texts:
        ours, theirs = tokenizer.encode(text), hf(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            raise RuntimeError(f"tokenizers disagree on {text!r}: {ours} vs {theirs}")
    if hf.eos_token_id != tokenizer.eos_id or hf.pad_token_id != tokenizer.pad_id:
        raise RuntimeError("tokenizers disagree on the eos / pad ids")
    return hf


def warm_start(cfg, mesh, steps: int | None):
    """The quickstart's warm-start (until its greedy-accuracy target), or exactly `steps` steps."""
    import jax

    from ouroboros_jax.models import init_sharded

    if steps is not None:
        cfg = dataclasses.replace(cfg, warmstart=dataclasses.replace(cfg.warmstart, steps=steps,
                                                                     target_accuracy=0.0))
    params = init_sharded(cfg.model, jax.random.key(cfg.seed), mesh)
    return quickstart().warm_start(cfg, params, mesh, verbose=False)


def evaluate_policy(params, cfg, examples, pool, mesh, seed: int) -> dict[str, float]:
    import jax

    from ouroboros_jax.evaluation import evaluate

    qs = quickstart()
    TOKENIZER, decode, encode = qs.TOKENIZER, qs.decode, qs.encode

    k = cfg.sampling.eval_num_samples
    return evaluate(params, cfg.model, examples, encode(examples), decode=decode, score=pool.score,
                    num_samples=k, max_new_tokens=cfg.sampling.max_new_tokens,
                    stop_token_ids=(TOKENIZER.eos_id,), rng=jax.random.key(seed + 1), temperature=1.0,
                    ks=(1, k), mesh=mesh, prompt_len_buckets=cfg.sampling.prompt_len_buckets)


# ---------------------------------------------------------------------------
# Ours: the quickstart's loop


def run_ours(cfg, params, run_dir: Path, mesh) -> dict:

    from ouroboros_jax.data import arithmetic_source
    from ouroboros_jax.metrics import MetricsLogger
    from ouroboros_jax.trainer import Task, train

    qs = quickstart()
    TOKENIZER, decode, encode = qs.TOKENIZER, qs.decode, qs.encode

    cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, run_dir=str(run_dir)))
    task = Task(train_source=arithmetic_source(seed=cfg.data.seed, **problems(cfg)), encode=encode,
                decode=decode, verifier=cfg.verifier.names[0], stop_token_ids=(TOKENIZER.eos_id,))
    t0 = time.perf_counter()
    result = train(cfg, model_config=cfg.model, params=params, task=task, mesh=mesh,
                   logger=MetricsLogger(run_dir, console=False, tensorboard=False))
    wall = time.perf_counter() - t0
    return {"params": result.state.params, "wall_s": wall,
            "rewards": [h["reward/mean"] for h in result.history],
            "step_s": [h["time/step"] for h in result.history]}


# ---------------------------------------------------------------------------
# TRL: GRPOTrainer on the same checkpoint (a child process: torch stays out of this one)


def trl_child(spec: dict) -> None:
    import datasets
    import torch
    import transformers
    import trl

    import verifiers
    from ouroboros_jax.data import arithmetic_source

    TOKENIZER = quickstart().TOKENIZER

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(spec["seed"])
    steps, prompts_per_step, group = spec["steps"], spec["prompts_per_step"], spec["group"]
    examples = arithmetic_source(seed=spec["data_seed"], **spec["problems"]).take(steps * prompts_per_step)
    data = datasets.Dataset.from_dict({"prompt": [ex.prompt for ex in examples],
                                       "answer": [str(ex.gold["answer"]) for ex in examples]})
    tokenizer = hf_char_tokenizer(TOKENIZER, data["prompt"])
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.float32)
    verify = verifiers.get(spec["verifier"])

    def correctness(completions, answer, **_):
        return [float(verifiers.run_verifier(verify, c, {"answer": a}).score)
                for c, a in zip(completions, answer, strict=True)]

    rows_per_update = spec["rows_per_update"]
    updates_per_step = prompts_per_step * group // rows_per_update
    args = trl.GRPOConfig(
        output_dir=spec["output"], per_device_train_batch_size=rows_per_update, gradient_accumulation_steps=1,
        steps_per_generation=updates_per_step, num_generations=group,
        max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        loss_type="grpo", scale_rewards="group", beta=0.0, epsilon=spec["clip"],
        learning_rate=spec["learning_rate"], adam_beta1=spec["b1"], adam_beta2=spec["b2"],
        adam_epsilon=spec["eps"], weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=spec["max_grad_norm"], max_steps=steps * updates_per_step, shuffle_dataset=False,
        use_cpu=True, bf16=False, report_to=[], logging_steps=updates_per_step, save_strategy="no",
        disable_dropout=True, gradient_checkpointing=False, seed=spec["seed"],
    )
    ends: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % updates_per_step == 0:
                ends.append(time.perf_counter())

    trainer = trl.GRPOTrainer(model=model, args=args, processing_class=tokenizer, reward_funcs=correctness,
                              train_dataset=data, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    trainer.model.save_pretrained(spec["final"], safe_serialization=True)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    step_s = [b - a for a, b in zip([t0, *ends[:-1]], ends, strict=True)]
    Path(spec["result"]).write_text(json.dumps({"wall_s": wall, "rewards": rewards, "step_s": step_s}))


def run_trl(cfg, checkpoint: Path, root: Path, steps: int) -> dict:
    o = cfg.optimizer
    spec = {"seed": cfg.seed, "data_seed": cfg.data.seed, "problems": problems(cfg), "steps": steps,
            "prompts_per_step": cfg.train.prompts_per_step, "group": cfg.sampling.group_size,
            "rows_per_update": cfg.train.mini_batch_size, "max_new_tokens": cfg.sampling.max_new_tokens,
            "clip": cfg.loss.clip_low,
            "learning_rate": o.learning_rate, "b1": o.b1, "b2": o.b2, "eps": o.eps,
            "max_grad_norm": o.max_grad_norm, "verifier": cfg.verifier.names[0],
            "checkpoint": str(checkpoint), "output": str(root / "trl_out"), "final": str(root / "trl_final"),
            "result": str(root / "trl_result.json")}
    log = root / "trl.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--trl-run", json.dumps(spec)], stdout=f,
                              stderr=subprocess.STDOUT, env={**os.environ, **worker_env("trl")})
    if proc.returncode:
        raise RuntimeError(f"the TRL run failed (exit code {proc.returncode}):\n{log.read_text()[-3000:]}")
    return json.loads(Path(spec["result"]).read_text())


# ---------------------------------------------------------------------------


def check_settings(cfg) -> None:
    """The TRL translation above assumes the quickstart's algorithm; say so if it changed."""
    loss, t = cfg.loss, cfg.train
    expected = {
        "loss.variant": (loss.variant, "ppo_clip"),
        "loss.aggregation": (loss.aggregation, "seq_mean_token_mean"),
        "loss.kl_coef": (loss.kl_coef, 0.0),
        "loss.advantage": (loss.advantage, "grpo"),
        "loss.clip_high": (loss.clip_high, loss.clip_low),
        "loss.dynamic_sampling": (loss.dynamic_sampling, False),
        "loss.overlong": (loss.overlong, "none"),
        "train.inner_epochs": (t.inner_epochs, 1),
        "train.micro_batch_size": (t.micro_batch_size, t.mini_batch_size),
        "optimizer.schedule": (cfg.optimizer.schedule, "constant"),
        "optimizer.warmup_steps": (cfg.optimizer.warmup_steps, 0),
        "optimizer.weight_decay": (cfg.optimizer.weight_decay, 0.0),
    }
    for name, (have, want) in expected.items():
        if have != want:
            raise SystemExit(f"bench_learning: the quickstart's {name} is {have!r}; this comparison maps "
                             f"{want!r} onto TRL")


def summary(name: str, run: dict, evals: dict, k: int, tail: int = 5) -> dict:
    r = run["rewards"]
    later = run["step_s"][1:] or run["step_s"]
    return {"library": name, "steps": len(r), "reward first": r[0], f"reward last {tail}": sum(r[-tail:]) /
            len(r[-tail:]), "held-out pass@1": evals["eval/pass@1"], f"pass@{k}": evals[f"eval/pass@{k}"],
            "greedy": evals["eval/greedy_acc"], "wall s": run["wall_s"],
            "step s (after 1st)": sum(later) / len(later)}


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    if a.trl_run:
        trl_child(json.loads(a.trl_run))
        return []
    import jax

    from ouroboros_jax.data import arithmetic_source
    from ouroboros_jax.models import export_hf_checkpoint, load_hf_checkpoint
    from ouroboros_jax.sharding import make_mesh
    from verifiers import VerifierPool

    DEFAULT = quickstart().DEFAULT

    libraries = [x.strip() for x in a.libraries.split(",") if x.strip()]
    if not set(libraries) <= {"ours", "trl"}:
        raise SystemExit(f"--libraries: choose from ours, trl (got {libraries})")
    cfg = dataclasses.replace(DEFAULT, seed=a.seed,
                              train=dataclasses.replace(DEFAULT.train, steps=a.steps, eval_every=0))
    check_settings(cfg)
    from ouroboros_jax.trainer import use_compilation_cache

    cache = use_compilation_cache(a.compilation_cache if a.compilation_cache is not None
                                  else cfg.compilation_cache_dir)
    cfg = dataclasses.replace(cfg, compilation_cache_dir=str(cache or ""))
    warm_steps = a.warmstart_steps
    print(f"machine: {machine()}; load average {' '.join(f'{x:.2f}' for x in load_average())}")
    entries = len(list(cache.iterdir())) if cache else 0
    print(f"compilation cache: {cache or 'off'}" + (f" ({entries} entries before this run: "
          f"{'warm' if entries else 'cold'})" if cache else ""))
    print(", ".join(f"{k} {v}" for k, v in package_versions(("jax", "torch", "transformers", "trl")).items()
                    if v))
    warm = (f"{warm_steps} steps" if warm_steps is not None
            else f"until greedy {cfg.warmstart.target_accuracy} on training problems")
    print(f"quickstart task: {cfg.model.num_params():,} parameters, warm-start {warm}, "
          f"{a.steps} RL steps of {cfg.train.prompts_per_step} prompts x {cfg.sampling.group_size}",
          flush=True)
    mesh = make_mesh(cfg.mesh)
    k = cfg.sampling.eval_num_samples
    heldout = arithmetic_source(seed=cfg.data.seed, heldout=True, **problems(cfg)).take(a.eval_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, VerifierPool(cfg.verifier.names[0], workers=1) as pool:
        root = Path(a.work_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        params = warm_start(cfg, mesh, warm_steps)
        checkpoint = export_hf_checkpoint(params, cfg.model, root / "warm")
        print(f"warm-start: {time.perf_counter() - t0:.0f} s", flush=True)
        _, params = load_hf_checkpoint(checkpoint)  # both libraries start from the exported weights
        before = evaluate_policy(params, cfg, heldout, pool, mesh, a.seed)
        rows.append({"library": "warm start", "steps": 0, "held-out pass@1": before["eval/pass@1"],
                     f"pass@{k}": before[f"eval/pass@{k}"], "greedy": before["eval/greedy_acc"]})
        if "ours" in libraries:
            run = run_ours(cfg, params, root / "ours_run", mesh)
            after = evaluate_policy(run["params"], cfg, heldout, pool, mesh, a.seed)
            rows.append(summary("ouroboros-jax", run, after, k))
            print(f"ours: {run['wall_s']:.0f} s", flush=True)
        if "trl" in libraries:
            run = run_trl(cfg, checkpoint, root, a.steps)
            _, trl_params = load_hf_checkpoint(root / "trl_final")
            trl_params = jax.device_put(trl_params)
            after = evaluate_policy(trl_params, cfg, heldout, pool, mesh, a.seed)
            rows.append(summary("trl GRPOTrainer", run, after, k))
            print(f"trl: {run['wall_s']:.0f} s", flush=True)
    columns = ["library", "steps", "reward first", "reward last 5", "held-out pass@1", f"pass@{k}", "greedy",
               "wall s", "step s (after 1st)"]
    fmt = {"reward first": ".3f", "reward last 5": ".3f", "held-out pass@1": ".3f", f"pass@{k}": ".3f",
           "greedy": ".3f", "wall s": ".1f", "step s (after 1st)": ".2f"}
    print_table(rows, columns, floatfmt=fmt,
                title=f"learning efficiency, quickstart task, {a.steps} RL steps from the same start; "
                      f"load average {load_average()[0]:.1f}")
    return rows


if __name__ == "__main__":
    main()
