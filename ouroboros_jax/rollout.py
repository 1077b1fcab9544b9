"""Prompts -> groups of completions -> rewards -> advantages -> a training batch.

The host side of one RL step. The sampler runs on the device; decoding to
text and the reward source (verifiers in the pool's worker processes, reward
models, ...) run on the host; the result is a `batch.Batch` whose rows are
prompt + completion (`Rollout.to_batch`).

DAPO's trainer-side parts live here too: the soft overlong penalty (or masking
truncated completions out of the loss) and dynamic sampling, which drops groups
whose rewards are all equal and samples more prompts until the batch is full.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ouroboros_jax.algorithms import AdvantageMode, compute_advantages
from ouroboros_jax.batch import Batch, pack_rows
from ouroboros_jax.config import ModelConfig, OverlongMode
from ouroboros_jax.metrics import PhaseTimer
from ouroboros_jax.rewards.base import Completions, RewardSource, checked
from ouroboros_jax.sampling import DEFAULT_PROMPT_LEN_BUCKETS, SampleOutput, generate
from verifiers import verdict_metrics


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
    verdicts: list[Any]  # [B*G] the reward source's per-row details (verifier verdicts), or None
    rewards: np.ndarray  # [B, G] the reward source's rewards plus shaping
    correct: np.ndarray  # [B, G] bool
    advantages: np.ndarray  # [B, G]
    loss_rows: np.ndarray  # [B*G] bool: rows that enter the loss (overlong masking)
    groups_drawn: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the reward source's, last call

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
            loss_rows=self.loss_rows[rows], groups_drawn=self.groups_drawn, metrics=self.metrics)

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
        groups_drawn=sum(p.groups_drawn for p in parts), metrics=parts[-1].metrics)


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """Explicit values for `sample_and_score` and `collect` (built from the config at the edge,
    `trainer.rollout_settings`)."""

    group_size: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    prompt_len_buckets: tuple[int, ...] = DEFAULT_PROMPT_LEN_BUCKETS
    advantage: AdvantageMode = "grpo"
    overlong: OverlongMode = "none"
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0


def sample(
    params: Any, model_config: ModelConfig, prompt_ids: Sequence[Sequence[int]], *, settings: RolloutSettings,
    decode: Callable[[Sequence[int]], str], rng: jax.Array, mesh: Any = None,
    generate_fn: Callable[..., SampleOutput] = generate,
) -> tuple[SampleOutput, list[str]]:
    """G completions per prompt (the jitted sampler) and their texts, stop tokens stripped.

    `generate_fn` has the signature of `sampling.generate` (tests pass one that returns chosen texts).
    """
    s = settings
    out = generate_fn(params, model_config, list(prompt_ids), max_new_tokens=s.max_new_tokens,
                      num_samples=s.group_size, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                      stop_token_ids=s.stop_token_ids, rng=rng, mesh=mesh,
                      prompt_len_buckets=s.prompt_len_buckets)
    rows = zip(out.tokens, out.lengths, strict=True)
    return out, [decode(strip_stop(np.asarray(row)[:n], s.stop_token_ids)) for row, n in rows]


def sample_and_score(
    params: Any, model_config: ModelConfig, examples: Sequence[Any], prompt_ids: Sequence[Sequence[int]],
    *, settings: RolloutSettings, decode: Callable[[Sequence[int]], str], reward: RewardSource,
    rng: jax.Array, mesh: Any = None, timer: PhaseTimer | None = None,
    generate_fn: Callable[..., SampleOutput] = generate,
) -> Rollout:
    """Sample G completions per prompt, score them with a reward source, and compute shaped rewards
    and advantages.

    Args:
      examples, prompt_ids: the prompts (one example each, with its gold data) and their token ids.
      settings: sampling, advantage and overlong settings.
      decode: completion token ids -> text.
      reward: the reward source (e.g. `rewards.WeightedRewards` of a verifier and a reward model);
        `correct` comes from it where it says so, else every row counts as wrong.
      timer: records the phase "sample" (a `rewards.WeightedRewards` sharing it records its sources).
      generate_fn: the sampler (see `sample`).
    """
    s = settings
    with timer.phase("sample") if timer is not None else contextlib.nullcontext():
        out, texts = sample(params, model_config, prompt_ids, settings=s, decode=decode, rng=rng, mesh=mesh,
                            generate_fn=generate_fn)
    B, G = len(examples), s.group_size
    scored = checked(reward(Completions(out, texts, list(examples))), B * G, "reward")
    rewards = scored.rewards.reshape(B, G)
    correct = np.zeros((B, G), bool) if scored.correct is None else np.asarray(scored.correct).reshape(B, G)
    verdicts = scored.details if scored.details is not None else [None] * (B * G)
    loss_rows = np.ones(B * G, bool)
    if s.overlong == "shape":
        rewards = rewards + overlong_penalty(out.lengths, s.max_new_tokens, s.overlong_buffer,
                                             s.overlong_penalty).reshape(B, G)
    elif s.overlong == "mask":
        loss_rows = ~np.asarray(out.truncated)
    advantages = np.asarray(compute_advantages(rewards.astype(np.float32), mode=s.advantage))
    return Rollout(list(examples), out, texts, list(verdicts), rewards, correct, advantages, loss_rows,
                   groups_drawn=B, metrics=dict(scored.metrics))


def strip_stop(tokens: np.ndarray, stop_token_ids: Sequence[int]) -> np.ndarray:
    """A completion without its final stop token (the verifier sees text only)."""
    if len(tokens) and int(tokens[-1]) in stop_token_ids:
        return tokens[:-1]
    return tokens


def collect(
    next_examples: Callable[[int], Sequence[Any]], encode: Callable[[Sequence[Any]], Sequence[Sequence[int]]],
    params: Any, model_config: ModelConfig, *, num_prompts: int, settings: RolloutSettings,
    decode: Callable[[Sequence[int]], str], reward: RewardSource, rng: jax.Array,
    dynamic_sampling: bool = False, max_rounds: int = 3, mesh: Any = None, timer: PhaseTimer | None = None,
) -> Rollout:
    """One rollout batch of `num_prompts` groups.

    With dynamic sampling (DAPO), groups whose rewards are all equal are
    dropped and more prompts are drawn, for at most `max_rounds` rounds. If the
    batch is still short after that, it is filled with dropped groups (they
    have zero advantage, so they add no gradient) to keep shapes, and thus the
    compiled programs, fixed. `groups_drawn` counts every group sampled.
    `reward` and `timer` are as in `sample_and_score`.
    """
    kept: list[Rollout] = []
    spare: list[Rollout] = []
    have, drawn = 0, 0
    for round_ in range(max_rounds if dynamic_sampling else 1):
        want = num_prompts - have
        examples = list(next_examples(want))
        part = sample_and_score(params, model_config, examples, encode(examples), settings=settings,
                                decode=decode, reward=reward, rng=jax.random.fold_in(rng, round_), mesh=mesh,
                                timer=timer)
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
    """Host metrics of a rollout: reward, accuracy, lengths, truncation, dynamic sampling, verifier
    time-outs and errors, and the reward source's own metrics."""
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
        # Verdict.error says why a row could not be judged (timeout, crashed, invalid, unavailable).
        **verdict_metrics(r.verdicts),
    } | r.metrics
