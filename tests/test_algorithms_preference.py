"""DPO, IPO, SPIN and Bradley-Terry losses: hand-computed values, gradients, masks, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.algorithms import bradley_terry_loss, dpo_loss, spin_loss

TOL = dict(rtol=1e-6, atol=1e-7)
# Pair 0: chosen log-ratio -10 - (-11) = 1, rejected -12 - (-11) = -1, h = 2.
# Pair 1: chosen log-ratio 0, rejected -4 - (-5) = 1, h = -1.
POLICY_CHOSEN = jnp.array([-10.0, -5.0])
POLICY_REJECTED = jnp.array([-12.0, -4.0])
REF_CHOSEN = jnp.array([-11.0, -5.0])
REF_REJECTED = jnp.array([-11.0, -5.0])
ARGS = (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)


def test_dpo_sigmoid_hand_computed():
    # beta = 0.1: -log sigmoid(0.2) = 0.59813887, -log sigmoid(-0.1) = 0.74439666.
    loss, metrics = dpo_loss(*ARGS, beta=0.1)
    np.testing.assert_allclose(loss, 0.6712677647275813, **TOL)
    np.testing.assert_allclose(metrics["loss"], 0.6712677647275813, **TOL)
    # Implicit rewards beta * log-ratio: chosen (0.1, 0), rejected (-0.1, 0.1).
    np.testing.assert_allclose(metrics["rewards_chosen"], 0.05, **TOL)
    np.testing.assert_allclose(metrics["rewards_rejected"], 0.0, **TOL)
    np.testing.assert_allclose(metrics["reward_margin"], 0.05, **TOL)  # (0.2 - 0.1) / 2
    np.testing.assert_allclose(metrics["reward_accuracy"], 0.5, **TOL)
    np.testing.assert_allclose(metrics["log_ratio_margin"], 0.5, **TOL)  # (2 - 1) / 2


def test_dpo_label_smoothing_hand_computed():
    # 0.9 * -log sig(0.2) + 0.1 * -log sig(-0.2), and the same for -0.1; averaged.
    loss, _ = dpo_loss(*ARGS, beta=0.1, label_smoothing=0.1)
    np.testing.assert_allclose(loss, 0.6762677647275814, **TOL)


def test_dpo_gradient_hand_computed():
    # d/d policy_chosen of -log sigmoid(beta h) / B is -beta * sigmoid(-beta h) / B;
    # the reference is constant.
    grads = jax.grad(lambda *a: dpo_loss(*a, beta=0.1)[0], argnums=(0, 1, 2))(*ARGS)
    np.testing.assert_allclose(grads[0], [-0.02250830013437611, -0.026248959373947], **TOL)
    np.testing.assert_allclose(grads[1], [0.02250830013437611, 0.026248959373947], **TOL)
    np.testing.assert_array_equal(grads[2], [0.0, 0.0])


def test_ipo_hand_computed():
    # 1 / (2 beta) = 5: (2 - 5)^2 = 9 and (-1 - 5)^2 = 36; mean 22.5.
    loss, metrics = dpo_loss(*ARGS, beta=0.1, variant="ipo")
    np.testing.assert_allclose(loss, 22.5, **TOL)
    np.testing.assert_allclose(metrics["reward_accuracy"], 0.5, **TOL)
    # d/dh (h - 5)^2 / 2 = h - 5.
    grad = jax.grad(lambda c: dpo_loss(c, *ARGS[1:], beta=0.1, variant="ipo")[0])(POLICY_CHOSEN)
    np.testing.assert_allclose(grad, [-3.0, -6.0], **TOL)


def test_spin_is_dpo_with_real_as_chosen_and_previous_model_as_reference():
    # Real responses play the chosen side and the previous model is the reference, so the
    # pairs above give the DPO values: -log sigmoid(0.2) and -log sigmoid(-0.1), averaged.
    loss, metrics = spin_loss(*ARGS, beta=0.1)
    np.testing.assert_allclose(loss, 0.6712677647275813, **TOL)
    np.testing.assert_allclose(metrics["reward_accuracy"], 0.5)
    grad = jax.grad(lambda real: spin_loss(real, *ARGS[1:], beta=0.1)[0])(POLICY_CHOSEN)
    np.testing.assert_allclose(grad, [-0.02250830013437611, -0.026248959373947], **TOL)


def test_dpo_mask_ignores_padding_pairs():
    pad = jnp.array([jnp.nan])
    args = [jnp.concatenate([x, pad]) for x in ARGS]
    mask = jnp.array([1, 1, 0])
    loss, metrics = dpo_loss(*args, beta=0.1, mask=mask)
    np.testing.assert_allclose(loss, 0.6712677647275813, **TOL)
    assert all(np.isfinite(v) for v in metrics.values())
    grad = jax.grad(lambda c: dpo_loss(c, *args[1:], beta=0.1, mask=mask)[0])(args[0])
    assert np.all(np.isfinite(grad)) and grad[2] == 0.0


def test_dpo_invalid_arguments_raise():
    with pytest.raises(ValueError, match="unknown DPO variant"):
        dpo_loss(*ARGS, beta=0.1, variant="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*ARGS, beta=0.1, variant="ipo", label_smoothing=0.1)


CHOSEN = jnp.array([2.0, 0.0, 1.0])
REJECTED = jnp.array([1.0, 0.0, 3.0])


def test_bradley_terry_hand_computed():
    # Gaps (1, 0, -2): log(1 + e^-1) = 0.31326169, log 2 = 0.69314718, log(1 + e^2) = 2.12692801.
    loss, metrics = bradley_terry_loss(CHOSEN, REJECTED)
    np.testing.assert_allclose(loss, 1.0444456263737136, **TOL)
    np.testing.assert_allclose(metrics["accuracy"], 1 / 3, **TOL)  # the tie counts as wrong
    np.testing.assert_allclose(metrics["score_margin"], -1 / 3, **TOL)
    np.testing.assert_allclose(metrics["chosen_score"], 1.0, **TOL)
    np.testing.assert_allclose(metrics["rejected_score"], 4 / 3, **TOL)


def test_bradley_terry_margin_and_centring():
    # Margin 1: gaps (0, -1, -3) -> (log 2 + log(1 + e) + log(1 + e^3)) / 3.
    loss, metrics = bradley_terry_loss(CHOSEN, REJECTED, margin=1.0)
    np.testing.assert_allclose(loss, 1.68499873988397, **TOL)
    np.testing.assert_allclose(metrics["accuracy"], 1 / 3, **TOL)  # margin-free accuracy
    # Centring: 0.01 * mean((c + r)^2) = 0.01 * (9 + 0 + 16) / 3.
    loss, _ = bradley_terry_loss(CHOSEN, REJECTED, center_coef=0.01)
    np.testing.assert_allclose(loss, 1.127778959707047, **TOL)


def test_bradley_terry_gradient_and_mask():
    # d/dc -log sigmoid(c - r) = -sigmoid(r - c): -(0.26894142, 0.5, 0.88079708) / 3.
    grad = jax.grad(lambda c: bradley_terry_loss(c, REJECTED)[0])(CHOSEN)
    np.testing.assert_allclose(grad, [-0.2689414213699951 / 3, -0.5 / 3, -0.8807970779778823 / 3], **TOL)
    # The third pair is padding with garbage: (log(1 + e^-1) + log 2) / 2 over the first two.
    chosen = CHOSEN.at[2].set(jnp.inf)
    rejected = REJECTED.at[2].set(jnp.nan)
    mask = jnp.array([1, 1, 0])
    loss, metrics = bradley_terry_loss(chosen, rejected, mask=mask)
    np.testing.assert_allclose(loss, 0.5032044340390841, **TOL)
    np.testing.assert_allclose(metrics["accuracy"], 0.5, **TOL)
    grad = jax.grad(lambda c: bradley_terry_loss(c, rejected, mask=mask)[0])(chosen)
    assert np.all(np.isfinite(grad)) and grad[2] == 0.0


def test_jit_equals_eager():
    for variant in ("sigmoid", "ipo"):
        fn = lambda *a, v=variant: dpo_loss(*a, beta=0.1, variant=v)
        eager, jitted = fn(*ARGS), jax.jit(fn)(*ARGS)
        for key in eager[1]:
            np.testing.assert_allclose(jitted[1][key], eager[1][key], rtol=1e-6)
    fn = lambda c, r: bradley_terry_loss(c, r, margin=0.5)
    eager, jitted = fn(CHOSEN, REJECTED), jax.jit(fn)(CHOSEN, REJECTED)
    for key in eager[1]:
        np.testing.assert_allclose(jitted[1][key], eager[1][key], rtol=1e-6)
