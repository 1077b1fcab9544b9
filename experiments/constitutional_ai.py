"""Constitutional AI on a task where critiques and preferences are checkable: SL phase, then RLAIF.

    python experiments/constitutional_ai.py              # both phases, one seed, CPU
    python experiments/constitutional_ai.py --help       # every field of the typed config
    python experiments/constitutional_ai.py --model.path CKPT --prompts prompts.jsonl  # an instruct model

With `--model.path` the same pipeline runs on a Hugging Face instruct
checkpoint with the shipped constitution (`constitutional_hf.py` says how).
Without it:

The task is the addition of `self_rewarding.py` ("47+8=" -> "55"). Its
constitution has one principle, in the compact form a character-level model
can read: the critique request "?" asks the model to check the sum by
subtracting ("47+8=54?" -> "46=0": 54 - 8 is not 47, wrong), the revision
request "|" asks for a corrected answer ("47+8=54?46=0|" -> "55"), and the
preference question "!" asks which of two answers is better
("47+8=54,55!" -> "46=0,47=1B": each checked, then the better named).
The gold verifier only grades.

1. Warm-start (from scratch): critiques, revisions and pairwise preferences
   first, then answers mixed in until first-try accuracy on training prompts
   reaches `warmstart.target_accuracy`.
2. SL phase (`selfplay.constitutional`): first tries on training prompts
   (sampled), a critique under a drawn principle, a revision; SFT on
   (prompt, revision). Reports held-out first-try accuracy, the accuracy of
   revisions of held-out first tries, and first-try accuracy after the SFT.
3. RLAIF phase: two sampled answers per training prompt from the SL model,
   compared by the feedback model (the warm-started model) under a drawn
   principle in both orders (ties dropped) -> preference pairs ->
   a Bradley-Terry reward model (the SL model's backbone with a score head) ->
   GRPO against it alone (`trainer.train` with a `rewards.ModelReward`,
   verifier weight 0). Reports the reward model's accuracy on gold-labelled
   held-out pairs, and held-out accuracy before and after RL.

With `--export_dir DIR` the final policy (after RLAIF) is written to DIR as a
Hugging Face checkpoint (safetensors, config.json, this script's
character-level tokenizer) that `transformers.AutoModelForCausalLM` loads; load
the tokenizer with `transformers.PreTrainedTokenizerFast.from_pretrained(DIR)`
(`AutoTokenizer` gives every qwen2 model the Qwen2 BPE pre-tokenizer instead of
the file's one-character split). With `--model.path` the final policy goes to
`<run_dir>/policy`, or to DIR when `--export_dir` is set.

It ends with two lines:
`constitutional_ai: sl first_try=0.xx revision=0.yy after_sft=0.zz` and
`constitutional_ai: rlaif preference_pairs=N rm_gold_accuracy=0.xx accuracy before=0.yy after=0.zz`.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from constitutional_hf import CheckpointPipeline, run_checkpoint, write_jsonl  # noqa: E402
from self_rewarding import gold_answer, judge_verdict, near_miss, split  # noqa: E402

from ouroboros_jax.config import (  # noqa: E402
    LOSS_PRESETS,
    DataConfig,
    ExperimentConfig,
    LoggingConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    SamplingConfig,
    TrainConfig,
    VerifierConfig,
    WarmStartConfig,
)
from ouroboros_jax.data import Example, LazyExamples, PromptSource  # noqa: E402
from ouroboros_jax.export import export_with_tokenizer  # noqa: E402
from ouroboros_jax.metrics import MetricsLogger  # noqa: E402
from ouroboros_jax.models import Tokenizer, init_sharded  # noqa: E402
from ouroboros_jax.rewards import ModelReward  # noqa: E402
from ouroboros_jax.rewards.judge import Judge  # noqa: E402
from ouroboros_jax.sampling import generate  # noqa: E402
from ouroboros_jax.selfplay.constitutional import (  # noqa: E402
    CritiqueTemplates,
    Generator,
    Principle,
    ai_preference_pairs,
    critique_and_revise,
    sft_on_revisions,
)
from ouroboros_jax.selfplay.preference import PreferencePair, encode_pairs  # noqa: E402
from ouroboros_jax.selfplay.reward_model import init_reward_model, train_reward_model  # noqa: E402
from ouroboros_jax.sharding import make_mesh  # noqa: E402
from ouroboros_jax.supervised import supervised_warmstart  # noqa: E402
from ouroboros_jax.trainer import Task, train, verifier_spec  # noqa: E402
from verifiers import Verdict  # noqa: E402

TOKENIZER = Tokenizer.char_level("0123456789+-=?|,!AB")
EOS = TOKENIZER.eos_id
CONSTITUTION = [Principle("check-the-sum", critique_request="?", revision_request="|", preference="!")]
TEMPLATES = CritiqueTemplates(critique="{prompt}{response}{critique_request}",
                              revision="{prompt}{response}{critique_request}{critique}{revision_request}")
PAIRWISE = "{prompt}{response_a},{response_b}{principle}"
BUCKETS = (24, 48)  # a long sampled first try makes its critique and revision prompts longer


def pairwise_verdict(prompt: str, a: str, b: str) -> str:
    """Both answers checked, then the better named: "A" when a is right and b wrong, else "B"."""
    va, vb = judge_verdict(prompt, a), judge_verdict(prompt, b)
    return f"{va},{vb}{'A' if va.endswith('1') else 'B'}"


class FeedbackMix:
    """Warm-start rows: critiques, revisions, pairwise preferences and (a fraction) answers."""

    def __init__(self, prompts: Sequence[str], answer_fraction: float, seed: int):
        self.prompts, self.answer_fraction, self.rng = list(prompts), answer_fraction, random.Random(seed)

    def take(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            p = self.rng.choice(self.prompts)
            right, wrong = gold_answer(p), near_miss(gold_answer(p), self.rng)
            shown = right if self.rng.random() < 0.5 else wrong
            kind = self.rng.random()
            if kind < self.answer_fraction:
                out.append(Example(id="", prompt=p, gold={"answer": right}))
            elif kind < self.answer_fraction + (1 - self.answer_fraction) / 3:
                out.append(Example(id="", prompt=f"{p}{shown}?", gold={"answer": judge_verdict(p, shown)}))
            elif kind < self.answer_fraction + 2 * (1 - self.answer_fraction) / 3:
                revise = f"{p}{shown}?{judge_verdict(p, shown)}|"
                out.append(Example(id="", prompt=revise, gold={"answer": right}))
            else:
                a, b = (right, wrong) if self.rng.random() < 0.5 else (wrong, right)
                out.append(Example(id="", prompt=f"{p}{a},{b}!", gold={"answer": pairwise_verdict(p, a, b)}))
        return out


def accuracy(params, cfg: ModelConfig, prompts: Sequence[str], mesh) -> float:
    """Greedy first-try accuracy on `prompts`."""
    out = generate(params, cfg, TOKENIZER.encode_batch(list(prompts)), max_new_tokens=4, temperature=0.0,
                   stop_token_ids=(EOS,), rng=jax.random.key(0), mesh=mesh, prompt_len_buckets=BUCKETS)
    answers = [TOKENIZER.decode([int(t) for t in row[:n] if t != EOS])
               for row, n in zip(out.tokens, out.lengths, strict=True)]
    return float(np.mean([a == gold_answer(p) for a, p in zip(answers, prompts, strict=True)]))


def exact_answer(completion: str, example) -> Verdict:
    ok = completion == str(example["answer"])
    return Verdict(float(ok), ok, extracted=completion)


def sum_examples(prompts: Sequence[str]) -> list[Example]:
    return [Example(id=f"sum-{p}", prompt=p, gold={"answer": gold_answer(p)}) for p in prompts]


@dataclass(frozen=True)
class ConstitutionalExperiment:
    """The experiment: model, warm-start, SL phase and RLAIF phase."""

    seed: int = 0
    run_dir: str = "runs/constitutional_ai"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        family="qwen2", vocab_size=TOKENIZER.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
        head_dim=16, d_ff=256, max_seq_len=64, tie_embeddings=True))
    warmstart: WarmStartConfig = field(default_factory=lambda: WarmStartConfig(
        steps=2000, batch_size=64, learning_rate=3e-3, target_accuracy=0.4))
    feedback_steps: int = 1000  # warm-start steps on critiques, revisions and preferences alone
    answer_fraction: float = 0.2
    heldout: int = 200
    sft_steps: int = 100
    sft_learning_rate: float = 1e-4
    rm_steps: int = 150
    rm_learning_rate: float = 1e-3
    rl_steps: int = 20
    rl_learning_rate: float = 1e-4
    rounds: int = 1  # critique-and-revision rounds of the SL phase
    prompts: str = ""  # with --model.path: a JSONL file of prompts
    # Write the final policy here as a Hugging Face checkpoint; "" writes none (with --model.path:
    # <run_dir>/policy unless --hf.export false).
    export_dir: str = ""
    hf: CheckpointPipeline = field(default_factory=CheckpointPipeline)  # read with --model.path only


def rlaif_phase(cfg: ConstitutionalExperiment, feedback_params, sl_params, train_prompts: Sequence[str],
                heldout: Sequence[str], mesh, rng: jax.Array, judge=None) -> dict:
    """AI preferences -> Bradley-Terry reward model -> GRPO against it; metrics in `run_dir`.

    `judge` (anything with `Judge.compare`) defaults to the feedback model `feedback_params`.
    Writes `preferences/metrics.jsonl` and `reward_model/metrics.jsonl`; the RL run writes `rlaif/`.
    """
    two = gen(sl_params, cfg, mesh, 1.0)(train_prompts, jax.random.fold_in(rng, 3), num_samples=2)
    a, b = two[0::2], two[1::2]
    differ = [i for i in range(len(train_prompts)) if a[i] != b[i]]
    # the feedback model is the warm-started model (the paper's separate feedback model), not the policy
    judge = judge or Judge(feedback_params, cfg.model, encode=TOKENIZER.encode, decode=TOKENIZER.decode,
                           template="{prompt}{response}?", pairwise_template=PAIRWISE,
                           choice_pattern=r"([AB])$", max_new_tokens=14, stop_token_ids=(EOS,), mesh=mesh,
                           prompt_len_buckets=BUCKETS)
    encode_response = lambda s: TOKENIZER.encode(s) + [EOS]
    pairs, judged = ai_preference_pairs(judge, [train_prompts[i] for i in differ], [a[i] for i in differ],
                                        [b[i] for i in differ], CONSTITUTION, rng=jax.random.fold_in(rng, 4),
                                        encode=TOKENIZER.encode, encode_response=encode_response)
    write_jsonl(Path(cfg.run_dir) / "preferences" / "metrics.jsonl", [judged])
    if pairs.size == 0:
        raise SystemExit("constitutional_ai: the judge gave no preference pairs (every comparison a tie); "
                         "train the warm-start longer (--feedback_steps)")
    gold_rng = random.Random(cfg.seed + 5)
    gold_pairs = encode_pairs([PreferencePair(p, gold_answer(p), near_miss(gold_answer(p), gold_rng))
                               for p in heldout], TOKENIZER.encode, encode_response)
    rm = train_reward_model(init_reward_model(sl_params, jax.random.key(cfg.seed + 6)), cfg.model, pairs,
                            gold_pairs, steps=cfg.rm_steps, batch_size=32, learning_rate=cfg.rm_learning_rate,
                            mesh=mesh, seed=cfg.seed)
    rm_accuracy = rm.evals[-1]["accuracy"]
    write_jsonl(Path(cfg.run_dir) / "reward_model" / "metrics.jsonl",
                [{"step": i + 1, "reward_model/pairs": pairs.size,
                  **{f"reward_model/{k}": v for k, v in m.items()}} for i, m in enumerate(rm.history)]
                + [{"step": cfg.rm_steps, "reward_model/gold_accuracy": rm_accuracy}])
    print(f"constitutional_ai: {pairs.size} AI preference pairs (position consistency "
          f"{judged['judge/position_consistency']:.2f}); reward model gold-pair accuracy {rm_accuracy:.2f}",
          flush=True)
    before = accuracy(sl_params, cfg.model, heldout, mesh)
    exp = ExperimentConfig(
        name="constitutional_ai", seed=cfg.seed, model=cfg.model,
        sampling=SamplingConfig(group_size=8, max_new_tokens=4, temperature=1.0, prompt_len_buckets=BUCKETS,
                                eval_num_samples=2),
        loss=dataclasses.replace(LOSS_PRESETS["grpo"], kl_coef=0.05),
        optimizer=OptimizerConfig(learning_rate=cfg.rl_learning_rate, b2=0.99, max_grad_norm=1.0),
        train=TrainConfig(steps=cfg.rl_steps, prompts_per_step=16, mini_batch_size=128, micro_batch_size=128,
                          eval_every=0, eval_size=16),
        data=DataConfig(source="arithmetic"),
        verifier=VerifierConfig(names=("constitutional_ai:exact_answer",), weights=(1.0,), num_workers=1,
                                timeout_s=10.0),
        logging=LoggingConfig(run_dir=f"{cfg.run_dir}/rlaif", console=False, tensorboard=False))
    examples = sum_examples(train_prompts)
    task = Task(train_source=PromptSource(LazyExamples(len(examples), examples.__getitem__), seed=cfg.seed,
                                          name="sums"),
                encode=lambda exs: TOKENIZER.encode_batch([e.prompt for e in exs]), decode=TOKENIZER.decode,
                verifier=verifier_spec(exp.verifier), stop_token_ids=(EOS,),  # by name: workers import it
                reward_model=ModelReward([rm.params], cfg.model, mesh=mesh), reward_model_weight=1.0,
                verifier_weight=0.0)
    out = train(exp, model_config=cfg.model, params=jax.tree.map(lambda x: x.copy(), sl_params), task=task,
                mesh=mesh, logger=MetricsLogger.from_config(exp.logging))
    after = accuracy(out.state.params, cfg.model, heldout, mesh)
    return {"pairs": pairs.size, "judge": judged, "rm_accuracy": rm_accuracy, "before": before,
            "after": after, "rl": out.history, "params": out.state.params}


def export_policy(params, model_config: ModelConfig, directory: str | Path) -> Path:
    """A model as a Hugging Face checkpoint: weights, config.json (with this tokenizer's special
    token ids) and the tokenizer files. Every process calls it; process 0 writes."""
    return export_with_tokenizer(params, model_config, TOKENIZER, directory)


def gen(params, cfg: ConstitutionalExperiment, mesh, temperature: float = 0.0) -> Generator:
    """The toy task's generator: 14 new tokens at most (a critique, a revision or a verdict)."""
    return Generator(params, cfg.model, TOKENIZER.encode, TOKENIZER.decode, (EOS,), 14,
                     temperature=temperature, mesh=mesh, prompt_len_buckets=BUCKETS)


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = tyro.cli(ConstitutionalExperiment, default=ConstitutionalExperiment(), description=__doc__,
                   use_underscores=True, config=(tyro.conf.FlagConversionOff,), args=argv)
    if cfg.model.path:
        return run_checkpoint(cfg)
    started = time.perf_counter()
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    train_prompts, heldout, _ = split(cfg.seed, cfg.heldout, 0)
    ws = cfg.warmstart
    common = dict(encode=lambda exs: TOKENIZER.encode_batch([e.prompt for e in exs]),
                  answer_ids=lambda e: TOKENIZER.encode(e.gold["answer"]) + [EOS], batch_size=ws.batch_size,
                  learning_rate=ws.learning_rate, seed=cfg.seed, mesh=mesh, length=32)
    params = init_sharded(cfg.model, jax.random.key(cfg.seed), mesh)
    params = supervised_warmstart(params, cfg.model, FeedbackMix(train_prompts, 0.0, cfg.seed + 1),
                                  steps=cfg.feedback_steps, **common)
    probe = train_prompts[:100]
    params = supervised_warmstart(
        params, cfg.model, FeedbackMix(train_prompts, cfg.answer_fraction, cfg.seed), steps=ws.steps,
        until=(lambda p, s: accuracy(p, cfg.model, probe, mesh) >= ws.target_accuracy)
        if ws.target_accuracy > 0 else None, check_every=100, **common)
    print(f"constitutional_ai: warm-start done in {time.perf_counter() - started:.0f} s", flush=True)

    # SL phase
    rng = jax.random.key(cfg.seed + 1)
    def right(prompts: Sequence[str], answers: Sequence[str]) -> float:
        return float(np.mean([a == gold_answer(p) for p, a in zip(prompts, answers, strict=True)]))

    held = critique_and_revise(gen(params, cfg, mesh), heldout, CONSTITUTION, rounds=cfg.rounds,
                               templates=TEMPLATES, rng=rng, seed=cfg.seed)
    first_try, revised = right(heldout, held.initial), right(heldout, held.final)
    sampled = gen(params, cfg, mesh, 1.0)(train_prompts, jax.random.fold_in(rng, 1))
    revisions = critique_and_revise(gen(params, cfg, mesh), train_prompts, CONSTITUTION, rounds=cfg.rounds,
                                    templates=TEMPLATES, rng=jax.random.fold_in(rng, 2), seed=cfg.seed + 1,
                                    initial=sampled)
    sl_params, rows = sft_on_revisions(params, cfg.model, train_prompts, revisions.final,
                                       encode=TOKENIZER.encode, eos_id=EOS, steps=cfg.sft_steps,
                                       batch_size=64, learning_rate=cfg.sft_learning_rate, mesh=mesh,
                                       seed=cfg.seed, length=32)
    after_sft = accuracy(sl_params, cfg.model, heldout, mesh)
    write_jsonl(Path(cfg.run_dir) / "sl" / "metrics.jsonl", [
        {"sl/first_try": first_try, "sl/revision": revised, "sl/after_sft": after_sft, "sl/sft_rows": rows,
         "sl/sampled_right": right(train_prompts, sampled),
         "sl/revised_right": right(train_prompts, revisions.final)}])
    print(f"constitutional_ai: sl first_try={first_try:.2f} revision={revised:.2f} after_sft={after_sft:.2f} "
          f"({rows} revisions trained on, right: sampled first tries {right(train_prompts, sampled):.2f}, "
          f"their revisions {right(train_prompts, revisions.final):.2f}; "
          f"{time.perf_counter() - started:.0f} s)", flush=True)

    rl = rlaif_phase(cfg, params, sl_params, train_prompts, heldout, mesh, rng)
    if cfg.export_dir:
        export_policy(rl["params"], cfg.model, cfg.export_dir)
        print(f"constitutional_ai: policy exported to {cfg.export_dir}", flush=True)
    print(f"constitutional_ai: done in {time.perf_counter() - started:.0f} s")
    print(f"constitutional_ai: sl first_try={first_try:.2f} revision={revised:.2f} after_sft={after_sft:.2f}")
    print(f"constitutional_ai: rlaif preference_pairs={rl['pairs']} rm_gold_accuracy={rl['rm_accuracy']:.2f} "
          f"accuracy before={rl['before']:.2f} after={rl['after']:.2f}")
    return {"first_try": first_try, "revision": revised, "after_sft": after_sft, "pairs": rl["pairs"],
            "rm_accuracy": rl["rm_accuracy"], "before": rl["before"], "after": rl["after"]}


if __name__ == "__main__":
    main()
