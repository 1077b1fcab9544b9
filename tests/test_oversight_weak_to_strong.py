"""Weak-to-strong supervision: the PGR by hand, and a tiny run where the gap is real."""

import math

import numpy as np
import pytest

from ouroboros_jax.oversight.weak_to_strong import (
    ModelSpec,
    Split,
    WeakToStrongResult,
    performance_gap_recovered,
    weak_to_strong,
)


def test_pgr_by_hand():
    assert performance_gap_recovered(0.6, 0.7, 0.9) == pytest.approx(1 / 3)
    assert performance_gap_recovered(0.6, 0.6, 0.9) == 0.0
    assert performance_gap_recovered(0.6, 0.9, 0.9) == pytest.approx(1.0)
    assert performance_gap_recovered(0.6, 0.5, 0.8) == pytest.approx(-0.5)
    assert math.isnan(performance_gap_recovered(0.7, 0.8, 0.7))
    r = WeakToStrongResult(weak=0.5, strong_gold=1.0, strong_on_weak=0.75, strong_on_weak_confidence=0.9)
    assert r.pgr == pytest.approx(0.5) and r.pgr_confidence == pytest.approx(0.8)


def test_split_names_mismatched_shapes():
    with pytest.raises(ValueError, match="Split"):
        Split(np.zeros((3, 2)), np.zeros(4))


@pytest.mark.slow  # trains 4 small MLPs: ~10 s on 2 cores
def test_a_linear_weak_model_cannot_do_xor_and_the_strong_one_can_on_gold():
    rng = np.random.default_rng(0)

    def xor(n):
        x = rng.normal(size=(n, 2)).astype(np.float32)
        return Split(x, ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(np.float32))

    weak = ModelSpec((), steps=60, batch_size=64, learning_rate=0.03)
    strong = ModelSpec((32,), steps=200, batch_size=64, learning_rate=0.01)
    r = weak_to_strong(xor(256), xor(512), xor(512), weak, strong, seed=0)
    assert r.weak < 0.7 and r.strong_gold > 0.9
    assert 0.0 <= r.strong_on_weak <= 1.0 and 0.0 <= r.strong_on_weak_confidence <= 1.0
