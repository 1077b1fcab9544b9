"""Reward sources: what turns a group of completions into rewards.

A source is any callable `source(completions) -> Rewards` (`base.RewardSource`):

- `VerifierReward`: the verifier pool's verdicts (scores, correctness, reasons);
- `ModelReward`: a learned reward model, or an ensemble with its disagreement;
- `PARReward`: Preference As Reward around any source, centred on references;
- `JudgeReward`: a language model's rubric scores (`judge.Judge`, also pairwise);
- `RuleRewards`: a preference reward minus weighted rule violations (Sparrow);
- `FnReward`: a plain function of the completions;
- `HumanScoreReward`, `HumanPreferenceReward`: people's ratings from the rating
  page, as direct scores or through a reward model retrained between steps;
- `WeightedRewards`: a weighted sum of named sources (what the trainer runs).

The trainer's loop and the self-play loops call sources through
`rollout.sample_and_score`; sources take explicit values, never a config.
"""

from ouroboros_jax.rewards.base import Completions, FnReward, Rewards, RewardSource, WeightedRewards, checked
from ouroboros_jax.rewards.human import HumanPreferenceReward, HumanScoreReward
from ouroboros_jax.rewards.judge import Judge, JudgeError, JudgeReward
from ouroboros_jax.rewards.model import ModelReward, ensemble_penalty, ensemble_stats, make_reward_scorer
from ouroboros_jax.rewards.par import (
    PARReward,
    gold_reference,
    par_shaping,
    responses_as_sample,
    sampled_reference,
    sigmoid,
)
from ouroboros_jax.rewards.rules import RuleRewards
from ouroboros_jax.rewards.verifier import ScoreFn, VerifierReward

__all__ = [
    "Completions", "FnReward", "HumanPreferenceReward", "HumanScoreReward", "Judge", "JudgeError",
    "JudgeReward", "ModelReward", "PARReward", "RewardSource", "Rewards", "RuleRewards", "ScoreFn",
    "VerifierReward", "WeightedRewards", "checked", "ensemble_penalty", "ensemble_stats", "gold_reference",
    "make_reward_scorer", "par_shaping", "responses_as_sample", "sampled_reference", "sigmoid",
]
