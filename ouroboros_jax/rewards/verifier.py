"""The verifier pool as a reward source: verdicts of plain-Python verifiers, scored in worker processes.

`VerifierReward` calls a score function `(texts, golds) -> verdicts` (e.g.
`verifiers.VerifierPool(...).score`) on the decoded completions with each
row's gold data; the reward is the verdict's score, `correct` its judgement,
and the verdicts themselves (reason, extracted answer, time-out) are the
per-row details.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ouroboros_jax.rewards.base import Completions, Rewards

# (completions, golds) -> list of verdicts with .score and .correct
ScoreFn = Callable[[Sequence[str], Sequence[Mapping[str, Any]]], Sequence[Any]]


@dataclasses.dataclass
class VerifierReward:
    """Verifier verdicts as rewards (see the module docstring).

    Attributes:
      score: `(texts, golds) -> verdicts`, e.g. `verifiers.VerifierPool.score`.
      gold: an example -> the gold data its verifier reads (default: `example.gold`).
    """

    score: ScoreFn
    gold: Callable[[Any], Any] = lambda example: example.gold

    def __call__(self, completions: Completions) -> Rewards:
        if completions.texts is None:
            raise ValueError("VerifierReward: the completions were not decoded (texts is None)")
        golds = [self.gold(ex) for ex in completions.row_examples()]
        verdicts = list(self.score(list(completions.texts), golds))
        if len(verdicts) != completions.num_rows:
            raise ValueError(f"VerifierReward: {len(verdicts)} verdicts for {completions.num_rows} rows")
        rewards = np.array([float(v.score) for v in verdicts], np.float64)
        correct = np.array([bool(v.correct) for v in verdicts])
        return Rewards(rewards, correct, verdicts)
