"""Self-Rewarding iterations on a task where judging is learnable and checkable, two arms, one budget.

    python experiments/self_rewarding.py                 # both arms, one seed
    python experiments/self_rewarding.py --help          # every field of the typed config

The task is addition, "47+8=" -> "55". Its judging task is "47+8=55?" ->
"47=1": the judge subtracts (55 - 8 = 47), then says right (1) when that gives
back the first number, wrong (0) otherwise. So a model's judgement can be
checked against gold labels, and judging is a skill of its own (subtraction),
not the answer written out. The gold verifier (does the answer equal the sum?) grades the held-out
set and labels the judging set; the self-judged arm never sees it.

1. A character-level Qwen2-shaped model is trained from scratch, first on
   labelled judgements alone (right sums and near misses: the paper's EFT
   data), then on a mix of judgements and answers (gold sums) until its greedy
   accuracy on training prompts reaches `warmstart.target_accuracy` (or the
   step budget).
2. From that one warm start, two arms run the same number of Self-Rewarding
   iterations with the same sampling and DPO budget
   (`selfplay.self_rewarding.run_self_rewarding`):
   - self: M_t judges its own N candidates with the judging prompt (greedy),
     best vs worst form DPO pairs (ties dropped), DPO against M_t;
   - grounded: the same loop with the verifier as judge.
3. Each iteration reports held-out greedy accuracy (prompts never trained on)
   and the model's agreement with gold labels on a held-out judging set (in
   the grounded arm too: there the model is not the judge, but it is still
   measured as one). `<run_dir>/self_rewarding.png` draws both; the script
   ends with one line per arm:
   `self_rewarding: <arm> iterations=N accuracy first=0.xx last=0.yy judge_agreement first=0.xx last=0.yy`.
4. With `--export_dir DIR`, each arm's last model is written to DIR/<arm> as a Hugging
   Face checkpoint (safetensors, config.json, this script's character-level tokenizer)
   that `transformers.AutoModelForCausalLM` loads; load the tokenizer with
   `transformers.PreTrainedTokenizerFast.from_pretrained(DIR/<arm>)` (`AutoTokenizer` gives
   every qwen2 model the Qwen2 BPE pre-tokenizer instead of the file's one-character split).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import tyro

from ouroboros_jax.config import MeshConfig, ModelConfig, WarmStartConfig
from ouroboros_jax.data import Example
from ouroboros_jax.export import export_with_tokenizer
from ouroboros_jax.models import Tokenizer, init_sharded
from ouroboros_jax.rewards.judge import Judge, JudgeScores
from ouroboros_jax.sampling import generate
from ouroboros_jax.selfplay.reports import plot_arms
from ouroboros_jax.selfplay.self_rewarding import (
    JudgeLabels,
    SelfRewardingSettings,
    run_self_rewarding,
    self_judge,
)
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.supervised import supervised_warmstart

TOKENIZER = Tokenizer.char_level("0123456789+-=?")
EOS = TOKENIZER.eos_id
BUCKETS = (16,)
PROBLEMS = [(a, b) for a in range(10, 100) for b in range(10)]
_SUM = re.compile(r"^(\d+)\+(\d+)=$")


def gold_answer(prompt: str) -> str:
    m = _SUM.match(prompt)
    if m is None:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    return str(int(m[1]) + int(m[2]))


def near_miss(answer: str, rng: random.Random) -> str:
    """A wrong answer close to the right one (off by one or ten, or two digits swapped)."""
    n = int(answer)
    options = {str(n + d) for d in (-10, -1, 1, 10) if n + d >= 0}
    if len(answer) > 1 and answer[::-1] != answer:
        options.add(str(int(answer[::-1])))
    return rng.choice(sorted(options))


def judge_prompt(prompt: str, response: str) -> str:
    return f"{prompt}{response}?"


def judge_verdict(prompt: str, response: str) -> str:
    """The gold judgement: "c-b=d" then 1 when d equals a (c is right), else 0.

    The judge checks a sum by subtracting, a different skill from adding: training
    it does not teach the answers.
    """
    m = _SUM.match(prompt)
    a, b = int(m[1]), int(m[2])
    back = int(response) - b
    return f"{back}={int(back == a)}"


def split(seed: int, heldout: int, labelled: int) -> tuple[list[str], list[str], list[str]]:
    """Disjoint prompt sets: training, held-out accuracy, held-out judging."""
    prompts = [f"{a}+{b}=" for a, b in PROBLEMS]
    random.Random(seed).shuffle(prompts)
    return prompts[heldout + labelled:], prompts[:heldout], prompts[heldout:heldout + labelled]


def judging_labels(prompts: Sequence[str], seed: int) -> JudgeLabels:
    """Half the prompts with their right answer (label True), half with a near miss (False)."""
    rng = random.Random(seed)
    responses, labels = [], []
    for k, p in enumerate(prompts):
        right = k % 2 == 0
        responses.append(gold_answer(p) if right else near_miss(gold_answer(p), rng))
        labels.append(right)
    return JudgeLabels(list(prompts), responses, labels)


class WarmStartMix:
    """Answers and labelled judgements of the training prompts, mixed, drawn forever (`take(n)`)."""

    def __init__(self, prompts: Sequence[str], judge_fraction: float, seed: int):
        self.prompts, self.judge_fraction, self.rng = list(prompts), judge_fraction, random.Random(seed)

    def take(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            p = self.rng.choice(self.prompts)
            if self.rng.random() < self.judge_fraction:
                right = self.rng.random() < 0.5
                shown = gold_answer(p) if right else near_miss(gold_answer(p), self.rng)
                verdict = judge_verdict(p, shown)
                out.append(Example(id="", prompt=judge_prompt(p, shown), gold={"answer": verdict}))
            else:
                out.append(Example(id="", prompt=p, gold={"answer": gold_answer(p)}))
        return out


def greedy_answers(params, cfg: ModelConfig, prompts: Sequence[str], mesh) -> list[str]:
    out = generate(params, cfg, TOKENIZER.encode_batch(list(prompts)), max_new_tokens=6, temperature=0.0,
                   stop_token_ids=(EOS,), rng=jax.random.key(0), mesh=mesh, prompt_len_buckets=BUCKETS)
    return [TOKENIZER.decode([int(t) for t in row[:n] if t != EOS]) for row, n in zip(out.tokens, out.lengths,
                                                                                       strict=True)]


def accuracy(params, cfg: ModelConfig, prompts: Sequence[str], mesh) -> float:
    answers = greedy_answers(params, cfg, prompts, mesh)
    return float(np.mean([a == gold_answer(p) for a, p in zip(answers, prompts, strict=True)]))


def verifier_scorer(params, prompts: Sequence[str], responses: Sequence[str], rng) -> JudgeScores:
    """The grounded judge: the gold verifier, 1 for a right sum, 0 otherwise."""
    s = np.array([float(r == gold_answer(p)) for p, r in zip(prompts, responses, strict=True)])
    return JudgeScores(s, np.ones(len(s), bool), list(responses), [[] for _ in s])


@dataclass(frozen=True)
class SelfRewardingExperiment:
    """The experiment: model, warm-start, and the Self-Rewarding iterations both arms run."""

    seed: int = 0
    run_dir: str = "runs/self_rewarding"
    # Write each arm's last model to EXPORT_DIR/<arm> as a Hugging Face checkpoint; "" writes none.
    export_dir: str = ""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        family="qwen2", vocab_size=TOKENIZER.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
        head_dim=16, d_ff=256, max_seq_len=16, tie_embeddings=True))
    warmstart: WarmStartConfig = field(default_factory=lambda: WarmStartConfig(
        steps=2000, batch_size=64, learning_rate=3e-3, target_accuracy=0.6))
    # Judge-only warm-start steps first (labelled judgements alone), then the mixed warm-start.
    judge_steps: int = 800
    # Fraction of mixed warm-start rows that are labelled judgements (EFT data).
    judge_fraction: float = 0.8
    iterations: int = 3
    prompts_per_iteration: int = 500
    heldout: int = 200
    labelled: int = 200
    iteration: SelfRewardingSettings = field(default_factory=lambda: SelfRewardingSettings(
        num_candidates=4, temperature=1.0, max_new_tokens=4, steps=10, batch_size=32, learning_rate=1e-4,
        beta=0.1, judge_threshold=0.5))


def export_policy(params, model_config: ModelConfig, directory: str | Path) -> Path:
    """A model as a Hugging Face checkpoint: weights, config.json (with this tokenizer's special
    token ids) and the tokenizer files. Every process calls it; process 0 writes."""
    return export_with_tokenizer(params, model_config, TOKENIZER, directory)


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict[str, float]]]:
    cfg = tyro.cli(SelfRewardingExperiment, default=SelfRewardingExperiment(), description=__doc__,
                   use_underscores=True, config=(tyro.conf.FlagConversionOff,), args=argv)
    started = time.perf_counter()
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    train, heldout, labelled = split(cfg.seed, cfg.heldout, cfg.labelled)
    labels = judging_labels(labelled, cfg.seed)
    params = init_sharded(cfg.model, jax.random.key(cfg.seed), mesh)
    probe = train[:100]
    ws = cfg.warmstart
    common = dict(encode=lambda exs: TOKENIZER.encode_batch([e.prompt for e in exs]),
                  answer_ids=lambda e: TOKENIZER.encode(e.gold["answer"]) + [EOS], batch_size=ws.batch_size,
                  learning_rate=ws.learning_rate, seed=cfg.seed, mesh=mesh, length=16)
    params = supervised_warmstart(params, cfg.model, WarmStartMix(train, 1.0, cfg.seed + 1),
                                  steps=cfg.judge_steps, **common)
    params = supervised_warmstart(
        params, cfg.model, WarmStartMix(train, cfg.judge_fraction, cfg.seed), steps=ws.steps,
        until=(lambda p, step: accuracy(p, cfg.model, probe, mesh) >= ws.target_accuracy)
        if ws.target_accuracy > 0 else None, check_every=100, **common)
    print(f"self_rewarding: warm-start done in {time.perf_counter() - started:.0f} s", flush=True)
    judge = Judge(params, cfg.model, encode=TOKENIZER.encode, decode=TOKENIZER.decode,
                  template="{prompt}{response}?", pairwise_template="{prompt}{response_a}{response_b}?",
                  score_pattern=r"^-?\d+=([01])$", low=0.0, high=1.0, max_new_tokens=6, stop_token_ids=(EOS,),
                  temperature=0.0, mesh=mesh, prompt_len_buckets=BUCKETS)
    results = {}
    for arm, scorer in (("self", self_judge(judge)), ("grounded", verifier_scorer)):
        # the model's agreement with gold labels is measured in both arms
        measured = self_judge(judge)

        def report(t: int, m: dict[str, float], arm: str = arm) -> None:
            print(f"self_rewarding: {arm} iteration {t}: accuracy {m['accuracy']:.2f} judge_agreement "
                  f"{m['judge_agreement']:.2f} pairs {m.get('pairs', 0):.0f} ties {m.get('ties', 0):.0f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)

        trained, reports = run_self_rewarding(
            params, cfg.model, train, iterations=cfg.iterations, scorer=scorer,
            heldout_accuracy=lambda p: accuracy(p, cfg.model, heldout, mesh), labels=labels,
            rng=jax.random.key(cfg.seed + 1), judge_prompts_per_iteration=cfg.prompts_per_iteration,
            report=report, measure_scorer=measured, encode=TOKENIZER.encode, decode=TOKENIZER.decode,
            stop_token_ids=(EOS,), settings=cfg.iteration, mesh=mesh, seed=cfg.seed,
            prompt_len_buckets=BUCKETS)
        results[arm] = [dict(r, generation=r["iteration"]) for r in reports]
        if cfg.export_dir:
            written = export_policy(trained, cfg.model, Path(cfg.export_dir) / arm)
            print(f"self_rewarding: {arm} exported to {written}", flush=True)
    plot = plot_arms(results, ("accuracy", "judge_agreement"), f"{cfg.run_dir}/self_rewarding.png")
    print(f"self_rewarding: plot in {plot}; {time.perf_counter() - started:.0f} s in all")
    for arm, reports in results.items():
        first, last = reports[0], reports[-1]
        print(f"self_rewarding: {arm} iterations={len(reports) - 1} accuracy first={first['accuracy']:.2f} "
              f"last={last['accuracy']:.2f} judge_agreement first={first['judge_agreement']:.2f} "
              f"last={last['judge_agreement']:.2f}")
    return results


if __name__ == "__main__":
    main()
