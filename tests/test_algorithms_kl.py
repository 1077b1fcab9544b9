"""KL estimators: hand-computed values, sign convention, exact and Monte-Carlo KL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.algorithms import KL_KINDS, kl_penalty

LOG2 = 0.6931471805599453


def test_hand_computed_values():
    # Token 0: pi = 0.5, pi_ref = 0.25, r = log(pi_ref / pi) = -log 2.
    # Token 1: pi = 0.25, pi_ref = 0.5, r = +log 2.
    logp = jnp.log(jnp.array([0.5, 0.25]))
    ref_logp = jnp.log(jnp.array([0.25, 0.5]))
    np.testing.assert_allclose(kl_penalty(logp, ref_logp, "k1"), [LOG2, -LOG2], rtol=1e-6)
    # k2 = r^2 / 2 = 0.2402265...
    np.testing.assert_allclose(kl_penalty(logp, ref_logp, "k2"), [0.2402265069591007] * 2, rtol=1e-6)
    # k3 = exp(r) - r - 1: 0.5 + log 2 - 1 and 2 - log 2 - 1.
    np.testing.assert_allclose(
        kl_penalty(logp, ref_logp, "k3"), [0.1931471805599453, 0.3068528194400546], rtol=1e-6
    )


def test_k3_is_the_default_and_nonnegative():
    key1, key2 = jax.random.split(jax.random.key(0))
    logp = -jax.random.exponential(key1, (64,)) * 3
    ref_logp = -jax.random.exponential(key2, (64,)) * 3
    np.testing.assert_array_equal(kl_penalty(logp, ref_logp), kl_penalty(logp, ref_logp, "k3"))
    assert np.all(np.asarray(kl_penalty(logp, ref_logp, "k3")) >= 0.0)
    assert np.all(np.asarray(kl_penalty(logp, ref_logp, "k2")) >= 0.0)
    assert np.any(np.asarray(kl_penalty(logp, ref_logp, "k1")) < 0.0)
    np.testing.assert_array_equal(kl_penalty(logp, logp, "k3"), np.zeros(64))


P = np.array([0.5, 0.3, 0.2])
Q = np.array([0.2, 0.5, 0.3])
# KL(P || Q) = 0.5 log 2.5 + 0.3 log 0.6 + 0.2 log(2/3)
KL_PQ = 0.22380465718564752


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_unbiased_estimators_have_exact_expectation(kind):
    """Expectation over tokens drawn from pi equals KL(pi || pi_ref) exactly."""
    per_token = kl_penalty(jnp.log(jnp.asarray(P)), jnp.log(jnp.asarray(Q)), kind)
    np.testing.assert_allclose(np.sum(P * np.asarray(per_token)), KL_PQ, rtol=1e-6)


def test_sign_convention_estimates_kl_of_sampler_to_reference():
    # Swapping the arguments estimates KL(Q || P) = 0.2 log 0.4 + 0.5 log(5/3) + 0.3 log 1.5,
    # which differs from KL(P || Q): the first argument must be the sampler.
    per_token = kl_penalty(jnp.log(jnp.asarray(Q)), jnp.log(jnp.asarray(P)), "k3")
    kl_qp = 0.2 * np.log(0.4) + 0.5 * np.log(5 / 3) + 0.3 * np.log(1.5)
    np.testing.assert_allclose(np.sum(Q * np.asarray(per_token)), kl_qp, rtol=1e-6)
    assert abs(kl_qp - KL_PQ) > 1e-3


def test_k2_is_second_order_accurate_for_close_policies():
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.48, 0.31, 0.21])
    exact = np.sum(p * np.log(p / q))
    per_token = kl_penalty(jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q)), "k2")
    np.testing.assert_allclose(np.sum(p * np.asarray(per_token)), exact, rtol=0.05)


def test_monte_carlo_k3_matches_kl_with_lower_variance_than_k1():
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.45, 0.33, 0.22])
    exact = np.sum(p * np.log(p / q))
    tokens = jax.random.categorical(jax.random.key(1), jnp.log(jnp.asarray(p)), shape=(100_000,))
    logp, ref_logp = jnp.log(jnp.asarray(p))[tokens], jnp.log(jnp.asarray(q))[tokens]
    k1 = np.asarray(kl_penalty(logp, ref_logp, "k1"), np.float64)
    k3 = np.asarray(kl_penalty(logp, ref_logp, "k3"), np.float64)
    stderr = k3.std() / np.sqrt(k3.size)
    assert abs(k3.mean() - exact) < 4 * stderr
    assert k3.std() < 0.5 * k1.std()


def test_gradient_of_k3_wrt_logp():
    # d/dlogp [exp(r) - r - 1] with r = ref - logp is 1 - exp(r): 0.5 and -1 here.
    logp = jnp.log(jnp.array([0.5, 0.25]))
    ref_logp = jnp.log(jnp.array([0.25, 0.5]))
    grad = jax.grad(lambda lp: jnp.sum(kl_penalty(lp, ref_logp, "k3")))(logp)
    np.testing.assert_allclose(grad, [0.5, -1.0], rtol=1e-6)


@pytest.mark.parametrize("kind", KL_KINDS)
def test_jit_equals_eager(kind):
    logp = jnp.log(jnp.array([[0.5, 0.1], [0.9, 0.3]]))
    ref_logp = jnp.log(jnp.array([[0.4, 0.2], [0.8, 0.35]]))
    eager = kl_penalty(logp, ref_logp, kind)
    jitted = jax.jit(kl_penalty, static_argnames="kind")(logp, ref_logp, kind=kind)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(jnp.zeros(2), jnp.zeros(2), "k4")
