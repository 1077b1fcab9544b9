"""The human-led loop at tiny scale: people's preferences train a reward model that GRPO optimises.

    python experiments/human_loop.py                        # CPU, a few minutes
    python experiments/human_loop.py --train.steps 30 --seed 1

1. A character-level policy gets a short supervised warm-start on 1-digit
   addition ("What is 3 + 4?" -> "7"): it is right part of the time.
2. A rating server (`rate.RatingServer`, 127.0.0.1, token) serves the run's
   queue (RUN_DIR/ratings.sqlite). A simulated rater drives the same HTTP API
   as the page (`rate.RatingClient`): of two completions it prefers the one
   nearer the gold answer (a right answer over a wrong one, a number over
   text), and with probability `--noise` picks the other.
3. GRPO trains the policy on `rewards.HumanPreferenceReward` alone (the
   verifier only reports accuracy): each step it queues the pairs its reward
   model separates least, waits for the rater (a minimum count, a timeout, and
   a console line saying how many it waits for), retrains the Bradley-Terry
   reward model on every pair so far and reloads it before scoring the samples.
4. Held-out pass@1 (exact match on prompts never trained on) is measured
   before and during training.

With `--export_dir DIR` the trained policy is written to DIR as a Hugging Face
checkpoint (safetensors, config.json, this script's character-level tokenizer)
that `transformers.AutoModelForCausalLM` loads; load the tokenizer with
`transformers.PreTrainedTokenizerFast.from_pretrained(DIR)` (`AutoTokenizer` gives
every qwen2 model the Qwen2 BPE pre-tokenizer instead of the file's one-character split).

It ends with
`human_loop: ratings=N pairs=P retrainings=R heldout_accuracy first=0.xx last=0.yy`.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import threading
import time
from pathlib import Path

import jax

from ouroboros_jax.config import (
    LOSS_PRESETS,
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
from ouroboros_jax.export import export_with_tokenizer
from ouroboros_jax.metrics import MetricsLogger
from ouroboros_jax.models import Tokenizer, init_sharded
from ouroboros_jax.rate import Item, RatingClient, RatingServer, RatingStore, run_rater
from ouroboros_jax.rewards import HumanPreferenceReward
from ouroboros_jax.selfplay.reward_model import init_reward_model
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.supervised import supervised_warmstart
from ouroboros_jax.trainer import Task, train
from verifiers import Verdict

TOKENIZER = Tokenizer.char_level("0123456789+-*=? .Whatis")
DIGITS = 1

DEFAULT = ExperimentConfig(
    name="human_loop",
    seed=0,
    model=ModelConfig(family="qwen2", vocab_size=TOKENIZER.vocab_size, d_model=64, n_layers=2, n_heads=4,
                      n_kv_heads=4, head_dim=16, d_ff=128, max_seq_len=32, tie_embeddings=True),
    sampling=SamplingConfig(group_size=8, max_new_tokens=4, temperature=1.0, prompt_len_buckets=(16,),
                            eval_num_samples=1),
    loss=dataclasses.replace(LOSS_PRESETS["grpo"], advantage="dr_grpo", kl_coef=0.1),
    optimizer=OptimizerConfig(learning_rate=2e-4, b2=0.99, max_grad_norm=1.0),
    train=TrainConfig(steps=20, prompts_per_step=8, mini_batch_size=64, micro_batch_size=64, eval_every=5,
                      eval_size=100),
    data=DataConfig(source="arithmetic"),
    warmstart=WarmStartConfig(steps=100, batch_size=64, learning_rate=1e-3),
    verifier=VerifierConfig(names=("human_loop:exact_answer",), weights=(1.0,), num_workers=1,
                            timeout_s=10.0),
    logging=LoggingConfig(run_dir="runs/human_loop", console=False, tensorboard=False),
)
NOISE = 0.1  # the simulated rater's chance of picking the other completion
PAIRS_PER_STEP, MIN_RATINGS, WAIT_S = 64, 32, 20.0
RM_STEPS, RM_BATCH, RM_LR = 100, 32, 2e-3


def exact_answer(completion: str, example) -> Verdict:
    ok = completion == str(example["answer"])
    return Verdict(float(ok), ok, extracted=completion)


def encode(examples) -> list[list[int]]:
    return TOKENIZER.encode_batch([ex.prompt for ex in examples])


def decode(ids) -> str:
    return TOKENIZER.decode(list(ids))


def distance(completion: str, answer: int) -> float:
    """How far a completion is from the gold answer (text that is not a number: farthest)."""
    return abs(int(completion) - answer) if completion.isdigit() else float("inf")


def simulated_rater(noise: float, seed: int):
    """A person as a function of the gold label: prefers the completion nearer the answer; errs at `noise`."""
    rng = random.Random(seed)

    def decide(item: Item) -> dict:
        answer = int(item.metadata["answer"])
        d = [distance(c, answer) for c in item.completions]
        if d[0] == d[1]:
            return {"skip": True}
        best = min(range(len(d)), key=d.__getitem__)
        return {"choice": best if rng.random() >= noise else 1 - best}

    return decide


def start_rater(server: RatingServer, decide, stop: threading.Event) -> threading.Thread:
    client = RatingClient(server.url, server.token)

    def loop():
        while not stop.is_set():
            if run_rater(client, "simulated", decide) == 0:
                stop.wait(0.1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def export_policy(params, cfg: ExperimentConfig, directory: str | Path) -> Path:
    """A policy as a Hugging Face checkpoint: weights, config.json (with this tokenizer's special
    token ids) and the tokenizer files. Every process calls it; process 0 writes."""
    return export_with_tokenizer(params, cfg.model, TOKENIZER, directory)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    noise = NOISE
    if "--noise" in argv:
        i = argv.index("--noise")
        noise = float(argv[i + 1])
        del argv[i:i + 2]
    cfg = parse_cli(DEFAULT, args=argv, description=__doc__)
    started = time.perf_counter()
    mesh = make_mesh(cfg.mesh)
    eos = TOKENIZER.eos_id
    policy = supervised_warmstart(
        init_sharded(cfg.model, jax.random.key(cfg.seed), mesh), cfg.model,
        arithmetic_source(seed=cfg.data.seed + 1, digits=DIGITS), encode=encode,
        answer_ids=lambda ex: TOKENIZER.encode(str(ex.gold["answer"])) + [eos],
        steps=cfg.warmstart.steps, batch_size=cfg.warmstart.batch_size,
        learning_rate=cfg.warmstart.learning_rate, seed=cfg.seed, mesh=mesh)
    Path(cfg.logging.run_dir).mkdir(parents=True, exist_ok=True)
    store = RatingStore.in_run_dir(cfg.logging.run_dir)
    reward = HumanPreferenceReward(
        store, init_reward_model(policy, jax.random.key(cfg.seed + 100)), cfg.model,
        encode_prompt=TOKENIZER.encode, encode_response=lambda text: TOKENIZER.encode(text) + [eos],
        prompt_text=lambda ex: ex.prompt, pairs_per_step=PAIRS_PER_STEP, min_count=MIN_RATINGS,
        timeout_s=WAIT_S, train_steps=RM_STEPS, batch_size=RM_BATCH, learning_rate=RM_LR, mesh=mesh,
        metadata_of=lambda ex: {"answer": str(ex.gold["answer"])})
    heldout = arithmetic_source(seed=cfg.data.seed + 2, digits=DIGITS).take(cfg.train.eval_size)
    task = Task(train_source=arithmetic_source(seed=cfg.data.seed, digits=DIGITS), encode=encode,
                decode=decode, verifier=exact_answer, stop_token_ids=(eos,), eval_examples=heldout,
                reward_model=reward, reward_model_weight=1.0, verifier_weight=0.0)
    stop = threading.Event()
    with RatingServer(store, port=0, quiet=True) as server:
        print(f"rating page: {server.page_url}", flush=True)
        rater = start_rater(server, simulated_rater(noise, cfg.seed), stop)
        try:
            out = train(cfg, model_config=cfg.model, params=policy, task=task, mesh=mesh,
                        logger=MetricsLogger.from_config(cfg.logging))
        finally:
            stop.set()
            rater.join(10)
    if cfg.export_dir:
        export_policy(out.state.params, cfg, cfg.export_dir)
    counts = store.counts().to_json()
    accuracy = [e["eval/pass@1"] for e in out.evals]
    print(f"held-out pass@1 per eval: {' '.join(f'{a:.2f}' for a in accuracy)}; "
          f"sample accuracy first {out.history[0]['accuracy']:.2f} last {out.history[-1]['accuracy']:.2f}")
    print(f"wall time {time.perf_counter() - started:.0f} s; queue {counts}")
    result = {"ratings": store.count_ratings()[0], "pairs": reward.num_pairs,
              "retrainings": reward.retrainings, "first": accuracy[0], "last": accuracy[-1]}
    print(f"human_loop: ratings={result['ratings']} pairs={result['pairs']} "
          f"retrainings={result['retrainings']} heldout_accuracy first={result['first']:.2f} "
          f"last={result['last']:.2f}")
    return result


if __name__ == "__main__":
    main()
