"""Truncated (TIS) and masked (IcePop) importance weights: hand-computed cases and properties."""

import functools
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from ouroboros_jax.algorithms import importance_weights, policy_loss

NAN = float("nan")
TOL = dict(rtol=1e-5, atol=1e-6)

# Token ratios pi_old / pi_rollout: row 0 (0.5, 1, 3), row 1 (2.5, 1.2, padding), row 2 padding.
MASK = jnp.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
RATIOS = np.array([[0.5, 1.0, 3.0], [2.5, 1.2, 1.0], [1.0, 1.0, 1.0]])
ROLLOUT = np.array([[-1.0, -0.2, -2.5], [-0.7, -1.3, 0.0], [0.0] * 3])
OLD = ROLLOUT + np.log(RATIOS)
LOG_RATIOS = np.log([0.5, 1.0, 3.0, 2.5, 1.2])


def _weights(level="token", **kwargs):
    old = jnp.where(MASK == 1, jnp.asarray(OLD, jnp.float32), NAN)  # garbage off the mask
    rollout = jnp.where(MASK == 1, jnp.asarray(ROLLOUT, jnp.float32), -jnp.inf)
    return importance_weights(old, rollout, MASK, level=level, **kwargs)


def _check(metrics, expected):
    for key, value in expected.items():
        np.testing.assert_allclose(metrics[key], value, **TOL, err_msg=key)


def test_token_tis_hand_computed():
    weights, metrics = _weights(upper=2.0)
    np.testing.assert_allclose(weights, [[0.5, 1.0, 2.0], [2.0, 1.2, 0.0], [0.0] * 3], **TOL)
    # Weights (0.5, 1, 2, 2, 1.2): sum 6.7, sum of squares 10.69; ratios 3 and 2.5 truncated.
    _check(metrics, {"is_weight_mean": 1.34, "is_weight_max": 2.0, "is_weight_min": 0.5,
                     "is_truncated_frac": 0.4, "is_ess": 6.7**2 / (5 * 10.69)})  # fmt: skip


def test_token_icepop_hand_computed():
    weights, metrics = _weights(upper=2.0, lower=0.6)
    # 0.5 < 0.6 and 3, 2.5 > 2 are zeroed; 1 and 1.2 are kept as they are.
    np.testing.assert_allclose(weights, [[0.0, 1.0, 0.0], [0.0, 1.2, 0.0], [0.0] * 3], **TOL)
    _check(metrics, {"is_weight_mean": 0.44, "is_weight_max": 1.2, "is_weight_min": 0.0,
                     "is_truncated_frac": 0.6, "is_ess": 2.2**2 / (5 * 2.44)})  # fmt: skip


def test_sequence_level_hand_computed():
    # Sequence weights are the products of token ratios: 0.5 * 1 * 3 = 1.5 and 2.5 * 1.2 = 3.
    weights, metrics = _weights("sequence", upper=2.0)
    np.testing.assert_allclose(weights, [[1.5] * 3, [2.0, 2.0, 0.0], [0.0] * 3], **TOL)
    # Over the two sequences (the padding row is not one): (1.5, 2).
    _check(metrics, {"is_weight_mean": 1.75, "is_weight_max": 2.0, "is_weight_min": 1.5,
                     "is_truncated_frac": 0.5, "is_ess": 3.5**2 / (2 * 6.25)})  # fmt: skip
    weights, metrics = _weights("sequence", upper=2.0, lower=0.5)
    np.testing.assert_allclose(weights, [[1.5] * 3, [0.0] * 3, [0.0] * 3], **TOL)
    _check(metrics, {"is_weight_mean": 0.75, "is_truncated_frac": 0.5, "is_ess": 0.5})


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_mismatch_metrics_hand_computed(level):
    _, metrics = _weights(level, upper=2.0)
    # Over the 5 completion tokens, whatever the level; k1 / k3 estimate KL(pi_rollout || pi_old).
    _check(metrics, {
        "mismatch_logp_abs_diff": np.mean(np.abs(LOG_RATIOS)),
        "mismatch_kl_k1": -np.mean(LOG_RATIOS),
        "mismatch_kl_k3": np.mean(np.exp(LOG_RATIOS) - 1 - LOG_RATIOS),
    })  # fmt: skip


def test_equal_policies_give_unit_weights():
    logp = jnp.asarray(ROLLOUT, jnp.float32)
    for level in ("token", "sequence"):
        weights, metrics = importance_weights(logp, logp, MASK, level=level, upper=2.0, lower=0.5)
        np.testing.assert_allclose(weights, np.asarray(MASK, np.float32))
        _check(metrics, {"is_weight_mean": 1.0, "is_truncated_frac": 0.0, "is_ess": 1.0,
                         "mismatch_logp_abs_diff": 0.0, "mismatch_kl_k3": 0.0})  # fmt: skip


def test_weights_carry_no_gradient():
    def total(old, rollout, level):
        weights, metrics = importance_weights(old, rollout, MASK, level=level, upper=2.0)
        return jnp.sum(weights) + metrics["is_weight_mean"]

    old, rollout = jnp.asarray(OLD, jnp.float32), jnp.asarray(ROLLOUT, jnp.float32)
    for level in ("token", "sequence"):
        grads = jax.grad(total, argnums=(0, 1))(old, rollout, level)
        assert all(np.all(np.asarray(g) == 0.0) for g in grads)


def test_weighted_policy_loss_passes_no_gradient_to_the_log_probs_behind_the_weights():
    old, rollout = jnp.asarray(OLD, jnp.float32), jnp.asarray(ROLLOUT, jnp.float32)
    logp = old + 0.1

    def loss_of(lp, o, r):
        weights, _ = importance_weights(o, r, MASK, upper=2.0)
        return policy_loss(lp, o, jnp.array([1.0, -1.0, 0.0]), MASK, variant="ppo_clip", clip_low=0.2,
                           clip_high=0.2, aggregation="token_mean", importance_weights=weights)[0]

    grad_logp, grad_old, grad_rollout = jax.grad(loss_of, argnums=(0, 1, 2))(logp, old, rollout)
    assert np.all(np.asarray(grad_old) == 0.0) and np.all(np.asarray(grad_rollout) == 0.0)
    # Token (0, 0): ratio e^0.1 unclipped, A = 1, weight 0.5 -> -e^0.1 * 0.5 / 5.
    np.testing.assert_allclose(grad_logp[0, 0], -math.exp(0.1) * 0.5 / 5, **TOL)


def test_far_apart_policies_stay_finite():
    # Log-ratios of +-500 per token (sequence sums of +-1000) overflow a naive exp.
    old = jnp.array([[500.0, 500.0], [-500.0, -500.0]])
    rollout = jnp.zeros((2, 2))
    mask = jnp.ones((2, 2))
    weights, metrics = importance_weights(old, rollout, mask, level="sequence", upper=3.0)
    np.testing.assert_allclose(weights, [[3.0, 3.0], [0.0, 0.0]])
    assert all(np.isfinite(v) for k, v in metrics.items() if k != "mismatch_kl_k3")
    weights, metrics = importance_weights(old, rollout, mask, level="token", upper=3.0, lower=0.1)
    np.testing.assert_allclose(weights, np.zeros((2, 2)))
    assert metrics["is_ess"] == 0.0 and metrics["is_truncated_frac"] == 1.0


@settings(max_examples=30, deadline=None)
@given(
    log_ratios=st.lists(st.floats(-3, 3, width=32), min_size=8, max_size=8),
    lengths=st.lists(st.integers(0, 4), min_size=2, max_size=2),
    upper=st.floats(1.01, 5.0),
    lower=st.one_of(st.none(), st.floats(0.05, 0.99)),
)
def test_weights_match_a_numpy_loop(log_ratios, lengths, upper, lower):
    log_ratios = np.asarray(log_ratios, np.float64).reshape(2, 4)
    mask = (np.arange(4)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    rollout = np.full((2, 4), -1.0)
    old = rollout + log_ratios

    bounds = [upper] if lower is None else [lower, upper]

    def truncate(log_w):
        """(weight, whether float32 rounding could put it on either side of a bound)."""
        near = any(abs(log_w - math.log(b)) < 1e-4 for b in bounds)
        w = math.exp(log_w)
        if lower is None:
            return min(w, upper), near
        return (w if lower <= w <= upper else 0.0), near

    token_want, seq_want = np.zeros((2, 4)), np.zeros((2, 4))
    token_near, seq_near = np.zeros((2, 4), bool), np.zeros((2, 4), bool)
    for i in range(2):
        seq = truncate(sum(log_ratios[i, t] for t in range(4) if mask[i, t]))
        for t in range(4):
            if mask[i, t]:
                token_want[i, t], token_near[i, t] = truncate(log_ratios[i, t])
                seq_want[i, t], seq_near[i, t] = seq
    args = (jnp.asarray(old, jnp.float32), jnp.asarray(rollout, jnp.float32), jnp.asarray(mask))
    for level, want, near in (("token", token_want, token_near), ("sequence", seq_want, seq_near)):
        weights, metrics = importance_weights(*args, level=level, upper=upper, lower=lower)
        np.testing.assert_allclose(np.asarray(weights)[~near], want[~near], rtol=1e-4, atol=1e-6)
        assert 0.0 <= float(metrics["is_ess"]) <= 1.0 + 1e-6


def test_jit_equals_eager():
    fn = functools.partial(importance_weights, level="sequence", upper=2.0, lower=0.5)
    args = (jnp.asarray(OLD, jnp.float32), jnp.asarray(ROLLOUT, jnp.float32), MASK)
    (eager, eager_metrics), (jitted, jit_metrics) = fn(*args), jax.jit(fn)(*args)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    for key in eager_metrics:
        np.testing.assert_allclose(jit_metrics[key], eager_metrics[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(level="batch", upper=2.0), "unknown importance level"),
        (dict(upper=0.0), "upper must be > 0"),
        (dict(upper=2.0, lower=2.0), "lower must satisfy"),
        (dict(upper=2.0, lower=-0.1), "lower must satisfy"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        importance_weights(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)), **kwargs)
