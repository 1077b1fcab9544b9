"""Ouroboros generations: a model trains on what it generates, generation after generation.

Generation g, for g = 0, 1, ..., `generations`:

1. Report. M_g samples `sampling.eval_num_samples` completions per held-out prompt: pass@1,
   pass@k, distinct-1/2 (over each prompt's completion tokens), mean token
   entropy, distinct final answers per prompt, mean length; and the mean
   per-token log-likelihood of the anchor set's gold answers, with its drift
   from generation 0. The collapse guard (`reports.CollapseGuard`) reads the
   report and warns or stops. The last generation is only reported.
2. Sample. M_g draws `sampling.group_size` completions for each of
   `prompts_per_generation` fresh prompts of the task pool (`rollout`).
3. Judge. The verifier pool (a `rewards.VerifierReward`) marks each
   completion correct or not. Beside it,
   or instead of it, a reward that needs no verifier: agreement with the
   group's majority answer ("self_consistency"), or a reward source such as
   a reward model ("fn", `rewards.RewardSource`).
4. Select. Per prompt, `verified` keeps only correct completions (off: the
   model's own outputs, right or wrong); then up to `keep_per_prompt` of them:
   "all", the most "likely" (summed log-prob), the best "reward", or "diverse"
   (one per distinct answer, rarest answers first, so a rare verified answer
   survives).
5. Train M_{g+1} from M_g, `train_steps` updates on batches drawn from the
   training pool (`data_policy` "replace": generation g's selection only;
   "accumulate": the selections of all generations so far), each batch holding
   a fixed fraction `seed_fraction` of seed ("human") examples with their gold
   answers. The update is the one jitted step: `method` "sft" is expert
   iteration (rejection-sampling fine-tuning: `objectives.sft`, the
   likelihood of the selected completions); "grpo" is the GRPO-family
   objective of `loss`, with group advantages of the training reward (verifier score when
   `verified`, plus `reward_weight` times the other reward) and the sampler's
   log-probs as the old policy; seed rows enter it with advantage
   `seed_advantage` and the current policy's log-probs as the old ones, so
   their gradient is the likelihood gradient.

`GenerationsConfig` is read at this edge (`run_generations`); the pieces below
it take explicit values: judging, selection and the data policy are pure
host-side functions in `selfplay.selection`, the report measures and the guard
live in `selfplay.reports`.
"""

from __future__ import annotations

import dataclasses
import time
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool, Float, Int

from ouroboros_jax.algorithms import compute_advantages
from ouroboros_jax.config import (
    LOSS_PRESETS,
    ConfigError,
    LossConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    SamplingConfig,
    check_micro_batch,
    save_json,
)
from ouroboros_jax.evaluation import pass_at_k
from ouroboros_jax.models.logprobs import policy_logprobs
from ouroboros_jax.models.transformer import Params, param_specs
from ouroboros_jax.objectives import sft
from ouroboros_jax.rewards import Completions, RewardSource, VerifierReward
from ouroboros_jax.rollout import Rollout, RolloutSettings, concat_rollouts, sample_and_score
from ouroboros_jax.selfplay.reports import (
    CollapseGuard,
    ReportWriter,
    answer_diversity,
    final_answer,
    format_report,
    grouped_distinct_n,
)
from ouroboros_jax.selfplay.selection import (
    DATA_POLICIES,
    REWARDS,
    SELECTIONS,
    DataPolicy,
    Row,
    Selection,
    TrainingReward,
    compose_batch,
    rows_to_batch,
    select_group,
    training_pool,
    training_rewards,
)
from ouroboros_jax.sharding import batch_shards, make_mesh
from ouroboros_jax.step import init_train_state, make_train_step
from ouroboros_jax.trainer import optimizer_from_config, policy_objective, rollout_settings

Method = Literal["sft", "grpo"]
METHODS: tuple[str, ...] = typing.get_args(Method)
SCORE_ROWS = 128  # rows per forward of the scoring program (the last chunk is padded: one compile)


class CollapseWarning(UserWarning):
    """The collapse guard tripped with action "warn"."""


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"generations.{name}: {rule} (got {value!r})")


@dataclass(frozen=True)
class GenerationsConfig:
    """The generations loop: sampling, judging, selection, data policy, training, reports, guard.

    Sampling and the optimizer are the experiment's own sections, composed:
    `sampling.group_size` completions per prompt, `sampling.max_new_tokens`,
    temperature / top-p / top-k, prompt buckets, and the evaluation's
    `sampling.eval_num_samples` at `sampling.eval_temperature` (0: the sampling
    temperature); `optimizer` is the update's AdamW. `micro_batch_size` is rows
    per micro-batch of a training batch (0: the whole batch), as everywhere.
    """

    generations: int = 8
    prompts_per_generation: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    method: Method = "sft"
    verified: bool = True
    reward: TrainingReward = "none"
    reward_weight: float = 1.0
    selection: Selection = "all"
    keep_per_prompt: int = 0
    data_policy: DataPolicy = "accumulate"
    seed_fraction: float = 0.0
    seed_advantage: float = 1.0
    train_steps: int = 50
    batch_size: int = 64
    micro_batch_size: int = 0
    # b2 = 0.99: short runs of a few hundred updates, where the 0.999 default's second moment lags.
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(learning_rate=1e-5, b2=0.99))
    loss: LossConfig = field(default_factory=lambda: dataclasses.replace(LOSS_PRESETS["grpo"], kl_coef=0.0))
    eval_k: int = 8
    batch_prompts: int = 64
    verifier_workers: int = 1
    verifier_timeout_s: float = 10.0
    guard: CollapseGuard = field(default_factory=CollapseGuard)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("generations", "prompts_per_generation", "train_steps", "batch_size", "eval_k",
                     "batch_prompts", "verifier_workers"):
            _check(getattr(self, name) > 0, name, "must be positive", getattr(self, name))
        for name, choices in (("method", METHODS), ("data_policy", DATA_POLICIES),
                              ("selection", SELECTIONS), ("reward", REWARDS)):
            value = getattr(self, name)
            _check(value in choices, name, f"must be one of {list(choices)}", value)
        _check(0 <= self.seed_fraction <= 1, "seed_fraction", "must be in [0, 1]", self.seed_fraction)
        _check(self.keep_per_prompt >= 0, "keep_per_prompt", "must be >= 0 (0: every one selected)",
               self.keep_per_prompt)
        samples = self.sampling.eval_num_samples
        _check(self.eval_k <= samples, "eval_k", f"must be <= sampling.eval_num_samples={samples}",
               self.eval_k)
        check_micro_batch(self.micro_batch_size, self.batch_size, "generations.micro_batch_size",
                          "generations.batch_size")
        if self.method == "grpo":
            _check(self.verified or self.reward != "none", "reward",
                   "an unverified GRPO loop needs a reward other than the verifier", self.reward)
            _check(self.sampling.temperature > 0, "sampling.temperature",
                   "GRPO needs sampled groups (temperature > 0)", self.sampling.temperature)
        if self.selection == "reward":
            _check(self.verified or self.reward != "none", "selection",
                   "'reward' ranks by the training reward, which is empty when unverified with reward "
                   "'none'", self.selection)


@dataclass
class GenerationTask:
    """What the loop needs beyond the config.

    Attributes:
      pool: the task pool, a prompt source with `take(n)` (fresh prompts each generation).
      encode: examples -> prompt token ids.
      decode: completion token ids -> text for the verifier.
      answer_ids: example -> its gold answer's token ids, stop token included
        (seed rows and the anchor set).
      verifier: a verifier spec for `verifiers.VerifierPool` (a registered name,
        a picklable callable, or {name: weight}).
      stop_token_ids: tokens that end a completion.
      eval_examples: held-out examples for pass@k and the diversity measures.
      anchor_examples: a fixed set whose gold answers' likelihood is tracked.
      seed_source: seed ("human") examples with gold answers, `take(n)`; needed
        when `seed_fraction` > 0.
    """

    pool: Any
    encode: Callable[[Sequence[Any]], list[list[int]]]
    decode: Callable[[Sequence[int]], str]
    answer_ids: Callable[[Any], list[int]]
    verifier: Any
    stop_token_ids: tuple[int, ...]
    eval_examples: Sequence[Any]
    anchor_examples: Sequence[Any]
    seed_source: Any = None


@dataclass
class GenerationsResult:
    """The last model, the reports (report g describes M_g), whether the guard stopped the loop, and
    where the reports went."""

    params: Params
    reports: list[dict[str, Any]]
    stopped: bool
    run_dir: Path


# ---------------------------------------------------------------------------
# Scoring with the model: anchor likelihood, entropy, old log-probs

_logprobs = jax.jit(policy_logprobs,
                    static_argnames=("model_config", "temperature", "chunk_size", "with_entropy", "start"))


def token_stats(
    params: Params, model_config: ModelConfig, tokens: Int[np.ndarray, "B T"],
    attention: Bool[np.ndarray, "B T"], *, temperature: float = 1.0, start: int = 0,
) -> tuple[Float[np.ndarray, "B T"], Float[np.ndarray, "B T"]]:
    """Per-token log-probs and entropies (aligned with the tokens, as `policy_logprobs`), on the host.

    Rows run in chunks of SCORE_ROWS, the last padded, so any row count reuses one program per width.
    """
    B = tokens.shape[0]
    padded = -(-B // SCORE_ROWS) * SCORE_ROWS
    tokens = np.pad(tokens, ((0, padded - B), (0, 0)))
    attention = np.pad(attention, ((0, padded - B), (0, 0)))
    attention[B:, 0] = True  # a pad row with one real token keeps its softmax finite
    logps, ents = [], []
    for s in range(0, padded, SCORE_ROWS):
        logp, ent = _logprobs(params, model_config, tokens[s:s + SCORE_ROWS], attention[s:s + SCORE_ROWS],
                              temperature=temperature, start=start)
        logps.append(logp)
        ents.append(ent)
    logp, ent = jax.device_get((logps, ents))
    return np.concatenate(logp)[:B], np.concatenate(ent)[:B]


def anchor_loglik(params: Params, model_config: ModelConfig, prompts: Sequence[Sequence[int]],
                  answers: Sequence[Sequence[int]]) -> float:
    """Mean per-token log-likelihood of `answers` given `prompts` (teacher forcing, temperature 1)."""
    rows = [Row(tuple(p), tuple(a)) for p, a in zip(prompts, answers, strict=True)]
    batch = rows_to_batch(rows)
    logp, _ = token_stats(params, model_config, batch.tokens, batch.attention_mask)
    return float(logp[batch.loss_mask].mean())


# ---------------------------------------------------------------------------
# Sampling and evaluation


def _sample(params, model_config, examples, prompt_ids, *, settings: RolloutSettings, decode,
            reward: RewardSource, rng: jax.Array, batch_prompts: int, mesh) -> Rollout:
    """`sample_and_score` over chunks of `batch_prompts` prompts, joined into one rollout."""
    parts = [sample_and_score(params, model_config, examples[s:s + batch_prompts],
                              prompt_ids[s:s + batch_prompts], settings=settings, decode=decode,
                              reward=reward, rng=jax.random.fold_in(rng, s), mesh=mesh)
             for s in range(0, len(examples), batch_prompts)]
    return concat_rollouts(parts)


def _completions(r: Rollout) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in row[:n]) for row, n in zip(r.sample.tokens, r.sample.lengths, strict=True)]


def evaluate_generation(
    params: Params, model_config: ModelConfig, examples: Sequence[Any], prompt_ids: Sequence[Sequence[int]],
    *, settings: RolloutSettings, decode, reward: RewardSource, rng: jax.Array, k: int,
    batch_prompts: int = 64, mesh: Any = None,
) -> dict[str, float]:
    """pass@1, pass@k, distinct-1/2, mean token entropy, answer diversity and mean length of samples
    (correctness and answers from `reward`, a verifier source)."""
    r = _sample(params, model_config, list(examples), list(prompt_ids), settings=settings, decode=decode,
                reward=reward, rng=rng, batch_prompts=batch_prompts, mesh=mesh)
    n = settings.group_size
    completions = _completions(r)
    tokens, attention = r.sample.sequences()
    P = r.sample.prompt_tokens.shape[1]
    _, entropy = token_stats(params, model_config, tokens, attention, temperature=settings.temperature or 1.0,
                             start=P)
    return {
        "pass@1": float(r.correct.mean()),
        f"pass@{k}": float(np.mean([pass_at_k(n, int(c), k) for c in r.correct.sum(1)])),
        "distinct-1": grouped_distinct_n(completions, n, 1),
        "distinct-2": grouped_distinct_n(completions, n, 2),
        "entropy": float(entropy[:, P:][attention[:, P:]].mean()),
        "answer_diversity": answer_diversity([final_answer(v) for v in r.verdicts], n),
        "length": float(np.mean(r.sample.lengths)),
    }


def _generation_rows(r: Rollout, rewards: np.ndarray, advantages: np.ndarray,
                     generation: int) -> list[list[Row]]:
    """[B][G] rows of one generation's samples."""
    B, G = rewards.shape
    completions = _completions(r)
    out = []
    for i in range(B):
        prompt = tuple(int(t) for t in r.sample.prompt_tokens[i * G][r.sample.prompt_mask[i * G]])
        group = []
        for j in range(G):
            row = i * G + j
            token_logp = r.sample.policy_logprobs[row, :len(completions[row])]
            group.append(Row(prompt, completions[row], final_answer(r.verdicts[row]), bool(r.correct[i, j]),
                             float(rewards[i, j]), float(advantages[i, j]), float(token_logp.sum()),
                             tuple(float(x) for x in token_logp), generation))
        out.append(group)
    return out


# ---------------------------------------------------------------------------
# The loop (reads the config: an edge)


def _make_update(cfg: GenerationsConfig, model_config: ModelConfig, params: Params, mesh: Any):
    optimizer = optimizer_from_config(cfg.optimizer, total_steps=cfg.generations * cfg.train_steps)
    if cfg.method == "sft":
        objective = sft(model_config)
    else:
        objective = policy_objective(model_config, cfg.loss, max_completion_len=cfg.sampling.max_new_tokens,
                                     temperature=cfg.sampling.temperature)
    step_fn, shardings = make_train_step(objective, optimizer, mesh, param_specs(model_config),
                                         micro_batch_size=cfg.micro_batch_size)
    # a copy: the step donates its state, and the caller keeps `params`
    state = init_train_state(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(cfg.seed),
                             with_reference=objective.uses_reference, shardings=shardings)
    return step_fn, state


def _seed_rows(task: GenerationTask, n: int, *, cfg: GenerationsConfig, params: Params,
               model_config: ModelConfig) -> list[Row]:
    """`n` seed examples as rows; under GRPO their old log-probs are the current policy's."""
    examples = task.seed_source.take(n)
    rows = [Row(tuple(p), tuple(task.answer_ids(ex)), correct=True, reward=1.0, advantage=cfg.seed_advantage)
            for p, ex in zip(task.encode(examples), examples, strict=True)]
    if cfg.method != "grpo":
        return rows
    batch = rows_to_batch(rows)
    logp, _ = token_stats(params, model_config, batch.tokens, batch.attention_mask,
                          temperature=cfg.sampling.temperature)
    return [dataclasses.replace(r, token_logp=tuple(float(x) for x in logp[i][batch.loss_mask[i]]))
            for i, r in enumerate(rows)]


def _stops(cfg: GenerationsConfig, task: GenerationTask) -> tuple[int, ...]:
    return tuple(sorted({*cfg.sampling.stop_token_ids, *task.stop_token_ids}))


def _sample_generation(cfg, model_config, params, task, verifier, reward_source, mesh, g):
    """Sample, judge and select generation g; returns the selected rows and the pool's statistics."""
    examples = task.pool.take(cfg.prompts_per_generation)
    settings = rollout_settings(cfg.sampling, cfg.loss, stop_token_ids=_stops(cfg, task))
    r = _sample(params, model_config, examples, task.encode(examples), settings=settings, decode=task.decode,
                reward=verifier, rng=jax.random.fold_in(jax.random.key(cfg.seed), 2 * g + 1),
                batch_prompts=cfg.batch_prompts, mesh=mesh)
    G = cfg.sampling.group_size
    answers = [[final_answer(v) for v in r.verdicts[i * G:(i + 1) * G]] for i in range(len(examples))]
    fn_scores = None
    if cfg.reward == "fn":
        if reward_source is None:
            raise ValueError("generations.reward is 'fn' but run_generations got no reward_source")
        fn_scores = reward_source(Completions(r.sample, r.texts, examples)).rewards
    rewards = training_rewards(r.rewards, answers, verified=cfg.verified, reward=cfg.reward,
                               weight=cfg.reward_weight, fn_scores=fn_scores)
    advantages = (np.asarray(compute_advantages(rewards.astype(np.float32), mode=cfg.loss.advantage))
                  if cfg.method == "grpo" else np.ones_like(rewards))
    selected = [row for group in _generation_rows(r, rewards, advantages, g)
                for row in select_group(group, selection=cfg.selection, keep=cfg.keep_per_prompt,
                                        verified=cfg.verified)]
    stats = {"pool/pass@1": float(r.correct.mean()), "pool/reward": float(rewards.mean()),
             "pool/kept": float(len(selected)),
             "pool/kept_correct_frac": float(np.mean([s.correct for s in selected])) if selected else 0.0}
    return selected, stats


def _train_round(cfg, model_config, step_fn, state, pool_rows, task, g):
    """`train_steps` updates on batches of the training pool mixed with seed rows."""
    rng = np.random.default_rng([cfg.seed, g])
    metrics, seed_rows = [], 0
    use_seed = task.seed_source is not None and cfg.seed_fraction > 0
    for _ in range(cfg.train_steps):
        take_seed = None
        if use_seed:  # bound to this step's params: GRPO scores seed rows under the current policy
            take_seed = lambda n, p=state.params: _seed_rows(task, n, cfg=cfg, params=p,
                                                             model_config=model_config)
        rows = compose_batch(pool_rows, take_seed, cfg.batch_size, cfg.seed_fraction, rng)
        if not rows:
            break
        seed_rows += sum(r.generation < 0 for r in rows)
        state, m = step_fn(state, rows_to_batch(rows))
        metrics.append(m)
    host = jax.device_get(metrics)
    stats = {"train/steps": float(len(host)), "train/pool_rows": float(len(pool_rows)),
             "train/seed_frac": seed_rows / max(len(host) * cfg.batch_size, 1)}
    if host:
        stats["train/loss"] = float(np.mean([m["loss"] for m in host]))
        stats["train/finite"] = float(min(m["finite"] for m in host))
    return state, stats


def run_generations(
    cfg: GenerationsConfig, *, model_config: ModelConfig, params: Params, task: GenerationTask,
    run_dir: str | Path, mesh: Any = None, reward_source: RewardSource | None = None, console: bool = True,
) -> GenerationsResult:
    """Run the generations loop of `cfg` from `params` (M_0); reports go to `run_dir`/reports.jsonl.

    Args:
      cfg: the loop's settings (read here, at the edge).
      model_config: the architecture of `params`.
      params: M_0 (not modified; the loop trains a copy).
      task: data, tokenisation, verifier, evaluation and anchor sets (see `GenerationTask`).
      run_dir: where the config and the reports go.
      mesh: the device mesh; default: every device on the fsdp axis.
      reward_source: the reward for `cfg.reward == "fn"` (a `rewards.RewardSource`, e.g. a reward model).
      console: print one line per generation.

    Returns:
      The last model, the reports (report g describes M_g; from g = 1 on it also
      carries the pool and training statistics of the round that built M_g), and
      whether the guard stopped the loop.
    """
    from verifiers import VerifierPool

    if cfg.seed_fraction > 0 and task.seed_source is None:
        raise ConfigError("generations.seed_fraction: > 0 needs seed data (task.seed_source is None)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(cfg, run_dir / "generations_config.json")
    mesh = mesh if mesh is not None else make_mesh(MeshConfig())
    shards = batch_shards(mesh)
    _check(cfg.batch_size % shards == 0, "batch_size",
           f"must be a multiple of the mesh's {shards} batch shards", cfg.batch_size)
    step_fn, state = _make_update(cfg, model_config, params, mesh)
    eval_settings = rollout_settings(
        cfg.sampling, group_size=cfg.sampling.eval_num_samples, stop_token_ids=_stops(cfg, task),
        temperature=cfg.sampling.eval_temperature or cfg.sampling.temperature)
    eval_ids = task.encode(list(task.eval_examples))
    anchor = (task.encode(list(task.anchor_examples)), [task.answer_ids(ex) for ex in task.anchor_examples])
    writer = ReportWriter(run_dir)
    reports: list[dict[str, Any]] = []
    history: list[list[Row]] = []
    round_stats: dict[str, float] = {}
    stopped = False
    pool = VerifierPool(task.verifier, workers=cfg.verifier_workers, timeout_s=cfg.verifier_timeout_s)
    verifier = VerifierReward(pool.score)
    try:
        for g in range(cfg.generations + 1):
            t0 = time.perf_counter()
            report: dict[str, Any] = {"generation": g}
            report |= evaluate_generation(
                state.params, model_config, task.eval_examples, eval_ids, settings=eval_settings,
                decode=task.decode, reward=verifier, rng=jax.random.fold_in(jax.random.key(cfg.seed), 2 * g),
                k=cfg.eval_k, batch_prompts=cfg.batch_prompts, mesh=mesh)
            report["anchor_logp"] = anchor_loglik(state.params, model_config, *anchor)
            baseline = reports[0] if reports else report
            report["anchor_drift"] = report["anchor_logp"] - baseline["anchor_logp"]
            report |= round_stats
            guard = cfg.guard.check(report, baseline)
            report |= {"guard/status": guard.status, "guard/reasons": list(guard.reasons),
                       "time/eval": time.perf_counter() - t0}
            writer.write(report)
            reports.append(report)
            if console:
                print(format_report(report, cfg.generations), flush=True)
            if guard.status == "warn":
                warnings.warn(f"collapse guard, generation {g}: {'; '.join(guard.reasons)}", CollapseWarning,
                              stacklevel=2)
            if guard.status == "stop":
                stopped = True
                break
            if g == cfg.generations:
                break
            t1 = time.perf_counter()
            selected, round_stats = _sample_generation(cfg, model_config, state.params, task, verifier,
                                                       reward_source, mesh, g)
            history.append(selected)
            t2 = time.perf_counter()
            state, train_stats = _train_round(cfg, model_config, step_fn, state,
                                              training_pool(history, cfg.data_policy), task, g)
            round_stats |= train_stats | {"time/sample": t2 - t1, "time/train": time.perf_counter() - t2}
    finally:
        pool.close()
        writer.close()
    return GenerationsResult(state.params, reports, stopped, run_dir)
