"""PPO with a critic: per-token rewards, GAE, whitening and the clipped value loss.

Hand-computed cases, parity with plain numpy transcriptions of verl's and TRL's
loops (written here, independently of the library), and properties.
"""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from ouroboros_jax.algorithms import (
    AGGREGATIONS,
    gae_advantages,
    last_token_mask,
    masked_whiten,
    outcome_token_rewards,
    value_loss,
)

NAN = float("nan")
TOL = dict(rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- numpy references
def verl_gae(rewards, values, mask, gamma, lam):
    """verl's compute_gae_advantage_return loop (before whitening), in float64 numpy."""
    batch, length = rewards.shape
    next_values, last_gae = np.zeros(batch), np.zeros(batch)
    advantages = np.zeros((batch, length))
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        gae = delta + gamma * lam * last_gae
        next_values = values[:, t] * mask[:, t] + (1 - mask[:, t]) * next_values
        last_gae = gae * mask[:, t] + (1 - mask[:, t]) * last_gae
        advantages[:, t] = last_gae
    return advantages, advantages + values


def trl_gae(rewards, values, gamma, lam):
    """TRL's PPO trainer loop: rewards and values already zeroed on the padding."""
    batch, length = rewards.shape
    last_gae = np.zeros(batch)
    advantages = np.zeros((batch, length))
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    return advantages, advantages + values


def numpy_whiten(x, mask):
    """TRL / verl masked_whiten: mean shift, unbiased variance, eps 1e-8 inside the root."""
    m = mask.astype(bool)
    mean = x[m].mean()
    var = ((x[m] - mean) ** 2).sum() / (m.sum() - 1)
    return (x - mean) / np.sqrt(var + 1e-8)


def _random_rollout(seed, batch=5, length=7, middle_gaps=False):
    """Random rewards/values and a mask of one contiguous run per row, then padding."""
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(batch, length))
    values = rng.normal(size=(batch, length))
    lengths = rng.integers(1, length + 1, batch)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float64)
    if middle_gaps:  # masked positions inside a row (multi-turn observations, as verl skips them)
        mask *= rng.random((batch, length)) > 0.3
    return rewards, values, mask


# ----------------------------------------------------------------------------- outcome rewards
def test_last_token_mask():
    mask = jnp.array([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    expected = [[0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    np.testing.assert_array_equal(last_token_mask(mask), np.asarray(expected, bool))


def test_outcome_token_rewards_hand_computed():
    # Row 0: three tokens; row 1: two; row 2: no completion (its score is dropped).
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    old = jnp.array([[-1.0, -2.0, -0.5, 0.0], [-0.3, -1.0, 0.0, 0.0], [0.0] * 4])
    ref = jnp.array([[-1.5, -1.0, -0.5, 0.0], [-0.8, -3.0, 0.0, 0.0], [0.0] * 4])
    old, ref = jnp.where(mask == 1, old, NAN), jnp.where(mask == 1, ref, -jnp.inf)
    scores = jnp.array([1.0, -0.5, 7.0])
    # k1 per token: (0.5, -1, 0) and (0.5, 2); times kl_coef 0.1, subtracted; score on the last token.
    expected = [[-0.05, 0.1, 1.0, 0.0], [-0.05, -0.2 - 0.5, 0.0, 0.0], [0.0] * 4]
    got = outcome_token_rewards(scores, mask, old, ref, kl_coef=0.1)
    np.testing.assert_allclose(got, expected, **TOL)
    # k3 of KL(pi_old || pi_ref) per token: exp(r) - r - 1 with r = ref - old.
    k3 = lambda r: np.expm1(r) - r
    got = outcome_token_rewards(scores, mask, old, ref, kl_coef=0.1, kl_kind="k3")
    np.testing.assert_allclose(got[0], [-0.1 * k3(-0.5), -0.1 * k3(1.0), 1.0, 0.0], **TOL)


def test_outcome_token_rewards_without_kl_put_the_score_on_the_last_token():
    mask = jnp.array([[0, 1, 1, 0], [1, 0, 0, 0]])  # the completion may start after position 0
    zeros = jnp.zeros((2, 4))
    got = outcome_token_rewards(jnp.array([2.0, 3.0]), mask, zeros, zeros, kl_coef=0.0)
    np.testing.assert_allclose(got, [[0, 0, 2.0, 0], [3.0, 0, 0, 0]])


# ----------------------------------------------------------------------------- GAE
# gamma 0.9, lam 0.8 (gamma * lam = 0.72).
# Row 0, all tokens: r (0.1, 0, 1), V (0.5, 0.6, 0.7):
#   t2: delta = 1 - 0.7 = 0.3                      A = 0.3
#   t1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03         A = 0.03 + 0.72 * 0.3 = 0.246
#   t0: delta = 0.1 + 0.9 * 0.6 - 0.5 = 0.14       A = 0.14 + 0.72 * 0.246 = 0.31712
# Row 1, last token padding (garbage): r (0, 2), V (1, 0.5):
#   t1: delta = 2 - 0.5 = 1.5                      A = 1.5
#   t0: delta = 0.9 * 0.5 - 1 = -0.55              A = -0.55 + 0.72 * 1.5 = 0.53
# Row 2, middle token masked (skipped as verl skips it; its reward 5 and value 9 are dropped):
#   t2: delta = 1 - 0.4 = 0.6                      A = 0.6
#   t0: delta = 0.9 * 0.4 - 0.2 = 0.16             A = 0.16 + 0.72 * 0.6 = 0.592
GAE_MASK = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 1]])
GAE_REWARDS = np.array([[0.1, 0.0, 1.0], [0.0, 2.0, NAN], [0.0, 5.0, 1.0]])
GAE_VALUES = np.array([[0.5, 0.6, 0.7], [1.0, 0.5, NAN], [0.2, 9.0, 0.4]])
GAE_ADVANTAGES = np.array([[0.31712, 0.246, 0.3], [0.53, 1.5, 0.0], [0.592, 0.0, 0.6]])
GAE_RETURNS = np.array([[0.81712, 0.846, 1.0], [1.53, 2.0, 0.0], [0.792, 0.0, 1.0]])


def _gae(**kwargs):
    args = (jnp.asarray(GAE_REWARDS, jnp.float32), jnp.asarray(GAE_VALUES, jnp.float32), GAE_MASK)
    return gae_advantages(*args, **(dict(gamma=0.9, lam=0.8) | kwargs))


def test_gae_hand_computed():
    advantages, returns = _gae(whiten=False)
    np.testing.assert_allclose(advantages, GAE_ADVANTAGES, **TOL)
    np.testing.assert_allclose(returns, GAE_RETURNS, **TOL)


def test_gae_whitens_over_the_mask_and_returns_are_unwhitened():
    advantages, returns = _gae()
    np.testing.assert_allclose(returns, GAE_RETURNS, **TOL)
    whitened = numpy_whiten(GAE_ADVANTAGES, GAE_MASK) * GAE_MASK
    np.testing.assert_allclose(advantages, whitened, **TOL)
    np.testing.assert_allclose(np.sum(np.asarray(advantages)), 0.0, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("middle_gaps", [False, True])
def test_gae_matches_verl_loop(seed, middle_gaps):
    rewards, values, mask = _random_rollout(seed, middle_gaps=middle_gaps)
    gamma, lam = 0.97, 0.9
    want_adv, want_ret = verl_gae(rewards, values, mask, gamma, lam)
    args = (jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), jnp.asarray(mask))
    adv, ret = gae_advantages(*args, gamma=gamma, lam=lam, whiten=False)
    keep = mask == 1
    np.testing.assert_allclose(np.asarray(adv)[keep], want_adv[keep], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret)[keep], want_ret[keep], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[~keep] == 0.0) and np.all(np.asarray(ret)[~keep] == 0.0)
    whitened, _ = gae_advantages(*args, gamma=gamma, lam=lam)
    want = numpy_whiten(want_adv, mask)[keep]
    np.testing.assert_allclose(np.asarray(whitened)[keep], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_gae_matches_trl_loop_for_trailing_padding(seed):
    rewards, values, mask = _random_rollout(seed + 10)
    rewards, values = rewards * mask, values * mask  # TRL zeroes them on the padding first
    want_adv, want_ret = trl_gae(rewards, values, 1.0, 0.95)
    garbage = lambda x: jnp.where(mask == 1, jnp.asarray(x, jnp.float32), jnp.nan)
    adv, ret = gae_advantages(garbage(rewards), garbage(values), mask, gamma=1.0, lam=0.95, whiten=False)
    keep = mask == 1
    np.testing.assert_allclose(np.asarray(adv)[keep], want_adv[keep], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret)[keep], want_ret[keep], rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    rewards=st.lists(st.floats(-10, 10, width=32), min_size=12, max_size=12),
    lengths=st.lists(st.integers(0, 4), min_size=3, max_size=3),
)
def test_gae_with_unit_gamma_lambda_and_zero_values_is_the_reward_to_go(rewards, lengths):
    rewards = np.asarray(rewards, np.float64).reshape(3, 4)
    mask = (np.arange(4)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    rewards_in = jnp.asarray(rewards, jnp.float32)
    adv, ret = gae_advantages(rewards_in, jnp.zeros((3, 4)), mask, gamma=1.0, lam=1.0, whiten=False)
    to_go = np.cumsum((rewards * mask)[:, ::-1], axis=1)[:, ::-1] * mask
    np.testing.assert_allclose(adv, to_go, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ret, to_go, rtol=1e-5, atol=1e-4)


def test_gae_with_zero_lambda_is_the_one_step_td_error():
    rewards, values, mask = _random_rollout(20)
    adv, _ = gae_advantages(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=0.9, lam=0.0, whiten=False
    )
    next_values = np.concatenate([values[:, 1:] * mask[:, 1:], np.zeros((5, 1))], axis=1)
    td = (rewards + 0.9 * next_values - values) * mask
    np.testing.assert_allclose(adv, td, rtol=1e-5, atol=1e-5)


def test_outcome_rewards_through_gae_credit_every_token_with_the_score():
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    zeros = jnp.zeros((2, 4))
    rewards = outcome_token_rewards(jnp.array([1.0, -2.0]), mask, zeros, zeros, kl_coef=0.1)
    adv, ret = gae_advantages(rewards, jnp.zeros((2, 4)), mask, gamma=1.0, lam=1.0, whiten=False)
    np.testing.assert_allclose(adv, [[1, 1, 1, 0], [-2, 0, 0, 0]], **TOL)
    np.testing.assert_allclose(ret, adv, **TOL)


def test_gae_masked_inputs_get_zero_gradient():
    rewards, values, mask = _random_rollout(21, middle_gaps=True)
    rewards = jnp.where(mask == 1, jnp.asarray(rewards, jnp.float32), jnp.nan)
    values = jnp.where(mask == 1, jnp.asarray(values, jnp.float32), jnp.inf)
    weights = jnp.asarray(np.random.default_rng(0).normal(size=mask.shape), jnp.float32)

    def total(r, v):
        adv, ret = gae_advantages(r, v, jnp.asarray(mask), gamma=0.99, lam=0.95)
        return jnp.sum(weights * adv) + jnp.sum(weights * ret)

    value, grads = jax.value_and_grad(total, argnums=(0, 1))(rewards, values)
    assert np.isfinite(value)
    off = mask == 0
    for grad in grads:
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)) and np.all(grad[off] == 0.0) and np.any(grad[~off] != 0.0)


def test_gae_jit_equals_eager():
    rewards, values, mask = (jnp.asarray(x, jnp.float32) for x in _random_rollout(22, middle_gaps=True))
    fn = functools.partial(gae_advantages, gamma=0.99, lam=0.95)
    for eager, jitted in zip(fn(rewards, values, mask), jax.jit(fn)(rewards, values, mask), strict=True):
        np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- whitening
def test_masked_whiten_hand_computed():
    x = jnp.array([[1.0, 2.0, NAN], [3.0, NAN, NAN]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    # mean 2, unbiased variance ((1 + 0 + 1) / 2) = 1.
    scale = 1 / np.sqrt(1 + 1e-8)
    np.testing.assert_allclose(masked_whiten(x, mask), [[-scale, 0, 0], [scale, 0, 0]], rtol=1e-6)
    unshifted = masked_whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose(unshifted, [[2 - scale, 2, 0], [2 + scale, 0, 0]], rtol=1e-6)
    # One token is its own mean; no token at all gives zeros (never NaN).
    np.testing.assert_allclose(masked_whiten(x, jnp.array([[0, 1, 0], [0, 0, 0]])), np.zeros((2, 3)))
    np.testing.assert_allclose(masked_whiten(x, jnp.zeros((2, 3))), np.zeros((2, 3)))


# ----------------------------------------------------------------------------- value loss
# Tokens (v, v_old, R) with clip range 0.2; row 0 has three tokens, row 1 one, row 2 is padding.
#   a (1.0, 1.0, 2.0): clip(v) = 1.0; errors 1 and 1           -> 1      (unclipped gradient)
#   b (1.5, 1.0, 2.0): clip(v) = 1.2; errors 0.25 and 0.64      -> 0.64   (clipped: no gradient)
#   c (1.5, 1.0, 1.0): clip(v) = 1.2; errors 0.25 and 0.04      -> 0.25   (unclipped)
#   d (0.0, 0.5, 1.0): clip(v) = 0.3; errors 1 and 0.49         -> 1      (unclipped)
VALUE_MASK = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
VALUES = jnp.where(VALUE_MASK == 1, jnp.array([[1.0, 1.5, 1.5], [0.0, 0, 0], [0.0] * 3]), NAN)
OLD_VALUES = jnp.where(VALUE_MASK == 1, jnp.array([[1.0, 1.0, 1.0], [0.5, 0, 0], [0.0] * 3]), jnp.inf)
RETURNS = jnp.where(VALUE_MASK == 1, jnp.array([[2.0, 2.0, 1.0], [1.0, 0, 0], [0.0] * 3]), NAN)
VALUE_CASES = [
    ("token_mean", 0.5 * 2.89 / 4),
    ("seq_mean_token_mean", 0.5 * (1.89 / 3 + 1.0) / 2),
    ("seq_mean_token_sum", 0.5 * (1.89 + 1.0) / 2),
    ("seq_mean_token_sum_norm", 0.5 * (1.89 / 3 + 1.0 / 3) / 2),
]


def _value_loss(values=VALUES, **kwargs):
    kwargs = dict(clip_range=0.2, aggregation="token_mean") | kwargs
    return value_loss(values, OLD_VALUES, RETURNS, VALUE_MASK, **kwargs)


@pytest.mark.parametrize("aggregation, expected", VALUE_CASES)
def test_value_loss_hand_computed(aggregation, expected):
    loss, metrics = _value_loss(aggregation=aggregation)
    np.testing.assert_allclose(loss, expected, **TOL)
    np.testing.assert_allclose(metrics["value_loss"], expected, **TOL)
    np.testing.assert_allclose(metrics["value_clip_frac"], 0.25, **TOL)  # token b only


def test_value_loss_hand_computed_metrics_and_gradient():
    _, metrics = _value_loss()
    # R - v = (1, 0.5, -0.5, 1): variance 0.375; Var(R) = 0.25 -> explained variance -0.5.
    expected = {"value_mean": 1.0, "return_mean": 1.5, "value_mse": 0.625, "value_explained_var": -0.5}
    for key, value in expected.items():
        np.testing.assert_allclose(metrics[key], value, **TOL, err_msg=key)
    # d/dv 0.5 * (v - R)^2 / 4 tokens = (v - R) / 4 on unclipped tokens; 0 on b and off the mask.
    grad = jax.grad(lambda v: _value_loss(v)[0])(VALUES)
    np.testing.assert_allclose(grad, [[-0.25, 0.0, 0.125], [-0.25, 0, 0], [0.0] * 3], **TOL)


def test_value_loss_without_clipping_is_half_the_squared_error():
    loss, metrics = _value_loss(clip_range=None)
    np.testing.assert_allclose(loss, 0.5 * (1 + 0.25 + 0.25 + 1) / 4, **TOL)
    assert metrics["value_clip_frac"] == 0.0
    grad = jax.grad(lambda v: _value_loss(v, clip_range=None)[0])(VALUES)
    np.testing.assert_allclose(grad, [[-0.25, -0.125, 0.125], [-0.25, 0, 0], [0.0] * 3], **TOL)


def test_value_loss_targets_carry_no_gradient():
    def loss_of(old, ret):
        return value_loss(VALUES, old, ret, VALUE_MASK, clip_range=0.2, aggregation="token_mean")[0]

    grads = jax.grad(loss_of, argnums=(0, 1))(OLD_VALUES, RETURNS)
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_value_loss_micro_batches_with_normalizer_sum_to_the_full_batch(aggregation):
    rng = np.random.default_rng(3)
    _, values, mask = _random_rollout(30, batch=6, length=5)
    mask[2] = 0  # a padding row
    old = values + rng.normal(0, 0.3, values.shape)
    returns = values + rng.normal(0, 1.0, values.shape)
    values, old, returns = (jnp.asarray(x, jnp.float32) for x in (values, old, returns))
    mask = jnp.asarray(mask)
    kwargs = dict(clip_range=0.2, aggregation=aggregation, max_len=5)

    def loss_of(v, rows, normalizer=None):
        return value_loss(v[rows], old[rows], returns[rows], mask[rows], normalizer=normalizer, **kwargs)[0]

    full, full_grad = jax.value_and_grad(loss_of)(values, slice(None))
    count = float(jnp.sum(mask) if aggregation == "token_mean" else jnp.sum(jnp.any(mask != 0, axis=-1)))
    parts = [jax.value_and_grad(loss_of)(values, rows, count) for rows in (slice(0, 3), slice(3, 6))]
    np.testing.assert_allclose(sum(p[0] for p in parts), full, **TOL)
    np.testing.assert_allclose(sum(p[1] for p in parts), full_grad, **TOL)


def test_value_loss_garbage_off_the_mask_gets_zero_gradient():
    values = jnp.where(VALUE_MASK == 1, VALUES, jnp.nan)
    for aggregation in AGGREGATIONS:
        (loss, metrics), grad = jax.value_and_grad(
            lambda v, a=aggregation: _value_loss(v, aggregation=a), has_aux=True
        )(values)
        assert np.isfinite(loss) and all(np.isfinite(m) for m in metrics.values())
        grad = np.asarray(grad)
        assert np.all(grad[np.asarray(VALUE_MASK) == 0] == 0.0)


def test_value_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown aggregation"):
        _value_loss(aggregation="sum")
    with pytest.raises(ValueError, match="clip_range"):
        _value_loss(clip_range=-0.1)
