"""The binary classification objective and the weak-to-strong confidence loss, on hand-computed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.algorithms.classification import confidence_loss
from ouroboros_jax.objectives import binary_classification, label_batch
from ouroboros_jax.oversight.classifier import accuracy, init_mlp, mlp_apply, predict_proba, train_classifier

LOGITS = jnp.array([0.0, math.log(3.0)])  # sigmoid: 0.5, 0.75
TARGETS = jnp.array([1.0, 0.0])
MASK = jnp.array([True, True])


def test_plain_cross_entropy_by_hand():
    loss, m = confidence_loss(LOGITS, TARGETS, MASK)
    # -log 0.5 and -log(1 - 0.75)
    assert float(loss) == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)
    assert float(m["accuracy"]) == pytest.approx(0.0)  # 0.5 is not > 0.5 (target 1); 0.75 vs target 0


def test_confidence_term_by_hand():
    loss, m = confidence_loss(LOGITS, TARGETS, MASK, confidence_weight=0.5)
    # hardened: sigmoid(0)=0.5 -> 0, 0.75 -> 1; self CE: -log 0.5, -log 0.75
    ce = [math.log(2), math.log(4)]
    self_ce = [math.log(2), math.log(4 / 3)]
    expected = np.mean([0.5 * c + 0.5 * s for c, s in zip(ce, self_ce, strict=True)])
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(m["confidence_term"]) == pytest.approx(np.mean(self_ce), rel=1e-6)
    assert float(m["ce_loss"]) == pytest.approx(np.mean(ce), rel=1e-6)


def test_confidence_gradient_stops_at_the_hardened_targets():
    a = 0.3
    grad = jax.grad(lambda z: confidence_loss(z, TARGETS, MASK, confidence_weight=a)[0])(LOGITS)
    p, hard = np.array([0.5, 0.75]), np.array([0.0, 1.0])
    expected = (p - (1 - a) * np.asarray(TARGETS) - a * hard) / 2
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6)


def test_masked_rows_do_not_count():
    loss, _ = confidence_loss(jnp.array([0.0, 5.0]), jnp.array([1.0, 0.0]), jnp.array([True, False]))
    assert float(loss) == pytest.approx(math.log(2), rel=1e-6)


def test_objective_scales_confidence_per_row_and_checks_options():
    objective = binary_classification(lambda p, x: x[:, 0], confidence_coef=0.5)
    batch = label_batch(np.asarray(LOGITS)[:, None], np.asarray(TARGETS), num_rows=4, confidence_scale=1.0)
    loss, m = objective.loss(None, None, batch, objective.normalizer(batch))
    assert float(m["num_sequences"]) == 2.0
    reference, _ = confidence_loss(LOGITS, TARGETS, MASK, confidence_weight=0.5)
    assert float(loss) == pytest.approx(float(reference))
    with pytest.raises(ValueError, match="confidence_coef"):
        binary_classification(mlp_apply, confidence_coef=1.5)
    with pytest.raises(ValueError, match="targets"):
        label_batch(np.zeros((2, 1)), np.array([0.0, 2.0]))


def test_an_mlp_learns_a_separable_rule_through_the_step():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 2)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.float32)
    params = init_mlp(jax.random.key(0), 2, (8,))
    result = train_classifier(params, x, y, steps=150, batch_size=64, learning_rate=0.03)
    assert accuracy(predict_proba(result.params, x), y) > 0.95
    assert result.history[-1]["loss"] < result.history[0]["loss"]
