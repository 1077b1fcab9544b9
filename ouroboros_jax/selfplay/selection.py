"""Judging, selection and the data policy of the generations loop: host-side, pure functions.

- `training_rewards`: the verifier's score (when verified) plus a weighted
  reward that needs no verifier: agreement with the group's majority answer
  (`self_consistency`) or a reward function's scores.
- `select_group`: which of one prompt's samples enter the training pool
  ("all", "likely", "reward", or "diverse", which keeps one sample per
  distinct answer, the rarest first).
- `training_pool`: "replace" (the newest generation) or "accumulate" (all).
- `compose_batch`: a batch with a fixed fraction of seed rows, the rest from
  the pool; `rows_to_batch` turns rows into the update step's `Batch`.

Dimension legend (docs/dimensions.md): B prompts, G samples per prompt.
"""

from __future__ import annotations

import typing
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from jaxtyping import Float

from ouroboros_jax.batch import Batch, pack_rows

DataPolicy = Literal["replace", "accumulate"]
Selection = Literal["all", "likely", "reward", "diverse"]
TrainingReward = Literal["none", "self_consistency", "fn"]
DATA_POLICIES: tuple[str, ...] = typing.get_args(DataPolicy)
SELECTIONS: tuple[str, ...] = typing.get_args(Selection)
REWARDS: tuple[str, ...] = typing.get_args(TrainingReward)


@dataclass(frozen=True)
class Row:
    """One training example: prompt and completion ids, and what selection and the loss read.

    `token_logp` holds one log-prob per completion token under the policy that
    produced it (GRPO's old policy); `generation` is -1 for seed data.
    """

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    answer: str | None = None
    correct: bool = False
    reward: float = 0.0
    advantage: float = 1.0
    logp: float = 0.0
    token_logp: tuple[float, ...] = ()
    generation: int = -1


def self_consistency(answers: Sequence[Sequence[str | None]]) -> np.ndarray:
    """1.0 where a sample's answer is its group's most common one (earliest on ties), else 0.0.

    Args:
      answers: [B][G] final answers (None: no answer, never the majority).
    Returns:
      [B, G] float rewards.
    """
    out = np.zeros((len(answers), len(answers[0]) if answers else 0))
    for i, group in enumerate(answers):
        counts = Counter(a for a in group if a is not None)
        if counts:
            best = max(counts.values())
            winner = next(a for a in group if a is not None and counts[a] == best)
            out[i] = [a == winner for a in group]
    return out


def training_rewards(
    verifier_scores: Float[np.ndarray, "B G"], answers: Sequence[Sequence[str | None]], *, verified: bool,
    reward: TrainingReward, weight: float, fn_scores: Float[np.ndarray, "B G"] | None = None,
) -> Float[np.ndarray, "B G"]:
    """The reward the loop trains on: verifier score (when verified) + weight * the other reward."""
    out = np.asarray(verifier_scores, np.float64) if verified else np.zeros(np.shape(verifier_scores))
    match reward:
        case "none":
            return out
        case "self_consistency":
            return out + weight * self_consistency(answers)
        case "fn":
            if fn_scores is None:
                raise ValueError("reward 'fn' needs the reward function's scores (pass a reward source)")
            return out + weight * np.asarray(fn_scores, np.float64).reshape(out.shape)
        case _:
            raise ValueError(f"unknown reward {reward!r}; expected one of {REWARDS}")


def select_group(
    rows: Sequence[Row], *, selection: Selection, keep: int = 0, verified: bool = True
) -> list[Row]:
    """The completions of one prompt that enter the training pool.

    Args:
      rows: the prompt's samples, in sampling order.
      selection: "all" (sampling order), "likely" (highest summed log-prob first),
        "reward" (highest reward first, then most likely), or "diverse": one
        sample per distinct answer (the text when none was extracted), the
        rarest answers first, round after round until `keep` are chosen.
      keep: how many to keep at most (0: every one that passes).
      verified: keep only completions the verifier marked correct.
    """
    passing = [r for r in rows if r.correct] if verified else list(rows)
    match selection:
        case "all":
            ranked = passing
        case "likely":
            ranked = sorted(passing, key=lambda r: -r.logp)
        case "reward":
            ranked = sorted(passing, key=lambda r: (-r.reward, -r.logp))
        case "diverse":
            by_answer: dict[Any, list[Row]] = {}
            for r in sorted(passing, key=lambda r: -r.logp):
                by_answer.setdefault(r.answer if r.answer is not None else r.completion_ids, []).append(r)
            buckets = sorted(by_answer.values(), key=len)  # stable: equal sizes keep the likelier first
            ranked = [b[i] for i in range(max(map(len, buckets), default=0)) for b in buckets if i < len(b)]
        case _:
            raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")
    return ranked[:keep] if keep > 0 else ranked


def training_pool(history: Sequence[Sequence[Row]], policy: DataPolicy) -> list[Row]:
    """The rows generation g trains on: "replace" the newest selection, "accumulate" all of them."""
    match policy:
        case "replace":
            return list(history[-1]) if history else []
        case "accumulate":
            return [r for selection in history for r in selection]
        case _:
            raise ValueError(f"unknown data policy {policy!r}; expected one of {DATA_POLICIES}")


def seed_count(batch_size: int, seed_fraction: float, *, pool_size: int, has_seed: bool) -> int:
    """Seed rows in a batch: round(fraction * size); all of it when the pool is empty, none without seed."""
    if not has_seed:
        return 0
    return batch_size if pool_size == 0 else int(round(seed_fraction * batch_size))


def compose_batch(
    pool: Sequence[Row], take_seed: Callable[[int], list[Row]] | None, batch_size: int, seed_fraction: float,
    rng: np.random.Generator,
) -> list[Row]:
    """One training batch: `seed_count` seed rows, the rest drawn from the pool.

    Pool rows are drawn without replacement while the pool is large enough,
    else with replacement. Returns [] when neither pool nor seed data exist.
    """
    n_seed = seed_count(batch_size, seed_fraction, pool_size=len(pool), has_seed=take_seed is not None)
    n_pool = batch_size - n_seed
    if n_pool and not pool:
        return []
    picks = rng.choice(len(pool), n_pool, replace=n_pool > len(pool)) if n_pool else []
    seed = take_seed(n_seed) if n_seed else []
    return [*seed, *(pool[int(i)] for i in picks)]


def rows_to_batch(rows: Sequence[Row], width: int | None = None, pad_id: int = 0) -> Batch:
    """The rows in `batch.pack_rows`'s packed layout: loss on the completion, old log-probs aligned with it.

    Args:
      rows: the batch's rows.
      width: the padded width; default: the longest row rounded up to 16 (few compiled shapes).
    """
    logp = [r.token_logp or [0.0] * len(r.completion_ids) for r in rows]
    return pack_rows([r.prompt_ids for r in rows], [r.completion_ids for r in rows], completion_logp=logp,
                     advantages=[r.advantage for r in rows], width=width, pad_id=pad_id)
