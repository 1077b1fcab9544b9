"""The one row packer: both layouts, padding rows, old log-probs and advantages, errors naming the row."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ouroboros_jax.batch import Batch, pack_rows


def test_split_layout_left_pads_prompts_and_starts_completions_at_the_prompt_width():
    b = pack_rows([[5, 6], [7]], [[8, 9, 10], []], prompt_width=3, completion_width=4, num_rows=3,
                  completion_logp=[[-0.1, -0.2, -0.3], []], advantages=[2.0, -1.0], loss_rows=[True, True])
    np.testing.assert_array_equal(b.tokens, [[0, 5, 6, 8, 9, 10, 0], [0, 0, 7, 0, 0, 0, 0], [0] * 7])
    np.testing.assert_array_equal(b.attention_mask, [[0, 1, 1, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0, 0], [0] * 7])
    np.testing.assert_array_equal(b.loss_mask, [[0, 0, 0, 1, 1, 1, 0], [0] * 7, [0] * 7])
    np.testing.assert_allclose(b.old_logp[0], [0, 0, 0, -0.1, -0.2, -0.3, 0], rtol=1e-6)
    np.testing.assert_array_equal(b.advantages, [2.0, -1.0, 0.0])  # the padding row: advantage 0
    assert b.loss_start == 3 and b.ref_logp is None
    # rows left out of the loss keep their tokens and attention
    out = pack_rows([[5, 6]], [[8, 9]], prompt_width=3, completion_width=2, loss_rows=[False])
    assert out.attention_mask.sum() == 4 and not out.loss_mask.any()


def test_packed_layout_puts_each_completion_after_its_prompt():
    b = pack_rows([[1, 2], [3]], [[4], [5, 6]])
    assert b.tokens.shape == (2, 16) and b.loss_start == 0  # the longest row rounded up to 16
    np.testing.assert_array_equal(b.tokens[:, :4], [[1, 2, 4, 0], [3, 5, 6, 0]])
    np.testing.assert_array_equal(b.loss_mask[:, :4], [[0, 0, 1, 0], [0, 1, 1, 0]])
    np.testing.assert_array_equal(b.advantages, [1.0, 1.0])  # default: plain likelihood


def test_errors_name_the_row():
    with pytest.raises(ValueError, match="row 1: the prompt has 3 tokens, more than the prompt width 2"):
        pack_rows([[1], [1, 2, 3]], [[4], [5]], prompt_width=2)
    with pytest.raises(ValueError, match="row 0: the completion has 3 tokens, more than the completion"):
        pack_rows([[1]], [[4, 5, 6]], prompt_width=2, completion_width=2)
    with pytest.raises(ValueError, match="row 0 has 5 tokens, more than the width 4"):
        pack_rows([[1, 2]], [[4, 5, 6]], width=4)
    with pytest.raises(ValueError, match="2 rows do not fit in num_rows=1"):
        pack_rows([[1], [2]], [[3], [4]], num_rows=1)


def test_a_batch_is_a_pytree_whose_static_field_survives_tree_maps():
    b = pack_rows([[1]], [[2, 3]], prompt_width=4, completion_width=2)
    assert len(jax.tree.leaves(b)) == 5  # ref_logp None is no leaf; loss_start is static
    rows = jax.tree.map(lambda x: x[:1], b)
    assert isinstance(rows, Batch) and rows.loss_start == 4
    assert jax.tree.structure(b) != jax.tree.structure(b.replace(loss_start=3))  # a new program per width
