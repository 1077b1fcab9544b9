"""Learned reward models: Bradley-Terry training on preference pairs, and their use as RL rewards.

Training. A reward model is the decoder backbone with a scalar head
(`models.reward`), scored at the last real token of prompt + response. On
batches of pairs (`batch.pack_pairs`) the one update step
(`step.make_train_step`) minimises the `objectives.bradley_terry` objective.
Parameters and optimizer moments are sharded like the policy's under the one
rules table (`models.param_specs(..., head="score")`); held-out pairs
give the pairwise accuracy. Checkpoints are Hugging Face
...ForSequenceClassification directories (`save_reward_model` / `load_reward_model`).

Use in RL. `ModelReward` is a `trainer.Task.reward_model`: it scores the
sampled rows with one reward model or an ensemble (mean, with the members'
standard deviation reported as uncertainty and optionally subtracted,
``mean - penalty * std``; Coste et al. 2023, arXiv 2310.02743). `PARReward`
shapes any such reward into Preference As Reward (Fu et al. 2025, "Reward
Shaping to Mitigate Reward Hacking in RLHF", arXiv 2502.18770):
``mean_m sigmoid(r - r_ref_m)`` over reference responses m of the same
prompt, a bounded reward centred on the reference. `RewardHackingTracker`
flags the pattern a user watches for: the proxy reward rising while verified
accuracy on an anchor set falls.

Dimension legend: B prompts (or pairs), G samples per prompt, M reference
responses per prompt, E ensemble members, R rows (B * G), T time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Float

from ouroboros_jax.algorithms import bradley_terry_loss
from ouroboros_jax.batch import EncodedPairs, pack_pairs, pair_widths
from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.models.hf import export_hf_checkpoint, load_hf_checkpoint
from ouroboros_jax.models.reward import reward_scores
from ouroboros_jax.models.safetensors_io import CheckpointError
from ouroboros_jax.models.transformer import Params, param_shardings, param_specs
from ouroboros_jax.objectives import bradley_terry
from ouroboros_jax.rollout import RewardFn
from ouroboros_jax.sampling import DEFAULT_PROMPT_LEN_BUCKETS, SampleOutput, generate
from ouroboros_jax.selfplay.preference import epoch_batches
from ouroboros_jax.sharding import batch_sharding, batch_shards, make_mesh, replicated
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step

Metrics = dict[str, Float[Array, ""]]

# ---------------------------------------------------------------------------
# Parameters and checkpoints


def init_reward_model(backbone: Params, rng: jax.Array, *, scale: float = 0.02) -> Params:
    """A reward model from a policy's backbone: its output head dropped, a new scalar head `score_D`."""
    params = {k: v for k, v in backbone.items() if k not in ("lm_head_DV", "score_D")}
    D = backbone["embed_VD"].shape[1]
    params["score_D"] = (scale * jax.random.normal(rng, (D,), jnp.float32)).astype(backbone["embed_VD"].dtype)
    return jax.tree.map(jnp.copy, params)


def save_reward_model(params: Params, model_config: ModelConfig, path: str | os.PathLike[str], *,
                      pad_token_id: int = 0, dtype: str | None = None) -> Path:
    """Write a Hugging Face ...ForSequenceClassification checkpoint (num_labels=1)."""
    if "score_D" not in params:
        raise CheckpointError("save_reward_model: params have no score head 'score_D' (not a reward model)")
    return export_hf_checkpoint(params, model_config, path, dtype=dtype,
                                extra_config={"pad_token_id": pad_token_id})


def load_reward_model(path: str | os.PathLike[str], *, dtype: str = "float32",
                      mesh: Mesh | None = None) -> tuple[ModelConfig, Params]:
    """Load a reward-model checkpoint (sharded straight onto `mesh` when given)."""
    cfg, params = load_hf_checkpoint(path, dtype=dtype, mesh=mesh)
    if "score_D" not in params:
        raise CheckpointError(f"{path}: a causal-LM checkpoint, not a reward model (no score head)")
    return cfg, params


# ---------------------------------------------------------------------------
# The training step


def make_reward_scorer(model_config: ModelConfig, mesh: Mesh | None = None):
    """A compiled scoring program: `score(params, tokens [R, T], mask [R, T]) -> numpy [R]`.

    With a mesh, rows are padded up to a multiple of the batch shards and the
    parameters read in their reward-model shardings.
    """
    fn = lambda params, tokens, mask: reward_scores(params, model_config, tokens, mask)
    if mesh is None:
        jitted, shards = jax.jit(fn), 1
    else:
        rows = batch_sharding(mesh)
        jitted = jax.jit(fn, in_shardings=(param_shardings(model_config, mesh, head="score"), rows, rows),
                         out_shardings=replicated(mesh))
        shards = batch_shards(mesh)

    def score(params: Params, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        R = tokens.shape[0]
        pad = -R % shards
        if pad:
            tokens = np.pad(np.asarray(tokens), ((0, pad), (0, 0)))
            mask = np.pad(np.asarray(mask), ((0, pad), (0, 0)))
            mask[R:, -1] = True  # padding rows score one pad token, never an empty row
        return np.asarray(jitted(params, tokens, mask))[:R]

    return score


# ---------------------------------------------------------------------------
# Training and evaluation


@dataclasses.dataclass
class RewardModelResult:
    params: Params
    history: list[dict[str, float]]
    evals: list[dict[str, float]]


def evaluate_reward_model(
    params: Params, model_config: ModelConfig, pairs: EncodedPairs, *, widths: tuple[int, int] | None = None,
    batch_size: int = 64, scorer: Callable | None = None, mesh: Mesh | None = None,
) -> dict[str, float]:
    """Pairwise accuracy (chosen scored strictly above rejected), loss and mean margin on `pairs`."""
    scorer = scorer or make_reward_scorer(model_config, mesh)
    P, C = widths or pair_widths(pairs)
    chosen, rejected = [], []
    for start in range(0, pairs.size, batch_size):
        rows = range(start, min(start + batch_size, pairs.size))
        b = pack_pairs(pairs.take(rows), prompt_width=P, completion_width=C, num_rows=batch_size)
        n = len(rows)
        chosen.append(scorer(params, b.chosen_tokens, b.chosen_mask)[:n])
        rejected.append(scorer(params, b.rejected_tokens, b.rejected_mask)[:n])
    scores = [jnp.asarray(np.concatenate(side)) for side in (chosen, rejected)]
    _, metrics = bradley_terry_loss(*scores)
    return {k: float(v) for k, v in metrics.items()}


def train_reward_model(
    params: Params, model_config: ModelConfig, train_pairs: EncodedPairs,
    heldout_pairs: EncodedPairs | None = None, *, steps: int, batch_size: int, learning_rate: float,
    center_coef: float = 0.0, mesh: Mesh | None = None, seed: int = 0, eval_every: int = 0,
    optimizer: optax.GradientTransformation | None = None, log_every: int = 0,
) -> RewardModelResult:
    """Bradley-Terry training for `steps` updates of `batch_size` pairs, with held-out accuracy.

    Args:
      params: initial reward-model parameters (with `score_D`; see `init_reward_model`).
      train_pairs, heldout_pairs: encoded pairs (`preference.encode_pairs`).
      eval_every: evaluate on the held-out pairs every this many steps (0: at the end only).
      mesh: default: every device on the fsdp axis; `batch_size` must divide over data * fsdp.
      optimizer: default AdamW at `learning_rate` (b2 = 0.99).

    Returns:
      The trained parameters, per-step metrics, and held-out evaluations
      (`step`, `accuracy`, `loss`, `score_margin`, ...).
    """
    if "score_D" not in params:
        raise ValueError("train_reward_model: params have no score head 'score_D' (use init_reward_model)")
    mesh = mesh if mesh is not None else make_mesh(MeshConfig())
    optimizer = optimizer or make_optimizer(learning_rate, b2=0.99)
    objective = bradley_terry(model_config, center_coef=center_coef)
    step_fn, shardings = make_train_step(objective, optimizer, mesh, param_specs(model_config, head="score"))
    state = init_train_state(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(seed),
                             shardings=shardings)
    everything = train_pairs if heldout_pairs is None else EncodedPairs(
        *[a + b for a, b in zip(train_pairs, heldout_pairs, strict=True)])
    P, C = pair_widths(everything)
    rows_of = epoch_batches(train_pairs.size, batch_size, seed)
    scorer = make_reward_scorer(model_config, mesh) if heldout_pairs is not None else None
    collected, evals = [], []
    for i in range(steps):
        batch = pack_pairs(train_pairs.take(rows_of(i)), prompt_width=P, completion_width=C,
                           num_rows=batch_size)
        state, metrics = step_fn(state, batch)
        collected.append(metrics)
        done = i + 1
        if log_every and done % log_every == 0:
            print(f"reward model step {done}: loss {float(metrics['loss']):.4f} "
                  f"accuracy {float(metrics['accuracy']):.3f}", flush=True)
        if heldout_pairs is not None and ((eval_every and done % eval_every == 0) or done == steps):
            evals.append({"step": done} | evaluate_reward_model(
                state.params, model_config, heldout_pairs, widths=(P, C), batch_size=batch_size,
                scorer=scorer))
    history = [{k: float(v) for k, v in m.items()} for m in jax.device_get(collected)]
    return RewardModelResult(state.params, history, evals)


# ---------------------------------------------------------------------------
# Rewards for RL: ensembles, PAR


def ensemble_stats(
    scores_ER: Float[np.ndarray, "E R"],
) -> tuple[Float[np.ndarray, " R"], Float[np.ndarray, " R"]]:
    """Mean and (population, ddof=0) standard deviation over the ensemble axis: [E, R] -> [R], [R]."""
    scores_ER = np.asarray(scores_ER, np.float64)
    return scores_ER.mean(axis=0), scores_ER.std(axis=0)


def ensemble_penalty(scores_ER: Float[np.ndarray, "E R"], penalty: float) -> Float[np.ndarray, " R"]:
    """Uncertainty-penalised ensemble reward ``mean - penalty * std`` per row [R]."""
    mean, std = ensemble_stats(scores_ER)
    return mean - penalty * std


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, stable for large |x|."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def par_shaping(
    rewards_BG: Float[np.ndarray, "B G"], ref_rewards_BM: Float[np.ndarray, "B M"], *, center: str = "each",
) -> Float[np.ndarray, "B G"]:
    """Preference As Reward: the reward as a preference probability over reference responses.

    ``center="each"`` is the paper's ``mean_m sigmoid(r - r_ref_m)`` (Fu et al.
    2025, arXiv 2502.18770); ``center="mean"`` is ``sigmoid(r - mean_m r_ref_m)``.
    With one reference both are ``sigmoid(r - r_ref)``.

    Args:
      rewards_BG: the raw reward of each of G samples of B prompts.
      ref_rewards_BM: the raw reward of M reference responses per prompt.

    Returns:
      Shaped rewards [B, G] in (0, 1); 0.5 where a sample scores as its reference.
    """
    r = np.asarray(rewards_BG, np.float64)
    ref = np.asarray(ref_rewards_BM, np.float64)
    if r.ndim != 2 or ref.ndim != 2 or r.shape[0] != ref.shape[0]:
        raise ValueError(f"par_shaping: rewards {r.shape} and ref_rewards {ref.shape} "
                         "must be [B, G] and [B, M]")
    match center:
        case "each":
            return sigmoid(r[:, :, None] - ref[:, None, :]).mean(axis=2)
        case "mean":
            return sigmoid(r - ref.mean(axis=1, keepdims=True))
        case _:
            raise ValueError(f"par_shaping: unknown center {center!r}; expected 'each' or 'mean'")


@dataclasses.dataclass
class ModelReward:
    """A learned reward for `trainer.Task.reward_model`: one reward model, or an ensemble.

    Called with the sampled rows (`SampleOutput`: prompt and completion tokens)
    it returns one reward per row: the members' mean score, minus
    ``penalty * std`` over members (0: no penalty). The members share the
    policy's tokenizer. After each call `last_stats` holds the batch means of
    the ensemble mean, its disagreement (std) and the returned reward.

    Attributes:
      members: parameters of each reward model (a one-element list for one model).
      model_config: their architecture (shared).
      penalty: lambda of ``mean - lambda * std``.
      mesh: score on this mesh (parameters in their reward-model shardings).
    """

    members: Sequence[Params]
    model_config: ModelConfig
    penalty: float = 0.0
    mesh: Mesh | None = None
    last_stats: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("ModelReward: members is empty (give at least one reward model)")
        for i, m in enumerate(self.members):
            if "score_D" not in m:
                raise ValueError(f"ModelReward: member {i} has no score head 'score_D'")
        self._score = make_reward_scorer(self.model_config, self.mesh)

    def member_scores(self, sample: SampleOutput) -> np.ndarray:
        """Scores [E, R] of every member on every row."""
        tokens, mask = sample.sequences()
        return np.stack([self._score(p, tokens, mask) for p in self.members])

    def __call__(self, sample: SampleOutput, examples: Sequence[Any] = ()) -> np.ndarray:
        scores = self.member_scores(sample)
        mean, std = ensemble_stats(scores)
        reward = mean - self.penalty * std
        self.last_stats = {"reward_model/mean": float(mean.mean()), "reward_model/std": float(std.mean()),
                           "reward_model/reward": float(reward.mean())}
        return reward


def responses_as_sample(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *,
                        pad_id: int = 0) -> SampleOutput:
    """Fixed responses as a `SampleOutput` (prompts left-padded, responses right-padded, as sampled).

    Row r pairs `prompt_ids[r]` with `response_ids[r]`; log-prob fields are 0.
    A reward function of a `SampleOutput` then scores them like samples.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"responses_as_sample: {len(prompt_ids)} prompts but {len(response_ids)} responses")
    R = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    N = max(max(len(r) for r in response_ids), 1)
    prompts = np.full((R, P), pad_id, np.int32)
    prompt_mask = np.zeros((R, P), bool)
    tokens = np.full((R, N), pad_id, np.int32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        if not p or not r:
            raise ValueError(f"responses_as_sample: row {i} has an empty {'prompt' if not p else 'response'}")
        prompts[i, P - len(p):] = p
        prompt_mask[i, P - len(p):] = True
        tokens[i, :len(r)] = r
    lengths = np.array([len(r) for r in response_ids], np.int32)
    mask = np.arange(N)[None] < lengths[:, None]
    zeros = np.zeros((R, N), np.float32)
    return SampleOutput(tokens=tokens, mask=mask, logprobs=zeros, policy_logprobs=zeros, lengths=lengths,
                        truncated=np.zeros(R, bool), prompt_tokens=prompts, prompt_mask=prompt_mask, steps=0)


def gold_reference(encode: Callable[[Sequence[Any]], Sequence[Sequence[int]]],
                   answer_ids: Callable[[Any], Sequence[int]]) -> Callable[[Sequence[Any]], SampleOutput]:
    """A PAR reference of one response per prompt: the gold answer (`answer_ids(example)`)."""
    return lambda examples: responses_as_sample(encode(examples), [answer_ids(e) for e in examples])


def sampled_reference(
    params: Params, model_config: ModelConfig, encode: Callable[[Sequence[Any]], Sequence[Sequence[int]]], *,
    num_samples: int, max_new_tokens: int, stop_token_ids: Sequence[int] = (), temperature: float = 1.0,
    seed: int = 0, mesh: Mesh | None = None,
    prompt_len_buckets: Sequence[int] | None = DEFAULT_PROMPT_LEN_BUCKETS,
) -> Callable[[Sequence[Any]], SampleOutput]:
    """A PAR reference of `num_samples` responses per prompt drawn from the reference policy `params`.

    The draw is a function of `seed` and the ids of the examples asked for
    together, so a rerun asks for and gets the same references.
    """
    def sample(examples: Sequence[Any]) -> SampleOutput:
        ids = "\n".join(str(getattr(e, "id", i)) for i, e in enumerate(examples))
        rng = jax.random.fold_in(jax.random.key(seed), zlib.crc32(ids.encode()))
        return generate(params, model_config, [list(p) for p in encode(examples)],
                        max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature,
                        stop_token_ids=tuple(stop_token_ids), rng=rng, mesh=mesh,
                        prompt_len_buckets=prompt_len_buckets)

    return sample


@dataclasses.dataclass
class PARReward:
    """Preference As Reward around any row reward (`ModelReward`, or one with extra terms).

    For each prompt the reference responses (`reference(examples)`, rows
    prompt-major) are scored by the same `base` reward; each sample's reward
    becomes `par_shaping(r, r_ref)`. References are computed once per example
    id and cached (the reference policy and the reward model are frozen).

    After each call `last_stats` holds the mean raw reward, the mean reference
    reward and the mean shaped reward.
    """

    base: RewardFn
    reference: Callable[[Sequence[Any]], SampleOutput]
    center: str = "each"
    last_stats: dict[str, float] = dataclasses.field(default_factory=dict)
    _cache: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    def reference_rewards(self, examples: Sequence[Any]) -> np.ndarray:
        """Raw rewards [B, M] of each example's reference responses."""
        keys = [str(getattr(e, "id", "")) or repr(e) for e in examples]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            todo = [examples[i] for i in missing]
            ref = self.reference(todo)
            scores = np.asarray(self.base(ref, todo), np.float64).reshape(len(todo), -1)
            self._cache.update({keys[i]: s for i, s in zip(missing, scores, strict=True)})
        return np.stack([self._cache[k] for k in keys])

    def __call__(self, sample: SampleOutput, examples: Sequence[Any]) -> np.ndarray:
        B = len(examples)
        raw = np.asarray(self.base(sample, examples), np.float64).reshape(B, -1)
        ref = self.reference_rewards(examples)
        shaped = par_shaping(raw, ref, center=self.center)
        self.last_stats = {"par/raw_reward": float(raw.mean()), "par/reference_reward": float(ref.mean()),
                           "par/reward": float(shaped.mean())}
        return shaped.reshape(-1)


# ---------------------------------------------------------------------------
# Reward-hacking signals


def hacking_deltas(rewards: Sequence[float], accuracies: Sequence[float], window: int) -> tuple[float, float]:
    """Change of the mean proxy reward and of the mean verified accuracy between the
    last `window` points and the `window` points before them (NaN until 2 * window points)."""
    if len(rewards) != len(accuracies):
        raise ValueError(f"hacking_deltas: {len(rewards)} rewards but {len(accuracies)} accuracies")
    if window < 1:
        raise ValueError(f"hacking_deltas: window must be >= 1 (got {window})")
    if len(rewards) < 2 * window:
        return math.nan, math.nan
    r, a = np.asarray(rewards, np.float64), np.asarray(accuracies, np.float64)
    last, prev = slice(-window, None), slice(-2 * window, -window)
    return float(r[last].mean() - r[prev].mean()), float(a[last].mean() - a[prev].mean())


@dataclasses.dataclass
class RewardHackingTracker:
    """Flags reward hacking: the proxy reward going up while verified anchor accuracy goes down.

    Feed it `(step, proxy reward, verified accuracy on the anchor set)` as they
    come. A point is flagged when, between the last `window` points and the
    `window` before, the mean reward rose by more than `reward_rise` and the
    mean accuracy fell by more than `accuracy_drop`. `flagged_at` is the step of
    the first flag.
    """

    window: int = 3
    reward_rise: float = 0.0
    accuracy_drop: float = 0.05
    steps: list[int] = dataclasses.field(default_factory=list)
    rewards: list[float] = dataclasses.field(default_factory=list)
    accuracies: list[float] = dataclasses.field(default_factory=list)
    flagged_at: int | None = None

    def update(self, step: int, reward: float, accuracy: float) -> dict[str, float]:
        """Record one point; returns `hacking/reward_delta`, `hacking/accuracy_delta`, `hacking/flag`."""
        self.steps.append(int(step))
        self.rewards.append(float(reward))
        self.accuracies.append(float(accuracy))
        d_reward, d_accuracy = hacking_deltas(self.rewards, self.accuracies, self.window)
        flag = d_reward > self.reward_rise and d_accuracy < -self.accuracy_drop
        if flag and self.flagged_at is None:
            self.flagged_at = int(step)
        return {"hacking/reward_delta": d_reward, "hacking/accuracy_delta": d_accuracy,
                "hacking/flag": float(flag)}
