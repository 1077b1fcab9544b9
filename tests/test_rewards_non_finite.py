"""A non-finite reward from any source is a failure of that source: 0 with a reason, counted."""

from __future__ import annotations

import math
import types

import numpy as np

from ouroboros_jax.algorithms import compute_advantages
from ouroboros_jax.rewards import Completions, FnReward, VerifierReward, WeightedRewards, checked
from verifiers import Verdict, verdict_metrics


def _completions(rows: int = 4) -> Completions:
    sample = types.SimpleNamespace(lengths=np.full(rows, 3))
    examples = [types.SimpleNamespace(gold={"answer": "1"}) for _ in range(rows // 2)]
    return Completions(sample, ["1"] * rows, examples)


def test_inf_and_nan_rewards_score_0_are_not_correct_and_are_counted():
    # a verifier that says "correct" with an infinite score, and one that says NaN
    scores = [Verdict(math.inf, True), Verdict(1.0, True), Verdict(-math.inf, False), Verdict(0.0, False)]
    verifier = VerifierReward(lambda texts, golds: scores)
    model = FnReward(lambda c: [0.5, math.nan, 0.25, 0.0])
    out = checked(WeightedRewards({"verify": (verifier, 1.0), "reward_model": (model, 2.0)})(_completions()),
                  4, "reward")
    np.testing.assert_array_equal(out.rewards, [0.0 + 1.0, 1.0 + 0.0, 0.0 + 0.5, 0.0])
    np.testing.assert_array_equal(out.correct, [False, True, False, False])  # inf no longer counts as right
    assert out.metrics["verify/non_finite"] == 2 and out.metrics["reward_model/non_finite"] == 1
    assert out.metrics["reward/non_finite"] == 3
    assert out.details[0].error == "invalid" and "returned inf, not a finite reward" in out.details[0].reason
    assert out.details[2].error == "invalid" and "returned -inf" in out.details[2].reason
    assert verdict_metrics(out.details)["verifier/errors"] == 2
    advantages = np.asarray(compute_advantages(out.rewards.reshape(2, 2).astype(np.float32), mode="grpo"))
    assert np.isfinite(advantages).all()


def test_a_source_used_directly_is_checked_too():
    out = checked(FnReward(lambda c: [math.nan, 1.0, math.inf, 0.0])(_completions()), 4, "judge")
    np.testing.assert_array_equal(out.rewards, [0.0, 1.0, 0.0, 0.0])
    assert out.metrics == {"judge/non_finite": 2.0, "reward/non_finite": 2.0}
    assert "returned nan" in out.details[0].reason and out.details[1] is None
