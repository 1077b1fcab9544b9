"""Preference As Reward: a reward source centred on reference responses, bounded in (0, 1).

`PARReward` shapes any reward source into Fu et al. 2025 ("Reward Shaping to
Mitigate Reward Hacking in RLHF", arXiv 2502.18770): ``mean_a sigmoid(r - r_ref_a)``
over reference responses a of the same prompt, so a policy gains nothing by
pushing the raw reward far beyond the references. References are the gold
answers (`gold_reference`) or samples of a frozen reference policy
(`sampled_reference`), as token rows (`responses_as_sample`).

Dimension legend (docs/dimensions.md): B prompts, G samples per prompt, A
reference responses per prompt, R rows.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Float

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.transformer import Params
from ouroboros_jax.rewards.base import Completions, Rewards, RewardSource
from ouroboros_jax.sampling import DEFAULT_PROMPT_LEN_BUCKETS, SampleOutput, generate


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, stable for large |x|."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def par_shaping(
    rewards_BG: Float[np.ndarray, "B G"], ref_rewards_BA: Float[np.ndarray, "B A"], *, center: str = "each",
) -> Float[np.ndarray, "B G"]:
    """Preference As Reward: the reward as a preference probability over reference responses.

    ``center="each"`` is the paper's ``mean_a sigmoid(r - r_ref_a)`` (Fu et al.
    2025, arXiv 2502.18770); ``center="mean"`` is ``sigmoid(r - mean_a r_ref_a)``.
    With one reference both are ``sigmoid(r - r_ref)``.

    Args:
      rewards_BG: the raw reward of each of G samples of B prompts.
      ref_rewards_BA: the raw reward of A reference responses per prompt.

    Returns:
      Shaped rewards [B, G] in (0, 1); 0.5 where a sample scores as its reference.
    """
    r = np.asarray(rewards_BG, np.float64)
    ref = np.asarray(ref_rewards_BA, np.float64)
    if r.ndim != 2 or ref.ndim != 2 or r.shape[0] != ref.shape[0]:
        raise ValueError(f"par_shaping: rewards {r.shape} and ref_rewards {ref.shape} "
                         "must be [B, G] and [B, A]")
    match center:
        case "each":
            return sigmoid(r[:, :, None] - ref[:, None, :]).mean(axis=2)
        case "mean":
            return sigmoid(r - ref.mean(axis=1, keepdims=True))
        case _:
            raise ValueError(f"par_shaping: unknown center {center!r}; expected 'each' or 'mean'")


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
    """Preference As Reward around any reward source (`ModelReward`, or one with extra terms).

    For each prompt the reference responses (`reference(examples)`, rows
    prompt-major) are scored by the same `base` source; each sample's reward
    becomes `par_shaping(r, r_ref)`. References are computed once per example
    id and cached (the reference policy and the reward model are frozen). Its
    metrics are the mean raw reward, the mean reference reward and the mean
    shaped reward.
    """

    base: RewardSource
    reference: Callable[[Sequence[Any]], SampleOutput]
    center: str = "each"
    _cache: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    def reference_rewards(self, examples: Sequence[Any]) -> np.ndarray:
        """Raw rewards [B, A] of each example's reference responses."""
        keys = [str(getattr(e, "id", "")) or repr(e) for e in examples]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            todo = [examples[i] for i in missing]
            ref = self.reference(todo)
            scores = np.asarray(self.base(Completions(ref, None, todo)).rewards, np.float64)
            scores = scores.reshape(len(todo), -1)
            self._cache.update({keys[i]: s for i, s in zip(missing, scores, strict=True)})
        return np.stack([self._cache[k] for k in keys])

    def __call__(self, completions: Completions) -> Rewards:
        B = len(completions.examples)
        base = self.base(completions)
        raw = np.asarray(base.rewards, np.float64).reshape(B, -1)
        ref = self.reference_rewards(completions.examples)
        shaped = par_shaping(raw, ref, center=self.center)
        means = {"raw_reward": raw.mean(), "reference_reward": ref.mean(), "reward": shaped.mean()}
        metrics = base.metrics | {f"par/{k}": float(v) for k, v in means.items()}
        return Rewards(shaped.reshape(-1), base.correct, base.details, metrics)
