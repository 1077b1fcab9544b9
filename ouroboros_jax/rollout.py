"""Prompts -> groups of completions -> rewards -> advantages -> a training batch.

The host side of one RL step. The sampler runs on the device; decoding to
text and verification run on the host (the verifier pool's worker processes);
the result is a `batch.Batch` whose rows are prompt + completion.

DAPO's trainer-side parts live here too: the soft overlong penalty (or masking
truncated completions out of the loss) and dynamic sampling, which drops groups
whose rewards are all equal and samples more prompts until the batch is full.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ouroboros_jax.algorithms import compute_advantages
from ouroboros_jax.batch import Batch, pack_rows
from ouroboros_jax.config import ModelConfig
from ouroboros_jax.sampling import DEFAULT_PROMPT_LEN_BUCKETS, SampleOutput, generate

# (completions, examples) -> list of verdicts with .score and .correct
ScoreFn = Callable[[Sequence[str], Sequence[Mapping[str, Any]]], Sequence[Any]]
# (sampled completions, examples) -> one reward per row [B*G], e.g. a learned reward model
RewardFn = Callable[[SampleOutput, Sequence[Any]], np.ndarray]


def overlong_penalty(lengths: np.ndarray, max_len: int, buffer: int, penalty: float = 1.0) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), measured in tokens.

    0 while a completion is at most `max_len - buffer` tokens long, then falling
    linearly to `-penalty` at `max_len` (and below it past `max_len`).
    """
    over = np.asarray(lengths, np.float64) - (max_len - buffer)
    return np.where(over <= 0, 0.0, -penalty * np.minimum(over / buffer, 1.0))


def informative_groups(rewards_BG: np.ndarray, atol: float = 1e-6) -> np.ndarray:
    """True for groups whose rewards are not all equal (they carry a gradient)."""
    return np.ptp(rewards_BG, axis=1) > atol


@dataclasses.dataclass
class Rollout:
    """One batch of groups: prompts, completions, verdicts, rewards, advantages.

    Rows are prompt-major: row i*G + j is sample j of prompt i.
    """

    examples: list[Any]
    sample: SampleOutput
    texts: list[str]
    verdicts: list[Any]
    rewards: np.ndarray  # [B, G] verifier scores plus shaping
    correct: np.ndarray  # [B, G] bool
    advantages: np.ndarray  # [B, G]
    loss_rows: np.ndarray  # [B*G] bool: rows that enter the loss (overlong masking)
    groups_drawn: int = 0

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    def take_groups(self, keep: np.ndarray) -> Rollout:
        """The rollout restricted to the groups selected by index array `keep`."""
        G = self.group_size
        rows = (keep[:, None] * G + np.arange(G)[None]).reshape(-1)
        sample = SampleOutput(*[np.asarray(f)[rows] if isinstance(f, np.ndarray) else f for f in self.sample])
        return Rollout(
            examples=[self.examples[i] for i in keep], sample=sample,
            texts=[self.texts[r] for r in rows], verdicts=[self.verdicts[r] for r in rows],
            rewards=self.rewards[keep], correct=self.correct[keep], advantages=self.advantages[keep],
            loss_rows=self.loss_rows[rows], groups_drawn=self.groups_drawn)

    def to_batch(self) -> Batch:
        """The training batch in the sampler's (split) layout: prompt + completion per row, the
        sampler's log-probs as the old policy, `loss_start` at the prompt bucket's width."""
        s = self.sample
        lengths = np.asarray(s.lengths)
        return pack_rows(
            [p[m] for p, m in zip(s.prompt_tokens, s.prompt_mask, strict=True)],
            [t[:n] for t, n in zip(s.tokens, lengths, strict=True)],
            completion_logp=[lp[:n] for lp, n in zip(s.policy_logprobs, lengths, strict=True)],
            advantages=self.advantages.reshape(-1), loss_rows=self.loss_rows,
            prompt_width=s.prompt_tokens.shape[1], completion_width=s.tokens.shape[1])


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """Groups of several rollouts side by side (their prompt buckets padded to one width)."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.sample.prompt_tokens.shape[1] for p in parts)
    samples = []
    for p in parts:
        pad = P - p.sample.prompt_tokens.shape[1]
        s = p.sample
        samples.append(s._replace(prompt_tokens=np.pad(s.prompt_tokens, ((0, 0), (pad, 0))),
                                  prompt_mask=np.pad(s.prompt_mask, ((0, 0), (pad, 0)))))
    fields = {}
    for name in SampleOutput._fields:
        values = [getattr(s, name) for s in samples]
        fields[name] = np.concatenate(values) if isinstance(values[0], np.ndarray) else max(values)
    return Rollout(
        examples=[e for p in parts for e in p.examples], sample=SampleOutput(**fields),
        texts=[t for p in parts for t in p.texts], verdicts=[v for p in parts for v in p.verdicts],
        rewards=np.concatenate([p.rewards for p in parts]),
        correct=np.concatenate([p.correct for p in parts]),
        advantages=np.concatenate([p.advantages for p in parts]),
        loss_rows=np.concatenate([p.loss_rows for p in parts]),
        groups_drawn=sum(p.groups_drawn for p in parts))


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """Explicit values for `collect` (built from the config at the edge)."""

    group_size: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    prompt_len_buckets: tuple[int, ...] = DEFAULT_PROMPT_LEN_BUCKETS
    advantage: str = "grpo"
    overlong: str = "none"
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0


def sample_and_score(
    params: Any, model_config: ModelConfig, examples: Sequence[Any], prompt_ids: Sequence[Sequence[int]],
    *, settings: RolloutSettings, decode: Callable[[Sequence[int]], str], score: ScoreFn, rng: jax.Array,
    mesh: Any = None, timings: dict[str, float] | None = None, reward_fn: RewardFn | None = None,
    reward_weight: float = 1.0, verifier_weight: float = 1.0,
) -> Rollout:
    """Sample G completions per prompt, verify them, and compute shaped rewards and advantages.

    The reward is `verifier_weight * verifier score`, plus `reward_weight *
    reward_fn(sample, examples)` when a model-based reward is given (e.g.
    `selfplay.reward_model.ModelReward`); `correct` always comes from the verifier.
    """
    s = settings
    t0 = time.perf_counter()
    out = generate(params, model_config, list(prompt_ids), max_new_tokens=s.max_new_tokens,
                   num_samples=s.group_size, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                   stop_token_ids=s.stop_token_ids, rng=rng, mesh=mesh,
                   prompt_len_buckets=s.prompt_len_buckets)
    t1 = time.perf_counter()
    rows = zip(out.tokens, out.lengths, strict=True)
    texts = [decode(strip_stop(row[:n], s.stop_token_ids)) for row, n in rows]
    golds = [ex.gold for ex in examples for _ in range(s.group_size)]
    verdicts = list(score(texts, golds))
    t2 = time.perf_counter()
    if timings is not None:
        timings["sample"] = timings.get("sample", 0.0) + t1 - t0
        timings["verify"] = timings.get("verify", 0.0) + t2 - t1
    B, G = len(examples), s.group_size
    rewards = verifier_weight * np.array([float(v.score) for v in verdicts], np.float64).reshape(B, G)
    correct = np.array([bool(v.correct) for v in verdicts]).reshape(B, G)
    if reward_fn is not None:
        model_rewards = np.asarray(reward_fn(out, examples), np.float64)
        if model_rewards.shape != (B * G,):
            raise ValueError(f"reward_fn returned shape {model_rewards.shape}; expected ({B * G},), "
                             "one reward per sampled row")
        rewards = rewards + reward_weight * model_rewards.reshape(B, G)
        if timings is not None:
            timings["reward_model"] = timings.get("reward_model", 0.0) + time.perf_counter() - t2
    loss_rows = np.ones(B * G, bool)
    if s.overlong == "shape":
        rewards = rewards + overlong_penalty(out.lengths, s.max_new_tokens, s.overlong_buffer,
                                             s.overlong_penalty).reshape(B, G)
    elif s.overlong == "mask":
        loss_rows = ~np.asarray(out.truncated)
    advantages = np.asarray(compute_advantages(rewards.astype(np.float32), mode=s.advantage))
    return Rollout(list(examples), out, texts, verdicts, rewards, correct, advantages, loss_rows,
                   groups_drawn=B)


VERIFIER_ERRORS = ("verifier raised", "verifier process died", "verdict cannot be pickled",
                   "example cannot be pickled")


def is_verifier_error(verdict: Any) -> bool:
    """A verdict that records a crashed or raising verifier (scored 0, counted, never fatal)."""
    return str(getattr(verdict, "reason", "")).startswith(VERIFIER_ERRORS)


def strip_stop(tokens: np.ndarray, stop_token_ids: Sequence[int]) -> np.ndarray:
    """A completion without its final stop token (the verifier sees text only)."""
    if len(tokens) and int(tokens[-1]) in stop_token_ids:
        return tokens[:-1]
    return tokens


def collect(
    next_examples: Callable[[int], Sequence[Any]], encode: Callable[[Sequence[Any]], Sequence[Sequence[int]]],
    params: Any, model_config: ModelConfig, *, num_prompts: int, settings: RolloutSettings,
    decode: Callable[[Sequence[int]], str], score: ScoreFn, rng: jax.Array, dynamic_sampling: bool = False,
    max_rounds: int = 3, mesh: Any = None, timings: dict[str, float] | None = None,
    reward_fn: RewardFn | None = None, reward_weight: float = 1.0, verifier_weight: float = 1.0,
) -> Rollout:
    """One rollout batch of `num_prompts` groups.

    With dynamic sampling (DAPO), groups whose rewards are all equal are
    dropped and more prompts are drawn, for at most `max_rounds` rounds. If the
    batch is still short after that, it is filled with dropped groups (they
    have zero advantage, so they add no gradient) to keep shapes, and thus the
    compiled programs, fixed. `groups_drawn` counts every group sampled.
    `reward_fn`, `reward_weight` and `verifier_weight` are as in `sample_and_score`.
    """
    kept: list[Rollout] = []
    spare: list[Rollout] = []
    have, drawn = 0, 0
    for round_ in range(max_rounds if dynamic_sampling else 1):
        want = num_prompts - have
        examples = list(next_examples(want))
        part = sample_and_score(params, model_config, examples, encode(examples), settings=settings,
                                decode=decode, score=score, rng=jax.random.fold_in(rng, round_), mesh=mesh,
                                timings=timings, reward_fn=reward_fn, reward_weight=reward_weight,
                                verifier_weight=verifier_weight)
        drawn += len(examples)
        if not dynamic_sampling:
            kept.append(part)
            have += len(examples)
            break
        good = informative_groups(part.rewards)
        if good.any():
            kept.append(part.take_groups(np.flatnonzero(good)))
            have += int(good.sum())
        if (~good).any():
            spare.append(part.take_groups(np.flatnonzero(~good)))
        if have >= num_prompts:
            break
    if have < num_prompts:
        filler = concat_rollouts(spare)
        kept.append(filler.take_groups(np.arange(num_prompts - have)))
    result = concat_rollouts(kept)
    if len(result.examples) > num_prompts:
        result = result.take_groups(np.arange(num_prompts))
    result.groups_drawn = drawn
    return result


def rollout_metrics(r: Rollout) -> dict[str, float]:
    """Host metrics of a rollout: reward, accuracy, lengths, truncation, dynamic sampling."""
    lengths = np.asarray(r.sample.lengths, np.float64)
    return {
        "reward/mean": float(r.rewards.mean()),
        "reward/std": float(r.rewards.std()),
        "accuracy": float(r.correct.mean()),
        "length/mean": float(lengths.mean()),
        "length/max": float(lengths.max()),
        "truncated/frac": float(np.mean(r.sample.truncated)),
        "groups/informative_frac": float(informative_groups(r.rewards).mean()),
        "groups/drawn": float(r.groups_drawn),
        "verifier/timeouts": float(sum(bool(getattr(v, "timed_out", False)) for v in r.verdicts)),
        "verifier/errors": float(sum(1 for v in r.verdicts if is_verifier_error(v))),
    }
