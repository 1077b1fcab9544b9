"""Loss aggregation modes and masked reductions: hand-computed cases, padding, micro-batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ouroboros_jax.algorithms import AGGREGATIONS, aggregate_loss, masked_mean

NAN = float("nan")
# Row 0: three tokens summing to 6; row 1: two tokens summing to 11; row 2: padding.
LOSS = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, NAN, 0.0], [NAN, NAN, NAN, NAN]])
MASK = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token_mean", 17 / 5),  # (1 + 2 + 3 + 5 + 6) / 5
        ("seq_mean_token_mean", 3.75),  # (6 / 3 + 11 / 2) / 2
        ("seq_mean_token_sum", 8.5),  # (6 + 11) / 2
        ("seq_mean_token_sum_norm", 2.125),  # (6 / 4 + 11 / 4) / 2 with max_len = T = 4
    ],
)
def test_hand_computed(mode, expected):
    np.testing.assert_allclose(aggregate_loss(LOSS, MASK, mode), expected, rtol=1e-6)


def test_sum_norm_uses_the_given_constant():
    got = aggregate_loss(LOSS, MASK, "seq_mean_token_sum_norm", max_len=10)
    np.testing.assert_allclose(got, 0.85, rtol=1e-6)  # (6 / 10 + 11 / 10) / 2


def test_normalizer_overrides_the_denominator():
    np.testing.assert_allclose(aggregate_loss(LOSS, MASK, "token_mean", normalizer=10.0), 1.7)
    np.testing.assert_allclose(
        aggregate_loss(LOSS, MASK, "seq_mean_token_mean", normalizer=4.0), 1.875
    )  # (2 + 5.5) / 4


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batches_with_full_batch_normalizer_sum_to_full_batch(mode):
    rng = np.random.default_rng(0)
    loss = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    mask = jnp.asarray(rng.random((6, 5)) < 0.7).at[2].set(False)
    full = aggregate_loss(loss, mask, mode)
    if mode == "token_mean":
        normalizer = jnp.sum(mask)
    else:
        normalizer = jnp.sum(jnp.any(mask, axis=-1))
    parts = [aggregate_loss(loss[i : i + 2], mask[i : i + 2], mode, normalizer=normalizer) for i in (0, 2, 4)]
    np.testing.assert_allclose(sum(parts), full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_nan_at_masked_positions_gives_zero_gradient(mode):
    grad = jax.grad(lambda x: aggregate_loss(x, MASK, mode))(LOSS)
    assert np.all(np.isfinite(grad))
    assert np.all(np.asarray(grad)[np.asarray(MASK) == 0] == 0.0)


def test_empty_mask_gives_zero():
    zeros = jnp.zeros((2, 3), int)
    for mode in AGGREGATIONS:
        assert aggregate_loss(jnp.full((2, 3), NAN), zeros, mode) == 0.0
    assert masked_mean(jnp.ones(3), jnp.zeros(3)) == 0.0


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_loss(LOSS, MASK, "sum")


# ---------------------------------------------------------------------------
# Properties over random batches (hypothesis)


@st.composite
def _token_batches(draw):
    """A per-token loss [B, T], a mask with some empty rows, and a number of micro-batches dividing B."""
    micro = draw(st.sampled_from([1, 2, 4]))
    B, T = micro * draw(st.integers(1, 3)), draw(st.integers(1, 6))
    values = st.floats(-10, 10, allow_nan=False, width=32)
    loss = np.array(draw(st.lists(values, min_size=B * T, max_size=B * T)), np.float32).reshape(B, T)
    mask = np.array(draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).reshape(B, T)
    return loss, mask, micro


@settings(max_examples=40, deadline=None)
@given(_token_batches(), st.sampled_from(AGGREGATIONS))
def test_micro_batch_losses_with_the_full_batch_count_add_up_to_the_full_loss(batch, mode):
    loss, mask, micro = batch
    full = float(aggregate_loss(jnp.asarray(loss), jnp.asarray(mask), mode, max_len=8))
    if mode == "token_mean":
        count = max(mask.sum(), 1)
    else:
        count = max(mask.any(axis=1).sum(), 1)
    # strided micro-batches, as the update step splits them
    parts = [aggregate_loss(jnp.asarray(loss[j::micro]), jnp.asarray(mask[j::micro]), mode, max_len=8,
                            normalizer=float(count)) for j in range(micro)]
    np.testing.assert_allclose(float(sum(parts)), full, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(_token_batches(), st.sampled_from(AGGREGATIONS))
def test_masked_entries_never_reach_the_loss(batch, mode):
    loss, mask, _ = batch
    poisoned = np.where(mask, loss, np.nan).astype(np.float32)
    clean = aggregate_loss(jnp.asarray(loss), jnp.asarray(mask), mode)
    got = aggregate_loss(jnp.asarray(poisoned), jnp.asarray(mask), mode)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, clean, rtol=1e-6, atol=1e-6)
