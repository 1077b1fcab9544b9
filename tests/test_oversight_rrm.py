"""Recursive reward modeling: the checks and the chain, on hand-computed cases.

Tasks are rows of step-correctness bits: a level-k task has 2**k steps and is
right when every bit is 1; it splits into its two halves.
"""

import math

import numpy as np
import pytest

from ouroboros_jax.oversight.rrm import (
    Decomposition,
    LevelChecks,
    LevelData,
    anchor_accuracy,
    check_level,
    compose_verdicts,
    disagreement,
    label_agreement,
    rating_queue,
    recursive_reward_modeling,
)
from ouroboros_jax.rate import RatingStore

halves = lambda tasks, level: [tasks[:, : tasks.shape[1] // 2], tasks[:, tasks.shape[1] // 2:]]
BITS = Decomposition(featurize=lambda tasks, level: np.asarray(tasks, np.float32), split=halves)
A = lambda *rows: np.array(rows, np.int64)


def test_check_functions_by_hand():
    assert anchor_accuracy(np.array([0.9, 0.2, 0.6]), np.array([True, True, False])) == pytest.approx(1 / 3)
    np.testing.assert_array_equal(compose_verdicts(np.array([[0.9, 0.6], [0.9, 0.4], [0.5, 0.9]])),
                                  [True, False, False])
    assert disagreement(np.array([True, False, True, True]), np.array([True, True, True, False])) == 0.5
    agree = label_agreement(np.array([True, False]), np.array([True, True]))
    np.testing.assert_array_equal(agree, [True, False])
    np.testing.assert_array_equal(label_agreement(np.array([True, False]), None), [True, True])
    checks = LevelChecks(anchor_threshold=0.8, consistency_tolerance=0.2)
    assert len(check_level(0.75, 0.25, checks)) == 2
    assert check_level(0.8, 0.2, checks) == []
    assert check_level(0.9, math.nan, checks) == []
    assert check_level(math.nan, 0.0, checks) == ["anchor accuracy nan < 0.8"]
    with pytest.raises(ValueError, match="anchor_threshold"):
        LevelChecks(anchor_threshold=1.5)
    with pytest.raises(ValueError, match="compose_verdicts"):
        compose_verdicts(np.zeros(3))


def first_bit_at_level_1(seen):
    """Level 0 and 2: perfect step checkers; level 1: a faulty judge that reads only the first step."""

    def fit(features, labels, level):
        seen[level] = (features.copy(), labels.copy())
        if level == 1:
            return lambda x: x[:, 0].astype(np.float64)
        return lambda x: np.all(x > 0.5, axis=1).astype(np.float64)

    return fit


PAIRS = A([1, 1], [1, 0], [0, 1], [0, 0])
LEVELS = [
    LevelData(train=A([1], [0]), anchor=A([1], [0]), anchor_gold=np.array([True, False]),
              train_gold=np.array([True, False])),
    LevelData(train=PAIRS, anchor=PAIRS, anchor_gold=np.array([True, False, False, False])),
    LevelData(train=A([1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]),
              anchor=A([1, 1, 1, 1], [1, 0, 1, 1]), anchor_gold=np.array([True, False])),
]
gold = lambda tasks, level: np.all(tasks == 1, axis=1)


def test_per_label_consistency_defers_labels_the_level_below_contradicts():
    seen = {}
    reports = recursive_reward_modeling(LEVELS, BITS, first_bit_at_level_1(seen),
                                        checks=LevelChecks(anchor_threshold=0.7, consistency_tolerance=0.3),
                                        gold_of=gold)
    # level 1 verdicts on the anchor pairs: first bit [1, 1, 0, 0] vs gold [1, 0, 0, 0]
    assert reports[1].anchor_accuracy == 0.75 and reports[1].disagreement == 0.25 and not reports[1].flagged
    # level 2 labels through level 1 on the halves: b0 & b2 = [1, 1, 0, 0]; through level 0 on the
    # quarters: all bits = [1, 0, 0, 0]; the second task's label is deferred.
    assert reports[2].deferred == 0.25 and reports[2].labels == 3
    np.testing.assert_array_equal(seen[2][1], [1.0, 0.0, 0.0])
    assert reports[2].label_accuracy == 1.0
    assert reports[2].anchor_accuracy == 1.0


def test_unchecked_chain_trains_on_the_compounded_error():
    seen = {}
    reports = recursive_reward_modeling(LEVELS, BITS, first_bit_at_level_1(seen), checks=None, gold_of=gold)
    np.testing.assert_array_equal(seen[2][1], [1.0, 1.0, 0.0, 0.0])
    assert reports[2].deferred == 0.0 and reports[2].label_accuracy == 0.75
    assert not any(r.flagged for r in reports)


def test_a_flagged_level_defers_all_its_labels_to_the_rating_queue(tmp_path):
    store = RatingStore(tmp_path / "ratings.sqlite")
    describe = lambda tasks, level: [" ".join(map(str, row)) for row in tasks]
    seen = {}
    reports = recursive_reward_modeling(LEVELS, BITS, first_bit_at_level_1(seen),
                                        checks=LevelChecks(anchor_threshold=0.7, consistency_tolerance=0.2),
                                        defer=rating_queue(store, describe))
    assert reports[1].flagged and "disagrees" in reports[1].reasons[0]
    assert reports[2].deferred == 1.0 and reports[2].labels == 0 and math.isnan(reports[2].anchor_accuracy)
    assert 2 not in seen
    assert store.counts().to_json()["items"] == 4
    item = store.next_item("person")
    assert item.mode == "pointwise" and item.completions[0] in {"1 1 1 1", "1 0 1 1", "1 1 0 1", "0 1 1 1"}


def test_a_level_below_the_anchor_threshold_is_flagged():
    mislabelled = [LevelData(LEVELS[0].train, LEVELS[0].anchor, LEVELS[0].anchor_gold,
                             train_gold=np.array([True, True])), *LEVELS[1:]]

    def fit(features, labels, level):
        return lambda x: np.full(x.shape[0], 0.9)  # learnt "always right" from the labels it got

    reports = recursive_reward_modeling(mislabelled, BITS, fit)
    assert reports[0].anchor_accuracy == 0.5 and reports[0].flagged
    assert reports[1].deferred == 1.0 and reports[1].labels == 0
    assert reports[2].reasons == ["a level below was not trained"]
    with pytest.raises(ValueError, match="train_gold"):
        recursive_reward_modeling([LevelData(A([1]), A([1]), np.array([True]))], BITS, fit)
