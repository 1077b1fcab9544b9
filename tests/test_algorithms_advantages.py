"""Advantage estimators: hand-computed cases, zero-variance groups, gradients, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ouroboros_jax.algorithms import (
    ADVANTAGE_MODES,
    batch_normalized_advantages,
    compute_advantages,
    group_advantages,
    rloo_advantages,
)

# Group 0: mean 0.5, Bessel std sqrt((4 * 0.25) / 3) = 1/sqrt(3).
# Group 1: constant.
# Group 2: mean 0.75, centred (-0.75, -0.75, -0.75, 2.25), Bessel var 6.75 / 3 = 2.25.
REWARDS = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]], np.float32)
TOL = dict(rtol=1e-6, atol=1e-6)


def test_grpo_hand_computed_bessel_std():
    half_sqrt3 = 0.8660254037844386  # 0.5 / (1 / sqrt(3))
    expected = [
        [half_sqrt3, -half_sqrt3, -half_sqrt3, half_sqrt3],
        [0.0, 0.0, 0.0, 0.0],
        [-0.5, -0.5, -0.5, 1.5],
    ]
    np.testing.assert_allclose(group_advantages(jnp.asarray(REWARDS), eps=0.0), expected, **TOL)


def test_grpo_default_eps_is_added_to_std():
    got = group_advantages(jnp.asarray(REWARDS))
    # 0.5 / (1 / sqrt(3) + 1e-6) and 0.75 / (1.5 + 1e-6)
    np.testing.assert_allclose(got[0, 0], 0.8660239037870365, **TOL)
    np.testing.assert_allclose(got[2, 0], -0.75 / 1.500001, rtol=1e-7)


def test_dr_grpo_is_mean_only():
    expected = [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.75, -0.75, -0.75, 2.25]]
    got = group_advantages(jnp.asarray(REWARDS), normalize_std=False)
    np.testing.assert_allclose(got, expected, **TOL)
    np.testing.assert_allclose(compute_advantages(jnp.asarray(REWARDS), mode="dr_grpo"), expected)


def test_rloo_leave_one_out():
    # 1 - (0 + 0 + 1) / 3 = 2/3; 0 - 2/3; 0 - (0 + 0 + 3) / 3 = -1; 3 - 0 = 3.
    expected = [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0] * 4, [-1.0, -1.0, -1.0, 3.0]]
    np.testing.assert_allclose(rloo_advantages(jnp.asarray(REWARDS)), expected, **TOL)


def test_reinforce_pp_group_centred_then_batch_whitened():
    # Centred values sum to 0 over the batch; their squares sum to 1 + 0 + 6.75 = 7.75;
    # Bessel var over 12 completions = 7.75 / 11, std 0.8393717...
    std = 0.8393717223
    expected = np.array([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.75, -0.75, -0.75, 2.25]], np.float64)
    got = batch_normalized_advantages(jnp.asarray(REWARDS), eps=0.0)
    np.testing.assert_allclose(got, expected / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        compute_advantages(jnp.asarray(REWARDS), mode="reinforce_pp"),
        batch_normalized_advantages(jnp.asarray(REWARDS)),
    )


def test_batch_whitening_without_group_baseline():
    # mean 0.75, centred (-0.75, 0.25, 0.25, 0.25), Bessel var 0.75 / 3 = 0.25, std 0.5.
    rewards = jnp.array([[0.0, 1.0], [1.0, 1.0]])
    got = batch_normalized_advantages(rewards, subtract_group_mean=False, eps=0.0)
    np.testing.assert_allclose(got, [[-1.5, 0.5], [0.5, 0.5]], **TOL)


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_zero_variance_groups_are_exactly_zero(mode):
    # 0.1 * 3 / 3 != 0.1 in floating point: only an explicit rule gives exact zeros.
    rewards = jnp.array([[0.1, 0.1, 0.1, 0.1], [0.7, 0.7, 0.7, 0.7], [0.0, 1.0, 0.5, 0.5]])
    got = np.asarray(compute_advantages(rewards, mode=mode))
    assert np.all(got[:2] == 0.0)
    assert np.all(np.isfinite(got))
    assert np.any(got[2] != 0.0)


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_all_constant_and_singleton_groups_give_zero_not_nan(mode):
    for rewards in (jnp.full((3, 4), 0.3), jnp.array([[1.0], [0.0], [2.0]])):
        got = np.asarray(compute_advantages(rewards, mode=mode))
        assert np.all(got == 0.0), (mode, got)


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_gradient_through_advantages_is_finite(mode):
    rewards = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 3.0, 1.0], [2.0, 0.0, 0.0, 1.0]])
    weights = jnp.array([[0.3, -1.0, 2.0, 0.1], [1.0, 0.5, -0.2, 0.0], [0.4, 0.0, -1.0, 2.0]])
    grad = jax.grad(lambda r: jnp.sum(compute_advantages(r, mode=mode) * weights))(rewards)
    assert np.all(np.isfinite(grad))
    if mode != "reinforce_pp":  # batch whitening couples groups through the batch std
        assert np.all(np.asarray(grad[0]) == 0.0)


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_jit_equals_eager(mode):
    rewards = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
    eager = compute_advantages(rewards, mode=mode)
    jitted = jax.jit(lambda r: compute_advantages(r, mode=mode))(rewards)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="unknown advantage mode"):
        compute_advantages(jnp.ones((2, 2)), mode="ppo")


# ---------------------------------------------------------------------------
# Properties over random reward groups (hypothesis)


@st.composite
def _groups(draw):
    B, G = draw(st.integers(1, 4)), draw(st.integers(2, 6))
    # a few reward levels, as verifiers give, so equal-reward groups occur too
    levels = st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0])
    return np.array(draw(st.lists(levels, min_size=B * G, max_size=B * G)), np.float32).reshape(B, G)


@settings(max_examples=50, deadline=None)
@given(_groups(), st.floats(-5, 5, width=32))
def test_group_advantages_are_centred_and_shift_invariant(rewards, shift):
    for mode in ("grpo", "dr_grpo", "rloo"):
        adv = np.asarray(compute_advantages(jnp.asarray(rewards), mode=mode))
        np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=1e-4)  # every group sums to zero
        constant = np.ptp(rewards, axis=1) == 0
        assert np.all(adv[constant] == 0.0)  # no signal, exactly zero
        shifted = np.asarray(compute_advantages(jnp.asarray(rewards + shift), mode=mode))
        np.testing.assert_allclose(shifted, adv, atol=2e-4)


@settings(max_examples=50, deadline=None)
@given(_groups())
def test_rloo_is_reward_minus_the_mean_of_the_others(rewards):
    G = rewards.shape[1]
    others = (rewards.sum(axis=1, keepdims=True) - rewards) / (G - 1)
    np.testing.assert_allclose(np.asarray(rloo_advantages(jnp.asarray(rewards))), rewards - others, atol=1e-5)
    # and a positive multiple of the Dr. GRPO advantage: G / (G - 1) times it
    np.testing.assert_allclose(np.asarray(rloo_advantages(jnp.asarray(rewards))),
                               G / (G - 1) * np.asarray(group_advantages(jnp.asarray(rewards),
                                                                          normalize_std=False)), atol=1e-5)
