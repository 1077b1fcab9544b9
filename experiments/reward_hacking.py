"""Reward hacking at tiny scale: a length-biased reward model is gamed, and PAR holds the policy back.

    python experiments/reward_hacking.py                    # plain and PAR arms, CPU, a few minutes
    python experiments/reward_hacking.py --arms plain,par,ensemble --train.steps 60 --seed 1

1. A character-level policy learns 1-digit addition by a supervised warm-start
   ("What is 3 + 4?" -> "7", then EOS). The task asks for the number and
   nothing else; the verifier is an exact match.
2. Two reward models (the warm-started policy's backbone with a new scalar
   head) are trained with the Bradley-Terry loss on preference pairs with the
   verbosity bias of human raters: most pairs prefer the right answer to a
   wrong one, but 40% prefer the right answer padded with a few extra
   characters to the same answer bare. Held-out pair accuracy is reported.
   The proxy reward is the models' mean score.
3. Arms train the same policy from the same start with GRPO (mean-centred
   group advantages, the same KL penalty to the start) on the learned reward
   alone; the verifier only reports accuracy:
   - plain: the proxy;
   - par: Preference As Reward, `mean_m sigmoid(proxy - proxy(ref_m))` over
     M responses per prompt sampled from the warm-started policy (Fu et al.
     2025, "Reward Shaping to Mitigate Reward Hacking in RLHF", arXiv 2502.18770);
     bounded, so the KL penalty outweighs what padding can still earn;
   - ensemble (with --arms): `mean - PENALTY * std` over the reward models
     (Coste et al. 2023, arXiv 2310.02743); it only helps where the models
     disagree, and both learned the same bias.
4. Per RL step each arm records the proxy's gain over the reference responses
   of the same prompts (comparable across batches and arms), the exact-match
   accuracy of its samples, the reward models' disagreement and the length;
   every 5 steps, pass@1 on an anchor set. A `RewardHackingTracker` flags
   "proxy up, verified accuracy down". One plot shows the arms side by side
   (runs/reward_hacking/reward_hacking.png), and the script ends with one line per arm:
   `reward_hacking: <arm> steps=N proxy_gain first=.. last=.. anchor_acc first=0.xx last=0.yy ...`
   ("first" and "last" per-step values are means over the first and last 5 steps).
5. With `--export_dir DIR`, each arm's trained policy is written to DIR/<arm> as a
   Hugging Face checkpoint (safetensors, config.json, this script's character-level
   tokenizer) that `transformers.AutoModelForCausalLM` loads; load the tokenizer with
   `transformers.PreTrainedTokenizerFast.from_pretrained(DIR/<arm>)` (`AutoTokenizer` gives
   every qwen2 model the Qwen2 BPE pre-tokenizer instead of the file's one-character split).
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from pathlib import Path

import jax
import numpy as np

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
from ouroboros_jax.rewards import (
    Completions,
    ModelReward,
    PARReward,
    Rewards,
    RewardSource,
    sampled_reference,
)
from ouroboros_jax.selfplay.preference import PreferencePair, encode_pairs
from ouroboros_jax.selfplay.reward_model import RewardHackingTracker, init_reward_model, train_reward_model
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.supervised import supervised_warmstart
from ouroboros_jax.trainer import Task, train
from verifiers import Verdict

TOKENIZER = Tokenizer.char_level("0123456789+-*=? .Whatis")
DIGITS = 1
VERBOSE_FRACTION = 0.4  # share of preference pairs where the padded (longer) answer is preferred
FILLER = "0123456789+-*=? .Whatis"  # what the raters' favourite extra text is made of
ENSEMBLE = 2  # reward models
RM_STEPS, RM_BATCH, RM_LR = 400, 32, 2e-3
PAR_REFERENCES = 2  # reference responses per prompt for PAR
PENALTY = 1.0  # lambda of the ensemble arm's mean - lambda * std
ARMS = ("plain", "par", "ensemble")

DEFAULT = ExperimentConfig(
    name="reward_hacking",
    seed=0,
    model=ModelConfig(family="qwen2", vocab_size=TOKENIZER.vocab_size, d_model=64, n_layers=2, n_heads=4,
                      n_kv_heads=4, head_dim=16, d_ff=128, max_seq_len=32, tie_embeddings=True),
    sampling=SamplingConfig(group_size=8, max_new_tokens=8, temperature=1.0, prompt_len_buckets=(16,),
                            eval_num_samples=4),
    loss=dataclasses.replace(LOSS_PRESETS["grpo"], advantage="dr_grpo", kl_coef=0.2),
    optimizer=OptimizerConfig(learning_rate=2e-4, b2=0.99, max_grad_norm=1.0),
    train=TrainConfig(steps=50, prompts_per_step=8, mini_batch_size=64, micro_batch_size=64, eval_every=5,
                      eval_size=100),
    data=DataConfig(source="arithmetic"),
    warmstart=WarmStartConfig(steps=500, batch_size=64, learning_rate=1e-3),
    verifier=VerifierConfig(names=("reward_hacking:exact_answer",), weights=(1.0,), num_workers=1,
                            timeout_s=10.0),
    logging=LoggingConfig(run_dir="runs/reward_hacking", console=False, tensorboard=False),
)


def exact_answer(completion: str, example) -> Verdict:
    """The task's verifier: the completion is the answer and nothing else."""
    ok = completion == str(example["answer"])
    return Verdict(float(ok), ok, extracted=completion)


def encode(examples) -> list[list[int]]:
    return TOKENIZER.encode_batch([ex.prompt for ex in examples])


def decode(ids) -> str:
    return TOKENIZER.decode(list(ids))


def preference_pairs(n: int, seed: int, verbose_fraction: float) -> list[PreferencePair]:
    """Preference data over 1-digit additions, with the verbosity bias of human raters.

    A pair is either (right answer, wrong answer), both bare numbers, or, with
    probability `verbose_fraction`, (right answer followed by 1-5 filler
    characters, the same answer bare): the longer response preferred.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        prompt, right = f"What is {a} + {b}?", str(a + b)
        if rng.random() < verbose_fraction:
            filler = "".join(rng.choice(FILLER) for _ in range(rng.randint(1, 5)))
            pairs.append(PreferencePair(prompt, right + filler, right))
        else:
            wrong = rng.choice([x for x in range(19) if x != a + b])
            pairs.append(PreferencePair(prompt, right, str(wrong)))
    return pairs


@dataclasses.dataclass
class ArmReward:
    """An arm's training reward; per batch it also records the proxy's gain over the reference
    responses of the same prompts, which is comparable across batches and arms."""

    shaped: RewardSource
    proxy: ModelReward
    references: PARReward  # its cached reference rewards centre the proxy
    log: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def __call__(self, completions: Completions) -> Rewards:
        examples = completions.examples
        proxy = self.proxy(completions)
        raw = proxy.rewards.reshape(len(examples), -1)
        ref = self.references.reference_rewards(examples).mean(axis=1, keepdims=True)
        lengths = completions.sample.lengths
        self.log.append({"gain": float((raw - ref).mean()), "length": float(np.mean(lengths)),
                         "rm_std": proxy.metrics["reward_model/std"]})
        return self.shaped(completions)


def arm_reward(arm: str, members, cfg: ExperimentConfig, policy, mesh) -> ArmReward:
    """The proxy (the reward models' mean) and the arm's shaping of it."""
    proxy = ModelReward(members, cfg.model, mesh=mesh)
    reference = sampled_reference(
        policy, cfg.model, encode, num_samples=PAR_REFERENCES, max_new_tokens=cfg.sampling.max_new_tokens,
        stop_token_ids=(TOKENIZER.eos_id,), seed=cfg.seed + 7, mesh=mesh,
        prompt_len_buckets=cfg.sampling.prompt_len_buckets)
    par = PARReward(proxy, reference)
    match arm:
        case "plain":
            shaped = proxy
        case "par":
            shaped = par
        case "ensemble":
            shaped = ModelReward(members, cfg.model, penalty=PENALTY, mesh=mesh)
        case _:
            raise ValueError(f"--arms: unknown arm {arm!r}; expected some of {ARMS}")
    return ArmReward(shaped, proxy, par)


def plot(results: dict[str, dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("gain", "proxy reward gain over reference"), ("accuracy", "exact-match accuracy (samples)"),
              ("anchor", "anchor-set pass@1"), ("length", "completion tokens"),
              ("rm_std", "reward-model disagreement (std)")]
    fig = Figure(figsize=(3.2 * len(panels), 3.6))
    FigureCanvasAgg(fig)
    for k, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for arm, res in results.items():
            xs, ys = res[key]
            line, = ax.plot(xs, ys, marker="o" if key == "anchor" else None, ms=3, label=arm)
            if key in ("gain", "accuracy") and res["flagged_at"] is not None:
                ax.axvline(res["flagged_at"], ls=":", lw=1, color=line.get_color())
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8, title="dotted: hacking flagged", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def reward_models(cfg: ExperimentConfig, policy, mesh) -> list:
    eos = TOKENIZER.eos_id
    encode_response = lambda text: TOKENIZER.encode(text) + [eos]
    train_pairs = encode_pairs(preference_pairs(1024, cfg.seed, VERBOSE_FRACTION), TOKENIZER.encode,
                               encode_response)
    heldout = encode_pairs(preference_pairs(256, cfg.seed + 1000, VERBOSE_FRACTION), TOKENIZER.encode,
                           encode_response)
    members = []
    for e in range(ENSEMBLE):
        rm = init_reward_model(policy, jax.random.key(cfg.seed + 100 + e))
        res = train_reward_model(rm, cfg.model, train_pairs, heldout, steps=RM_STEPS, batch_size=RM_BATCH,
                                 learning_rate=RM_LR, mesh=mesh, seed=cfg.seed + e)
        members.append(res.params)
        print(f"reward model {e}: held-out pair accuracy {res.evals[-1]['accuracy']:.3f} "
              f"(loss {res.evals[-1]['loss']:.3f})", flush=True)
    return members


def export_policy(params, cfg: ExperimentConfig, directory: str | Path) -> Path:
    """A policy as a Hugging Face checkpoint: weights, config.json (with this tokenizer's special
    token ids) and the tokenizer files. Every process calls it; process 0 writes."""
    return export_with_tokenizer(params, cfg.model, TOKENIZER, directory)


def run_arm(arm: str, cfg: ExperimentConfig, policy, members, mesh) -> dict:
    """Train one arm from the warm-started policy; its per-step records and the hacking flag."""
    run_cfg = dataclasses.replace(cfg, logging=dataclasses.replace(
        cfg.logging, run_dir=str(Path(cfg.logging.run_dir) / arm)))
    reward = arm_reward(arm, members, cfg, policy, mesh)
    task = Task(train_source=arithmetic_source(seed=cfg.data.seed, digits=DIGITS), encode=encode,
                decode=decode, verifier=exact_answer, stop_token_ids=(TOKENIZER.eos_id,),
                eval_examples=arithmetic_source(seed=cfg.data.seed, digits=DIGITS).take(cfg.train.eval_size),
                reward_model=reward, reward_model_weight=1.0, verifier_weight=0.0)
    t0 = time.perf_counter()
    out = train(run_cfg, model_config=cfg.model, params=jax.tree.map(lambda x: x.copy(), policy), task=task,
                mesh=mesh, logger=MetricsLogger.from_config(run_cfg.logging))
    if cfg.export_dir:
        export_policy(out.state.params, cfg, Path(cfg.export_dir) / arm)
    steps = list(range(1, len(out.history) + 1))
    gain = [r["gain"] for r in reward.log]
    accuracy = [h["accuracy"] for h in out.history]
    tracker = RewardHackingTracker(window=3, reward_rise=0.5, accuracy_drop=0.1)
    for s, g, a in zip(steps, gain, accuracy, strict=True):
        tracker.update(s, g, a)
    eval_steps = [0] + [s for s, h in zip(steps, out.history, strict=True) if "eval/pass@1" in h]
    return {"gain": (steps, gain), "accuracy": (steps, accuracy),
            "length": (steps, [r["length"] for r in reward.log]),
            "rm_std": (steps, [r["rm_std"] for r in reward.log]),
            "anchor": (eval_steps, [e["eval/pass@1"] for e in out.evals]),
            "flagged_at": tracker.flagged_at, "seconds": time.perf_counter() - t0, "params": out.state.params}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the arms; their results (per-step records and the trained `params`) by arm."""
    argv = list(sys.argv[1:] if argv is None else argv)
    arms = ("plain", "par")
    if "--arms" in argv:
        i = argv.index("--arms")
        arms = tuple(a for a in argv[i + 1].split(",") if a)
        del argv[i:i + 2]
        for a in arms:
            if a not in ARMS:
                raise SystemExit(f"--arms: unknown arm {a!r}; expected some of {ARMS}")
    cfg = parse_cli(DEFAULT, args=argv, description=__doc__)
    t_start = time.perf_counter()
    mesh = make_mesh(cfg.mesh)
    eos = TOKENIZER.eos_id
    policy = supervised_warmstart(
        init_sharded(cfg.model, jax.random.key(cfg.seed), mesh), cfg.model,
        arithmetic_source(seed=cfg.data.seed + 1, digits=DIGITS), encode=encode,
        answer_ids=lambda ex: TOKENIZER.encode(str(ex.gold["answer"])) + [eos],
        steps=cfg.warmstart.steps, batch_size=cfg.warmstart.batch_size,
        learning_rate=cfg.warmstart.learning_rate, seed=cfg.seed, mesh=mesh)
    members = reward_models(cfg, policy, mesh)
    results = {}
    for arm in arms:
        results[arm] = run_arm(arm, cfg, policy, members, mesh)
        print(f"arm {arm}: {results[arm]['seconds']:.0f} s", flush=True)

    out_dir = Path(cfg.logging.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(results, out_dir / "reward_hacking.png")
    print(f"reward_hacking: plot in {out_dir / 'reward_hacking.png'} ({time.perf_counter() - t_start:.0f} s)")
    ends = lambda xs: (float(np.mean(xs[:5])), float(np.mean(xs[-5:])))
    for arm, r in results.items():
        (g0, g1), (l0, l1), (s0, s1) = ends(r["gain"][1]), ends(r["length"][1]), ends(r["rm_std"][1])
        anchor = r["anchor"][1]
        flag = f"step {r['flagged_at']}" if r["flagged_at"] is not None else "none"
        print(f"reward_hacking: {arm} steps={len(r['gain'][1])} proxy_gain first={g0:.2f} last={g1:.2f} "
              f"anchor_acc first={anchor[0]:.2f} last={anchor[-1]:.2f} length first={l0:.1f} last={l1:.1f} "
              f"rm_std first={s0:.2f} last={s1:.2f} hacking_flag={flag}")
    if cfg.export_dir:
        print(f"reward_hacking: policies exported to {cfg.export_dir}/<arm>")
    return results


if __name__ == "__main__":
    main()
