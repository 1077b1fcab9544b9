"""Rule rewards: the weighted combination with the preference reward and the per-rule violation rates."""

from __future__ import annotations

import numpy as np
import pytest

from ouroboros_jax.data import Example
from ouroboros_jax.rewards import Completions, FnReward
from ouroboros_jax.rewards.rules import RuleRewards
from ouroboros_jax.sampling import SampleOutput


def _completions(texts):
    R = len(texts)
    z = np.zeros((R, 1), np.int32)
    sample = SampleOutput(z, z.astype(bool), z * 0.0, z * 0.0, np.ones(R, np.int32), np.zeros(R, bool), z,
                          z.astype(bool), 1)
    return Completions(sample, texts, [Example(id="e", prompt="p", gold={})])


def test_combination_and_violation_rates():
    texts = ["fine", "rude!", "my address is x", "rude! address"]
    pref = FnReward(lambda c: np.array([1.0, 2.0, 3.0, 4.0]))
    rude = FnReward(lambda c: np.array([float("rude" in t) for t in c.texts]))
    private = FnReward(lambda c: np.array([0.9 if "address" in t else 0.2 for t in c.texts]))
    rules = RuleRewards(pref, {"rude": rude, "private": private}, {"rude": 2.0, "private": 1.0})
    out = rules(_completions(texts))
    np.testing.assert_allclose(out.rewards, [1 - 0.2, 2 - 2 - 0.2, 3 - 0.9, 4 - 2 - 0.9])
    assert out.metrics["rules/rude/violation_rate"] == 0.5
    assert out.metrics["rules/private/violation_rate"] == 0.5
    assert out.metrics["rules/private/score"] == pytest.approx(0.55)
    assert out.metrics["rules/preference"] == 2.5


def test_bad_weights_and_scores_are_named():
    pref = FnReward(lambda c: np.zeros(2))
    rule = FnReward(lambda c: np.array([0.0, 1.5]))
    with pytest.raises(ValueError, match=r"no weight for rule\(s\) \['r'\]; weights for unknown rule"):
        RuleRewards(pref, {"r": rule}, {"x": 1.0})
    with pytest.raises(ValueError, match="negative weights"):
        RuleRewards(pref, {"r": rule}, {"r": -1.0})
    with pytest.raises(ValueError, match=r"rule 'r': violation score 1.5 of row 1 is outside \[0, 1\]"):
        RuleRewards(pref, {"r": rule}, {"r": 1.0})(_completions(["a", "b"]))
