"""Rule-specific rewards (Sparrow): a preference reward combined with per-rule violation classifiers.

Glaese et al. 2022, "Improving alignment of dialogue agents via targeted human
judgements" (arXiv 2209.14375), train one preference reward model and rule
reward models (does this response break rule k?) and optimise their
combination. `RuleRewards` does that with any reward sources: the preference
source's reward, minus ``weight_k * violation_k`` for each rule k, where a rule
classifier returns a violation score per row in [0, 1] (a probability from a
learned classifier such as a `ModelReward` followed by a sigmoid, or a 0/1
check written as an `FnReward`). Each step logs, per rule, the violation rate
(the fraction of rows whose score is at least `threshold`) and the mean score.

Dimension legend (docs/dimensions.md): R rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from ouroboros_jax.rewards.base import Completions, Rewards, RewardSource, checked


@dataclasses.dataclass
class RuleRewards:
    """`preference(rows) - sum_k weights[k] * rules[k](rows)`, with each rule's violation rate logged.

    Attributes:
      preference: the preference reward source (e.g. a Bradley-Terry `ModelReward`).
      rules: rule name -> classifier, a source whose rewards are violation scores in [0, 1].
      weights: rule name -> its weight (a config's values); every rule needs one, and no other name.
      threshold: a row violates a rule when its score is at least this.
    """

    preference: RewardSource
    rules: Mapping[str, RewardSource]
    weights: Mapping[str, float]
    threshold: float = 0.5

    def __post_init__(self) -> None:
        missing = sorted(set(self.rules) - set(self.weights))
        unknown = sorted(set(self.weights) - set(self.rules))
        if missing or unknown:
            raise ValueError(f"RuleRewards.weights: no weight for rule(s) {missing}; weights for unknown "
                             f"rule(s) {unknown} (rules: {sorted(self.rules)})")
        negative = sorted(k for k, w in self.weights.items() if w < 0)
        if negative:
            raise ValueError(f"RuleRewards.weights: rule(s) {negative} have negative weights (a weight "
                             "scales a penalty; use 0 to only log a rule)")

    def __call__(self, completions: Completions) -> Rewards:
        R = completions.num_rows
        pref = checked(self.preference(completions), R, "preference")
        total = pref.rewards.copy()
        metrics = dict(pref.metrics)
        for name, rule in self.rules.items():
            scores = checked(rule(completions), R, f"rule {name}").rewards
            bad = (scores < 0) | (scores > 1) | np.isnan(scores)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise ValueError(f"rule {name!r}: violation score {scores[row]} of row {row} "
                                 "is outside [0, 1]")
            total = total - self.weights[name] * scores
            metrics[f"rules/{name}/violation_rate"] = float(np.mean(scores >= self.threshold))
            metrics[f"rules/{name}/score"] = float(scores.mean())
        metrics["rules/preference"] = float(pref.rewards.mean())
        return Rewards(total, pref.correct, pref.details, metrics)
