"""Rollout assembly: overlong shaping, dynamic sampling, batch alignment, pass@k."""

from __future__ import annotations

import itertools
import math

import jax
import numpy as np
import pytest

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.data import Example
from ouroboros_jax.evaluation import majority_correct, pass_at_k
from ouroboros_jax.models import init_params
from ouroboros_jax.rewards import VerifierReward
from ouroboros_jax.rollout import RolloutSettings, collect, informative_groups, overlong_penalty
from verifiers import Verdict

CFG = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=32,
                  max_seq_len=64)


def test_overlong_penalty_hand_values():
    # max 20 tokens, buffer 4: free up to 16, then -1/4 per token, -1 at 20 and beyond
    got = overlong_penalty(np.array([3, 16, 17, 18, 20, 25]), max_len=20, buffer=4, penalty=1.0)
    np.testing.assert_allclose(got, [0, 0, -0.25, -0.5, -1.0, -1.0])
    np.testing.assert_allclose(overlong_penalty(np.array([19]), 20, 4, penalty=0.5), [-0.375])


def test_informative_groups():
    rewards = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [0.5, 0.5, 0.5000001]])
    assert informative_groups(rewards).tolist() == [False, True, False, False]


def test_pass_at_k_matches_brute_force():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 6, 4), (8, 3, 8), (10, 1, 5)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert math.isclose(pass_at_k(n, c, k), brute, rel_tol=1e-12), (n, c, k)
    assert pass_at_k(4, 1, 1) == 0.25
    with pytest.raises(ValueError, match="pass_at_k needs"):
        pass_at_k(3, 4, 1)


def test_majority_vote():
    v = lambda e, ok: Verdict(float(ok), ok, extracted=e)
    assert majority_correct([v("3", False), v("4", True), v("3", False)]) is False
    assert majority_correct([v("4", True), v("3", False)]) is True  # tie: the earliest answer
    assert majority_correct([Verdict(0.0, False)]) is False


def _examples(n, start=0):
    return [Example(id=str(i), prompt="p", gold={"i": i}) for i in range(start, start + n)]


def test_dynamic_sampling_keeps_informative_groups_and_counts_draws():
    params = init_params(CFG, jax.random.key(0))
    counter = itertools.count()

    def next_examples(n):
        first = next(counter) * 100
        return _examples(n, first)

    def score(texts, golds):
        # even example ids: every sample right (uninformative); odd: right for the first sample only
        out = []
        for j, g in enumerate(golds):
            ok = g["i"] % 2 == 0 or j % 4 == 0
            out.append(Verdict(float(ok), ok, extracted=str(ok)))
        return out

    settings = RolloutSettings(group_size=4, max_new_tokens=3, prompt_len_buckets=(8,))
    r = collect(next_examples, lambda exs: [[1, 2, 3]] * len(exs), params, CFG, num_prompts=4,
                settings=settings, decode=lambda ids: "x", reward=VerifierReward(score),
                rng=jax.random.key(1), dynamic_sampling=True, max_rounds=3)
    # round 1 draws ids 0-3 (keeps 1, 3), round 2 draws 100-101 (keeps 101), round 3 draws 200
    # (uninformative); the batch is then filled with a dropped group, whose advantage is zero.
    assert [ex.id for ex in r.examples] == ["1", "3", "101", "0"]
    assert r.groups_drawn == 4 + 2 + 1
    assert informative_groups(r.rewards).tolist() == [True, True, True, False]
    np.testing.assert_array_equal(r.advantages[3], 0.0)
    np.testing.assert_allclose(r.advantages.sum(1), 0, atol=1e-5)


def test_batch_rows_line_up_with_sampler_outputs():
    params = init_params(CFG, jax.random.key(0))
    score = lambda texts, golds: [Verdict(float(g["i"]), bool(g["i"])) for g in golds]
    settings = RolloutSettings(group_size=2, max_new_tokens=4, prompt_len_buckets=(8,), advantage="dr_grpo")
    r = collect(lambda n: _examples(n), lambda exs: [[1, 2, 3], [4, 5]][: len(exs)], params, CFG,
                num_prompts=2, settings=settings, decode=lambda ids: "x", reward=VerifierReward(score),
                rng=jax.random.key(2))
    b = r.to_batch()
    P = r.sample.prompt_tokens.shape[1]
    assert b.tokens.shape == (4, P + 4)
    np.testing.assert_array_equal(b.tokens[:, P:], r.sample.tokens)
    np.testing.assert_array_equal(b.loss_mask[:, :P], False)
    np.testing.assert_array_equal(b.loss_mask[:, P:], r.sample.mask)
    np.testing.assert_array_equal(b.old_logp[:, P:], r.sample.policy_logprobs)
    np.testing.assert_array_equal(b.tokens[2, P - 2:P], [4, 5])  # left-padded second prompt
    # rewards are 0 for example 0 and 1 for example 1 in every sample: equal within groups
    np.testing.assert_array_equal(r.rewards, [[0, 0], [1, 1]])
    np.testing.assert_array_equal(b.advantages, 0.0)
