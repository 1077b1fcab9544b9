"""Constitutional AI on a Hugging Face instruct checkpoint: `constitutional_ai.py --model.path CKPT`.

    python experiments/constitutional_ai.py --model.path CKPT --prompts prompts.jsonl

The same two phases as the toy task, with the shipped constitution
(`selfplay/constitution.json`, or `--hf.constitution FILE`) in plain English and
every prompt rendered through the checkpoint's chat template:

1. SL phase: a sampled first try for every prompt of `--prompts` (JSONL, the
   text in `--hf.prompt_field`), then `--rounds` rounds of critique and
   revision, each under a principle drawn per prompt; SFT on (prompt, final
   revision) for `--sft_steps` updates of `--hf.batch_size` rows.
2. RL phase (RLAIF): two sampled answers per prompt from the SL model; the
   feedback model (the checkpoint as loaded) compares them under a drawn
   principle's preference question, in both orders. Verdicts that do not parse
   or disagree between the orders are counted and reported; those pairs are
   labelled from the feedback model's log-probabilities of "Better: A" and
   "Better: B" (`--hf.undecided logprob`, the paper's labelling) or dropped
   (`drop`). The pairs train a Bradley-Terry reward model (the SL model's
   backbone with a score head), and `--hf.rl grpo` or `ppo` trains the SL
   model against it alone.

One run directory (`--run_dir`) holds every stage: `sl/revisions.jsonl` (each
prompt's first try, critiques, revisions and principles) and `sl/metrics.jsonl`,
`sft/metrics.jsonl`, `preferences/pairs.jsonl` and `preferences/metrics.jsonl`,
`reward_model/metrics.jsonl` and the reward model (`reward_model/checkpoint`),
the RL run (`rl/`: config, metrics, curves) and the final policy as a Hugging
Face checkpoint (`policy/`: weights, config.json and the tokenizer files of
`--model.path`); `--export_dir DIR` writes that checkpoint to DIR instead.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jax
from hf_run import load_policy, make_task
from instructgpt import supervised

from ouroboros_jax.config import (
    LOSS_PRESETS,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    LoggingConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    PPOConfig,
    SamplingConfig,
    TrainConfig,
    VerifierConfig,
)
from ouroboros_jax.data import Example, PromptSource, make_prompt_encoder, read_jsonl
from ouroboros_jax.models import export_hf_checkpoint
from ouroboros_jax.rewards import ModelReward
from ouroboros_jax.rewards.judge import Judge
from ouroboros_jax.selfplay.constitutional import (
    Generator,
    ai_preferences,
    critique_and_revise,
    load_constitution,
)
from ouroboros_jax.selfplay.preference import encode_pairs
from ouroboros_jax.selfplay.reward_model import init_reward_model, save_reward_model, train_reward_model
from ouroboros_jax.sharding import batch_shards, make_mesh
from ouroboros_jax.trainer import prepare_run_dir, train
from verifiers import Verdict

# The paper's multiple-choice comparison (Bai et al. 2022, sec. 4.1), with a verdict line to parse.
PAIRWISE_TEMPLATE = ("Consider a request and two responses to it.\n\nRequest: {prompt}\n\n{principle}\n\n"
                     "(A) {response_a}\n\n(B) {response_b}\n\n"
                     "End with one line: \"Better: A\" or \"Better: B\".")
CHOICES = ("Better: A", "Better: B")


@dataclass(frozen=True)
class CheckpointPipeline:
    """Settings that only a `--model.path` run reads."""

    prompt_field: str = "prompt"
    answer_field: str = ""  # optional reference answers: RL's `accuracy` from the math verifier
    constitution: str = ""  # a constitution JSON file ("" for the one shipped with the package)
    max_new_tokens: int = 256  # first tries, revisions and RL completions
    feedback_max_new_tokens: int = 256  # critiques and judge verdicts
    temperature: float = 1.0
    prompt_len_buckets: tuple[int, ...] = (256, 512, 1024)  # longer feedback prompts keep their end
    batch_size: int = 8  # SFT and reward-model rows per update; RL micro-batch
    undecided: Literal["logprob", "drop"] = "logprob"
    pairwise_template: str = PAIRWISE_TEMPLATE
    rl: Literal["grpo", "ppo"] = "grpo"
    group_size: int = 4
    prompts_per_step: int = 8
    mesh: MeshConfig = field(default_factory=MeshConfig)
    export: bool = True  # write the final policy to <run_dir>/policy (to --export_dir when that is set)


def unverified(completion: str, example: Any) -> Verdict:
    """The RL phase's verifier without reference answers: nothing to grade (weight 0 in the reward)."""
    return Verdict(0.0, False, reason="no reference answer")


def policy_dir(cfg: Any) -> Path | None:
    """Where the final policy goes: `--export_dir`, else `<run_dir>/policy` (None: `--hf.export false`)."""
    if cfg.export_dir:
        return Path(cfg.export_dir)
    return Path(cfg.run_dir) / "policy" if cfg.hf.export else None


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def rl_config(cfg: Any) -> ExperimentConfig:
    """The RL phase's experiment (also what loads the checkpoint and renders prompts)."""
    hf = cfg.hf
    rows = hf.prompts_per_step * hf.group_size
    verifier = VerifierConfig(names=("math_any",), weights=(1.0,), num_workers=1)
    # the architecture comes from the checkpoint (`load_policy` checks the lengths against it)
    longest = hf.prompt_len_buckets[-1] + max(hf.max_new_tokens, hf.feedback_max_new_tokens)
    model = ModelConfig(path=cfg.model.path, dtype=cfg.model.dtype, compute_dtype=cfg.model.compute_dtype,
                        remat=cfg.model.remat, max_seq_len=max(longest, ModelConfig.max_seq_len))
    return ExperimentConfig(
        name="constitutional_ai", seed=cfg.seed, model=model, mesh=hf.mesh,
        sampling=SamplingConfig(group_size=hf.group_size, max_new_tokens=hf.max_new_tokens,
                                temperature=hf.temperature, prompt_len_buckets=hf.prompt_len_buckets),
        loss=LOSS_PRESETS[hf.rl], ppo=PPOConfig(enabled=hf.rl == "ppo"),
        optimizer=OptimizerConfig(learning_rate=cfg.rl_learning_rate, b2=0.99, max_grad_norm=1.0,
                                  warmup_steps=0),
        train=TrainConfig(steps=cfg.rl_steps, prompts_per_step=hf.prompts_per_step, mini_batch_size=rows,
                          micro_batch_size=min(hf.batch_size, rows), inner_epochs=1, eval_every=0),
        data=DataConfig(chat_template=True), verifier=verifier,
        logging=LoggingConfig(run_dir=str(Path(cfg.run_dir) / "rl"), tensorboard=False))


def run_checkpoint(cfg: Any) -> dict[str, Any]:
    """Both phases on the checkpoint `cfg.model.path` and the prompts of `cfg.prompts`."""
    hf, started, run_dir = cfg.hf, time.perf_counter(), Path(cfg.run_dir)
    if not cfg.prompts:
        raise ConfigError("prompts: with --model.path, name a JSONL file of prompts (one object per line "
                          f"with the field {hf.prompt_field!r}), e.g. --prompts prompts.jsonl")
    constitution = load_constitution(hf.constitution or None)
    examples = read_jsonl(cfg.prompts, prompt_field=hf.prompt_field, answer_field=hf.answer_field)
    exp = rl_config(cfg)
    mesh = make_mesh(exp.mesh)
    if hf.batch_size % batch_shards(mesh):
        raise ConfigError(f"hf.batch_size: {hf.batch_size} rows do not divide over the mesh's "
                          f"{batch_shards(mesh)} batch shards (data x fsdp)")
    prepare_run_dir(exp)
    model_config, params, tokenizer = load_policy(exp, mesh)
    if hf.prompt_len_buckets[-1] + hf.feedback_max_new_tokens > model_config.max_seq_len:
        raise ConfigError(f"hf.feedback_max_new_tokens: the longest prompt bucket plus "
                          f"{hf.feedback_max_new_tokens} exceeds the checkpoint's max_position_embeddings "
                          f"({model_config.max_seq_len})")
    task = make_task(exp, tokenizer, PromptSource(examples, seed=cfg.seed, name=cfg.prompts), [])
    if not hf.answer_field:
        task = dataclasses.replace(task, verifier=unverified)
    chat = exp.data.chat_template and bool(tokenizer.chat_template)
    # Critique, revision and judge prompts can outgrow the longest bucket: they keep their end (the request).
    feedback = make_prompt_encoder(dataclasses.replace(exp.data, chat_template=chat), tokenizer,
                                   max_len=hf.prompt_len_buckets[-1], overflow="truncate")
    as_ids = lambda text: feedback.encode_batch([Example(id="", prompt=text, gold={})])[0]
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    gen = lambda p, n: Generator(p, model_config, as_ids, tokenizer.decode, task.stop_token_ids, n,
                                 temperature=hf.temperature, mesh=mesh,
                                 prompt_len_buckets=hf.prompt_len_buckets)
    prompts, rng = [e.prompt for e in examples], jax.random.key(cfg.seed)

    # SL phase: first tries, critique-and-revision rounds, SFT on the final revisions
    revised = critique_and_revise(gen(params, hf.max_new_tokens), prompts, constitution, rounds=cfg.rounds,
                                  rng=jax.random.fold_in(rng, 1), seed=cfg.seed)
    write_jsonl(run_dir / "sl" / "revisions.jsonl", [
        {"prompt": p, "initial": revised.initial[i], "critiques": [c[i] for c in revised.critiques],
         "revisions": [r[i] for r in revised.revisions], "principles": [n[i] for n in revised.principles]}
        for i, p in enumerate(prompts)])
    demos = [Example(id=f"revision:{i}", prompt=p, gold={"answer": r})
             for i, (p, r) in enumerate(zip(prompts, revised.final, strict=True)) if r.strip()]
    sl = {"sl/prompts": len(prompts), "sl/rounds": cfg.rounds,
          "sl/critiques": sum(map(len, revised.critiques)), "sl/revisions": sum(map(len, revised.revisions)),
          "sl/empty_revisions": len(prompts) - len(demos)}
    write_jsonl(run_dir / "sl" / "metrics.jsonl", [sl])
    sl_params, sft_log = params, []
    if demos:
        sl_params, sft_log = supervised(params, model_config, task.encode, tokenizer, demos,
                                        steps=cfg.sft_steps, batch=hf.batch_size, lr=cfg.sft_learning_rate,
                                        mesh=mesh, seed=cfg.seed)
    else:
        print("constitutional_ai: every final revision is empty; the SL phase trains nothing")
    write_jsonl(run_dir / "sft" / "metrics.jsonl", sft_log)

    # RL phase: two answers per prompt, AI preferences, a Bradley-Terry reward model, RL against it
    two = gen(sl_params, hf.max_new_tokens)(prompts, jax.random.fold_in(rng, 2), num_samples=2)
    a, b = two[0::2], two[1::2]
    differ = [i for i in range(len(prompts)) if a[i] != b[i]]
    judge = Judge(params, model_config, encode=as_ids, decode=tokenizer.decode,
                  pairwise_template=hf.pairwise_template, max_new_tokens=hf.feedback_max_new_tokens,
                  stop_token_ids=task.stop_token_ids, mesh=mesh, prompt_len_buckets=hf.prompt_len_buckets)
    pairs, judged = ai_preferences(judge, [prompts[i] for i in differ], [a[i] for i in differ],
                                   [b[i] for i in differ], constitution, rng=jax.random.fold_in(rng, 3),
                                   seed=cfg.seed, undecided=hf.undecided, choices=CHOICES,
                                   encode_choice=tokenizer.encode)
    judged["pairs/identical_answers"] = float(len(prompts) - len(differ))
    write_jsonl(run_dir / "preferences" / "pairs.jsonl",
                [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "principle": p.id}
                 for p in pairs])
    write_jsonl(run_dir / "preferences" / "metrics.jsonl", [judged])
    print(f"constitutional_ai: {len(pairs)} AI preference pairs of {len(differ)} comparisons "
          f"({judged['pairs/by_verdict']:.0f} by verdict, {judged['pairs/by_logprob']:.0f} by "
          f"log-probability, {judged['pairs/dropped']:.0f} dropped; {judged['judge/parse_failures']:.0f} "
          "verdicts did not parse)",
          flush=True)
    if not pairs:
        raise SystemExit(f"constitutional_ai: no preference pairs from {len(differ)} comparisons "
                         f"({len(prompts) - len(differ)} prompts gave two identical answers; see "
                         f"{run_dir / 'preferences' / 'metrics.jsonl'}); use --hf.undecided logprob, "
                         "more prompts or a higher --hf.temperature")
    encoded = encode_pairs(pairs, lambda p: task.encode([Example(id="", prompt=p, gold={})])[0],
                           lambda r: tokenizer.encode(r) + eos)
    rm = train_reward_model(init_reward_model(sl_params, jax.random.key(cfg.seed + 1)), model_config, encoded,
                            steps=cfg.rm_steps, batch_size=hf.batch_size, learning_rate=cfg.rm_learning_rate,
                            mesh=mesh, seed=cfg.seed)
    write_jsonl(run_dir / "reward_model" / "metrics.jsonl",
                [{"step": i + 1, "reward_model/pairs": encoded.size,
                  **{f"reward_model/{k}": v for k, v in m.items()}} for i, m in enumerate(rm.history)])
    save_reward_model(rm.params, model_config, run_dir / "reward_model" / "checkpoint")
    task = dataclasses.replace(task, reward_model=ModelReward([rm.params], model_config, mesh=mesh),
                               reward_model_weight=1.0, verifier_weight=0.0)
    result = train(exp, model_config=model_config, params=sl_params, task=task, mesh=mesh)
    if (out := policy_dir(cfg)) is not None:  # with the tokenizer files of model.path
        export_hf_checkpoint(result.state.params, model_config, out)
    rewards = [h["reward/mean"] for h in result.history]
    print(f"constitutional_ai: checkpoint sl revisions={sl['sl/revisions']} sft_rows={len(demos)} "
          f"rlaif preference_pairs={len(pairs)} parse_failures={judged['judge/parse_failures']:.0f} "
          f"rl steps={len(rewards)} reward first={rewards[0]:.3f} last={rewards[-1]:.3f} "
          f"({time.perf_counter() - started:.0f} s; run directory {run_dir})")
    return {"sl": sl, "preferences": judged, "pairs": pairs, "reward_model": rm.history,
            "rl": result.history, "result": result}
