"""People as the reward source: ratings from the rating page (`ouroboros_jax.rate`) feed the reward path.

Two sources, both called by the rollout like any other (`RewardSource`):

- `HumanScoreReward`: direct scores. Every sampled row goes on the run's
  rating queue as a pointwise item; the source waits for ratings (a minimum
  count, with a timeout) and returns each row's score mapped onto [0, 1]
  (`rate.completion_scores`); a row nobody rated in time gets `missing_reward`.
- `HumanPreferenceReward`: a Bradley-Terry reward model on people's
  preferences. Each call puts the most uncertain pairs of the current samples
  on the queue (pairs of one prompt's distinct completions, those the reward
  model separates least first), waits for ratings, and when new ones have
  arrived retrains the reward model on every preference pair so far
  (`rate.preference_pairs`, `selfplay.reward_model.train_reward_model`) and
  reloads it before scoring the rows. Training therefore always scores with a reward model that has
  seen every rating up to that step.

While waiting, `rate.wait_for_ratings` says on the console how many ratings
it is waiting for. The waiting and the reloading live in the sources: the
trainer only calls them.

Dimension legend (docs/dimensions.md): B prompts, G samples per prompt, R rows (B * G).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from jax.sharding import Mesh

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.transformer import Params
from ouroboros_jax.rate import (
    NewItem,
    RatingStore,
    WaitProgress,
    completion_scores,
    console_progress,
    preference_pairs,
    wait_for_ratings,
)
from ouroboros_jax.rewards.base import Completions, Rewards
from ouroboros_jax.rewards.model import make_reward_scorer
from ouroboros_jax.rewards.par import sigmoid

Progress = Callable[[WaitProgress], None] | None


def _texts(completions: Completions) -> list[str]:
    if completions.texts is None:
        raise ValueError("human reward: completions have no decoded texts (people rate text)")
    return list(completions.texts)


def _check_wait(min_count: int, timeout_s: float | None, name: str) -> None:
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
        raise ValueError(f"{name}.min_count: expected an integer >= 0 (got {min_count!r})")
    if timeout_s is not None and not timeout_s >= 0:
        raise ValueError(f"{name}.timeout_s: expected a number >= 0 or None (got {timeout_s!r})")


@dataclasses.dataclass
class HumanScoreReward:
    """People's direct scores of the sampled rows as their rewards.

    Attributes:
      store: the run's rating queue (`rate.RatingStore`, served by `rate.RatingServer`).
      prompt_text: the text shown for an example's prompt.
      min_count: ratings to wait for per call (None: one per row).
      timeout_s: give up waiting after this long (None: wait as long as it takes).
      missing_reward: the reward of a row nobody rated in time.
      score_range: the (min, max) integer scale shown on the page.
      metadata_of: extra JSON kept with each item (not shown), e.g. for a simulated rater.
      on_progress: where the waiting is reported (default: the console).
      poll_s: how often the queue is read while waiting.
    """

    store: RatingStore
    prompt_text: Callable[[Any], str]
    min_count: int | None = None
    timeout_s: float | None = 600.0
    missing_reward: float = 0.0
    score_range: tuple[int, int] = (1, 5)
    metadata_of: Callable[[Any], Mapping[str, Any]] | None = None
    on_progress: Progress = console_progress
    poll_s: float = 0.5
    calls: int = 0

    def __post_init__(self) -> None:
        _check_wait(0 if self.min_count is None else self.min_count, self.timeout_s, "HumanScoreReward")

    def __call__(self, completions: Completions) -> Rewards:
        texts, examples = _texts(completions), completions.row_examples()
        _, cursor = self.store.count_ratings()
        self.calls += 1
        items = [NewItem(prompt=self.prompt_text(ex), completions=[text], mode="pointwise",
                         score_range=self.score_range, step=self.calls, key=f"score:{self.calls}:{r}",
                         metadata=dict(self.metadata_of(ex)) if self.metadata_of else {})
                 for r, (text, ex) in enumerate(zip(texts, examples, strict=True))]
        ids = self.store.enqueue_many(items)
        wanted = len(ids) if self.min_count is None else self.min_count
        waited = wait_for_ratings(self.store, wanted, self.timeout_s, self.on_progress, since=cursor,
                                  mode="pointwise", poll_s=self.poll_s)
        row_of = {item_id: r for r, item_id in enumerate(ids)}
        total, count = np.zeros(len(ids)), np.zeros(len(ids))
        for s in completion_scores(self.store, since=cursor):
            if s.item_id in row_of:
                total[row_of[s.item_id]] += s.normalized
                count[row_of[s.item_id]] += 1
        rewards = np.where(count > 0, total / np.maximum(count, 1), self.missing_reward)
        return Rewards(rewards, metrics={"human/rated_fraction": float(np.mean(count > 0)),
                                         "human/waited_s": waited.elapsed_s})


@dataclasses.dataclass
class HumanPreferenceReward:
    """A Bradley-Terry reward model trained on people's preferences, retrained and reloaded between steps.

    Attributes:
      store: the run's rating queue.
      params: the reward model (`selfplay.reward_model.init_reward_model`); replaced after each retraining.
      model_config: its architecture.
      encode_prompt, encode_response: text -> token ids (the response ending with EOS),
        as for `selfplay.preference.encode_pairs`.
      prompt_text: the text shown for an example's prompt.
      pairs_per_step: pairs of the current samples put on the queue per call (0: none).
      min_count: new ratings to wait for per call.
      timeout_s: give up waiting after this long (None: as long as it takes).
      train_steps, batch_size, learning_rate: each retraining (from the current parameters,
        on every pair so far).
      mesh: where the reward model trains and scores (default: every device).
      metadata_of: extra JSON kept with each item (not shown).
      on_progress: where the waiting is reported (default: the console).
      poll_s: how often the queue is read while waiting.
    """

    store: RatingStore
    params: Params
    model_config: ModelConfig
    encode_prompt: Callable[[str], list[int]]
    encode_response: Callable[[str], list[int]]
    prompt_text: Callable[[Any], str]
    pairs_per_step: int = 8
    min_count: int = 0
    timeout_s: float | None = 600.0
    train_steps: int = 20
    batch_size: int = 16
    learning_rate: float = 1e-3
    mesh: Mesh | None = None
    metadata_of: Callable[[Any], Mapping[str, Any]] | None = None
    on_progress: Progress = console_progress
    poll_s: float = 0.5
    calls: int = 0
    retrainings: int = 0

    def __post_init__(self) -> None:
        _check_wait(self.min_count, self.timeout_s, "HumanPreferenceReward")
        if "score_D" not in self.params:
            raise ValueError("HumanPreferenceReward.params: no score head 'score_D' (use init_reward_model)")
        if self.pairs_per_step < 0:
            raise ValueError("HumanPreferenceReward.pairs_per_step: expected >= 0 "
                             f"(got {self.pairs_per_step})")
        self._score = make_reward_scorer(self.model_config, self.mesh)
        self._seen = 0  # the last rating id trained on
        self._pairs: list[Any] = []

    @property
    def num_pairs(self) -> int:
        """Preference pairs the reward model has been trained on so far."""
        return len(self._pairs)

    def scores(self, completions: Completions) -> np.ndarray:
        """The current reward model's score of every row [R]."""
        return self._score(self.params, *completions.sample.sequences())

    def uncertain_pairs(self, completions: Completions, scores: np.ndarray) -> list[NewItem]:
        """Pairs of distinct completions of the same prompt, those the reward model separates least first."""
        texts, G = _texts(completions), completions.group_size
        candidates = []
        for b in range(len(completions.examples)):
            rows: dict[str, int] = {}
            for r in range(b * G, (b + 1) * G):
                rows.setdefault(texts[r], r)
            distinct = list(rows.values())
            for n, i in enumerate(distinct):
                for j in distinct[n + 1:]:
                    candidates.append((abs(float(scores[i]) - float(scores[j])), b, i, j))
        candidates.sort()
        examples = completions.examples
        return [NewItem(prompt=self.prompt_text(examples[b]), completions=[texts[i], texts[j]],
                        step=self.calls, judge_confidence=float(sigmoid(gap)),
                        key=f"pair:{self.calls}:{i}:{j}",
                        metadata=dict(self.metadata_of(examples[b])) if self.metadata_of else {})
                for gap, b, i, j in candidates[:self.pairs_per_step]]

    def refresh(self) -> int:
        """Retrain on every pair when ratings arrived since the last retraining; returns the new pairs."""
        from ouroboros_jax.selfplay.preference import encode_pairs
        from ouroboros_jax.selfplay.reward_model import train_reward_model

        _, last = self.store.count_ratings()
        new = preference_pairs(self.store, since=self._seen, until=last)
        self._seen = last
        if not new:
            return 0
        self._pairs.extend(new)
        encoded = encode_pairs(self._pairs, self.encode_prompt, self.encode_response)
        result = train_reward_model(self.params, self.model_config, encoded, steps=self.train_steps,
                                    batch_size=self.batch_size, learning_rate=self.learning_rate,
                                    mesh=self.mesh, seed=self.retrainings)
        self.params = result.params
        self.retrainings += 1
        return len(new)

    def __call__(self, completions: Completions) -> Rewards:
        self.calls += 1
        _, cursor = self.store.count_ratings()
        if self.pairs_per_step:
            self.store.enqueue_many(self.uncertain_pairs(completions, self.scores(completions)))
        waited = wait_for_ratings(self.store, self.min_count, self.timeout_s, self.on_progress, since=cursor,
                                  mode="pairwise", poll_s=self.poll_s)
        new_pairs = self.refresh()
        rewards = self.scores(completions)
        return Rewards(rewards, metrics={"human/new_pairs": float(new_pairs),
                                         "human/pairs": float(len(self._pairs)),
                                         "human/waited_s": waited.elapsed_s,
                                         "human/retrainings": float(self.retrainings)})

