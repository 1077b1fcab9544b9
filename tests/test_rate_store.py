"""The rating queue: validation, active selection, durability rules, and ratings back for training."""

import json
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from ouroboros_jax.rate import (
    DuplicateRatingError,
    NewItem,
    RatingError,
    RatingStore,
    UnknownItemError,
    completion_scores,
    ensemble_spread,
    item_priority,
    preference_pairs,
    wait_for_ratings,
)
from ouroboros_jax.rate.store import NEXT_ITEM_SQL
from ouroboros_jax.selfplay.preference import PreferencePair


@pytest.fixture
def store(tmp_path):
    return RatingStore.in_run_dir(tmp_path)


# ---------------------------------------------------------------------------
# Active selection


def test_ensemble_spread_hand_computed():
    # Members [1, 0] and [0, 1], centred: [.5, -.5] and [-.5, .5]; std across members 0.5 for each.
    assert ensemble_spread([[1.0, 0.0], [0.0, 1.0]]) == pytest.approx(0.5)
    # Same margins, different offsets: a Bradley-Terry offset is not disagreement.
    assert ensemble_spread([[2.0, 0.0], [3.0, 1.0]]) == pytest.approx(0.0)
    # One completion: the raw scores' std, population (ddof 0): std(1, 3) = 1.
    assert ensemble_spread([[1.0], [3.0]]) == pytest.approx(1.0)
    # K = 3: centred [-1, 0, 1] and [0, 0, 0]; per-completion std .5, 0, .5; mean 1/3.
    assert ensemble_spread([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]]) == pytest.approx(1 / 3)
    # K = 2 is half the std of the margins: margins 2, 0, -2 -> std sqrt(8/3), spread sqrt(8/3)/2.
    assert ensemble_spread([[1, -1], [0, 0], [-1, 1]]) == pytest.approx((8 / 3) ** 0.5 / 2)


@pytest.mark.parametrize("scores, field", [
    ([[1.0, 2.0]], "ensemble_scores"),  # one member
    ([[1.0, 2.0], [1.0]], "ensemble_scores"),  # ragged
    ([[1.0, float("nan")], [0.0, 1.0]], "ensemble_scores[0][1]"),
    ("12", "ensemble_scores"),
])
def test_ensemble_spread_rejects(scores, field):
    with pytest.raises(RatingError) as e:
        ensemble_spread(scores)
    assert e.value.field == field


def test_item_priority():
    assert item_priority(None, None) == 0.0
    assert item_priority(0.5, None) == 0.5
    assert item_priority(None, 0.3) == pytest.approx(0.7)
    assert item_priority(0.5, 0.9) == pytest.approx(0.6)


def test_queue_serves_disagreement_first_then_oldest(store):
    low = store.enqueue("p0", ["a", "b"], ensemble_scores=[[1, 0], [1, 0]])  # spread 0
    judged = store.enqueue("p1", ["a", "b"], judge_confidence=0.5)  # 0.5
    split = store.enqueue("p2", ["a", "b"], ensemble_scores=[[1, 0], [0, 1]], judge_confidence=0.9)  # 0.6
    tie = store.enqueue("p3", ["a", "b"], priority=0.5)  # equal to `judged`, enqueued later
    forced = store.enqueue("p4", ["a", "b"], spread=0.1, priority=5.0)  # explicit priority wins
    assert store.get_item(split).priority == pytest.approx(0.6)
    assert store.get_item(split).spread == pytest.approx(0.5)
    served = []
    while (item := store.next_item("ann")) is not None:
        served.append(item.id)
        store.add_rating(item.id, "ann", choice=0)
    assert served == [forced, split, judged, tie, low]


def test_next_item_per_rater_and_ratings_wanted(store):
    once = store.enqueue("once", ["a", "b"], priority=2.0)
    twice = store.enqueue("twice", ["a", "b"], priority=1.0, ratings_wanted=2)
    assert store.next_item("ann").id == once
    store.add_rating(once, "ann", choice=1)
    assert store.next_item("bob").id == twice  # `once` has its one rating: closed for everyone
    store.add_rating(twice, "bob", choice=0)
    assert store.next_item("bob") is None  # bob has rated `twice`
    assert store.next_item("ann").id == twice  # still open: 1 of 2 ratings
    store.add_rating(twice, "ann", skip=True)  # a skip is no rating: `twice` stays open
    assert store.next_item("ann") is None
    assert store.next_item("cy").id == twice
    counts = store.counts("cy")
    assert (counts.items, counts.open, counts.ratings, counts.skipped, counts.raters) == (2, 1, 2, 1, 2)
    assert (counts.waiting, counts.rated_by_rater) == (1, 0)
    assert store.counts("ann").rated_by_rater == 1


# ---------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt="", completions=["a", "b"]), "prompt"),
    (dict(prompt="p", completions=["a"]), "completions"),  # pairwise needs two
    (dict(prompt="p", completions="ab"), "completions"),  # a string is not a list
    (dict(prompt="p", completions=["a", 3]), "completions[1]"),
    (dict(prompt="p", completions=["x"] * 10), "completions"),
    (dict(prompt="p", completions=["a", "b"], mode="ranking"), "mode"),
    (dict(prompt="p", completions=["a", "b"], judge_confidence=1.5), "judge_confidence"),
    (dict(prompt="p", completions=["a", "b"], spread=-1.0), "spread"),
    (dict(prompt="p", completions=["a", "b"], step=-1), "step"),
    (dict(prompt="p", completions=["a", "b"], step=True), "step"),
    (dict(prompt="p", completions=["a", "b"], ensemble_scores=[[1, 2, 3], [1, 2, 3]]), "ensemble_scores"),
    (dict(prompt="p", completions=["a"], mode="pointwise", score_range=(5, 5)), "score_range"),
    (dict(prompt="p", completions=["a"], mode="pointwise", score_range=(0, 20)), "score_range"),
    (dict(prompt="p", completions=["a", "b"], ratings_wanted=0), "ratings_wanted"),
    (dict(prompt="p", completions=["a", "b"], metadata={"x": object()}), "metadata"),
    (dict(prompt="p", completions=["a", "b"], priority=float("inf")), "priority"),
])
def test_new_item_rejects(kwargs, field):
    with pytest.raises(RatingError) as e:
        NewItem(**kwargs)
    assert e.value.field == field
    assert field.split("[")[0] in str(e.value)


def test_enqueue_key_is_idempotent(store):
    first = store.enqueue("p", ["a", "b"], key="step3/ex7")
    again = store.enqueue("p changed", ["c", "d"], key="step3/ex7")
    assert again == first
    assert store.get_item(first).prompt == "p"
    ids = store.enqueue_many([NewItem("q", ["a", "b"], key="k2"), NewItem("r", ["a", "b"], key="step3/ex7")])
    assert ids[1] == first and ids[0] != first
    assert store.counts().items == 2


def test_enqueue_many_is_one_transaction(store):
    with pytest.raises(RatingError):
        store.enqueue_many([NewItem("ok", ["a", "b"]), "not an item"])
    assert store.counts().items == 0


def test_item_round_trip(store):
    item_id = store.enqueue("p", ["a", "<b>b</b>", ""], step=7, example_id="gsm8k:3",
                            ensemble_scores=[[0.5, 1, 2], [1, 1, 1]], judge_confidence=0.75,
                            metadata={"gold": 1, "note": "é"})
    item = store.get_item(item_id)
    assert item.completions == ("a", "<b>b</b>", "")
    assert (item.step, item.example_id, item.mode, item.n_ratings) == (7, "gsm8k:3", "pairwise", 0)
    assert item.ensemble_scores == ((0.5, 1.0, 2.0), (1.0, 1.0, 1.0))
    assert item.metadata == {"gold": 1, "note": "é"}
    assert item.priority == pytest.approx(ensemble_spread(item.ensemble_scores) + 0.25)
    with pytest.raises(UnknownItemError):
        store.get_item(item_id + 1)


@pytest.mark.parametrize("kwargs, field", [
    (dict(), "choice"),  # nothing given
    (dict(choice=0, skip=True), "skip"),  # two given
    (dict(choice=2), "choice"),  # out of range for K = 2
    (dict(choice=-1), "choice"),
    (dict(choice=1.0), "choice"),  # not an integer
    (dict(choice=True), "choice"),
    (dict(choice="1"), "choice"),
    (dict(scores=[3, 3]), "scores"),  # a pairwise item takes a choice
    (dict(skip="yes"), "skip"),
    (dict(choice=0, order=[0, 0]), "order"),
    (dict(choice=0, order=[0, 1, 2]), "order"),
])
def test_pairwise_rating_rejects(store, kwargs, field):
    item = store.enqueue("p", ["a", "b"])
    with pytest.raises(RatingError) as e:
        store.add_rating(item, "ann", **kwargs)
    assert type(e.value) is RatingError and e.value.status == 400
    assert e.value.field == field
    assert store.counts().ratings + store.counts().skipped == 0


@pytest.mark.parametrize("scores, field", [
    ([3], "scores"),  # one score for two completions
    ([3, 6], "scores[1]"),  # above the scale
    ([0, 3], "scores[0]"),  # below it
    ([3, None], "scores[1]"),
    ([3, float("nan")], "scores[1]"),
    ("33", "scores"),
])
def test_pointwise_rating_rejects(store, scores, field):
    item = store.enqueue("p", ["a", "b"], mode="pointwise")
    with pytest.raises(RatingError) as e:
        store.add_rating(item, "ann", scores=scores)
    assert e.value.field == field
    with pytest.raises(RatingError) as e:
        store.add_rating(item, "ann", choice=0)
    assert e.value.field == "choice"


def test_unknown_item_duplicate_and_rater(store):
    item = store.enqueue("p", ["a", "b"])
    with pytest.raises(UnknownItemError) as e:
        store.add_rating(item + 10, "ann", choice=0)
    assert e.value.status == 404 and e.value.field == "item_id"
    with pytest.raises(RatingError) as e:
        store.add_rating("1", "ann", choice=0)
    assert e.value.field == "item_id" and e.value.status == 400
    for bad in ("", "   ", "a" * 65, "tab\there", 7):
        with pytest.raises(RatingError) as e:
            store.add_rating(item, bad, choice=0)
        assert e.value.field == "rater"
    rating = store.add_rating(item, "  ann ", choice=1, order=[1, 0])
    assert (rating.rater, rating.choice, rating.order) == ("ann", 1, (1, 0))
    with pytest.raises(DuplicateRatingError) as e:
        store.add_rating(item, "ann", choice=0)
    assert e.value.status == 409
    with pytest.raises(DuplicateRatingError):
        store.add_rating(item, "ann", skip=True)  # a skip after a rating is a duplicate too
    assert [(r.rater, r.choice) for r in store.ratings()] == [("ann", 1)]
    assert store.get_item(item).n_ratings == 1


def test_rejects_foreign_and_newer_databases(tmp_path):
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(RatingError, match="not a rating database"):
        RatingStore(other)
    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(RatingError, match="newer"):
        RatingStore(newer)
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        RatingStore.in_run_dir(tmp_path / "missing")


def test_database_is_wal_and_readable_by_plain_sqlite(store):
    item = store.enqueue("p", ["a", "b"])
    store.add_rating(item, "ann", choice=1)
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT item_id, rater, choice FROM ratings").fetchall() == [(item, "ann", 1)]


# ---------------------------------------------------------------------------
# Ratings back for training


def test_preference_pairs_best_of_k(store):
    three = store.enqueue("p3", ["x", "y", "z"])
    two = store.enqueue("p2", ["good", "bad"])
    pointwise = store.enqueue("pw", ["s"], mode="pointwise")
    r1 = store.add_rating(three, "ann", choice=2)
    store.add_rating(two, "ann", skip=True)
    r2 = store.add_rating(two, "bob", choice=0)
    store.add_rating(pointwise, "ann", scores=[4])
    pairs = preference_pairs(store)
    assert all(type(p) is PreferencePair for p in pairs)
    assert pairs == [
        PreferencePair("p3", "z", "x", id=f"rating{r1.id}:2>0"),
        PreferencePair("p3", "z", "y", id=f"rating{r1.id}:2>1"),
        PreferencePair("p2", "good", "bad", id=f"rating{r2.id}:0>1"),
    ]
    assert preference_pairs(store, since=r1.id) == pairs[2:]
    assert preference_pairs(store, until=r1.id) == pairs[:2]


def test_completion_scores_normalised(store):
    item = store.enqueue("p", ["a", "b"], mode="pointwise", score_range=(0, 10), step=4, example_id="e1")
    rating = store.add_rating(item, "ann", scores=[7, 2.5])
    store.enqueue("pairwise", ["a", "b"])
    scores = completion_scores(store)
    assert [(s.completion, s.score, s.normalized) for s in scores] == [("a", 7.0, 0.7), ("b", 2.5, 0.25)]
    assert {(s.item_id, s.rating_id, s.rater, s.step, s.example_id, s.prompt) for s in scores} == {
        (item, rating.id, "ann", 4, "e1", "p")}


def test_wait_for_ratings_counts_new_ratings(store):
    items = [store.enqueue(f"p{i}", ["a", "b"]) for i in range(4)]
    first = store.add_rating(items[0], "ann", choice=0)
    reports = []

    def rate_later():
        for item in items[1:]:
            time.sleep(0.15)
            store.add_rating(item, "bob", choice=1)

    worker = threading.Thread(target=rate_later)
    worker.start()
    result = wait_for_ratings(store, 3, timeout_s=30, on_progress=reports.append, since=first.id, poll_s=0.02)
    worker.join()
    assert result.reached and result.count == 3 and result.last_rating_id == first.id + 3
    assert [r.have for r in reports] == [0, 1, 2, 3]  # one report per change, the last one final
    assert [r.missing for r in reports] == [3, 2, 1, 0]
    assert [r.done for r in reports] == [False, False, False, True]


def test_wait_for_ratings_times_out_and_says_so(store, capsys):
    item = store.enqueue("p", ["a", "b"])
    store.add_rating(item, "ann", skip=True)  # skips do not count
    result = wait_for_ratings(store, 2, timeout_s=0.2, poll_s=0.05)
    assert not result.reached and result.count == 0 and result.elapsed_s >= 0.2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("ratings: waiting for 2 more (0 of 2)")
    assert err[-1].startswith("ratings: timed out after 0 s with 0 of 2; going on without the 2 missing")
    assert wait_for_ratings(store, 0, timeout_s=None, on_progress=None).reached
    with pytest.raises(RatingError, match="min_count"):
        wait_for_ratings(store, -1, 1)


def test_wait_for_ratings_by_mode(store):
    pw = store.enqueue("p", ["a"], mode="pointwise")
    store.add_rating(pw, "ann", scores=[3])
    assert not wait_for_ratings(store, 1, 0, None, mode="pairwise").reached
    assert wait_for_ratings(store, 1, 0, None, mode="pointwise").reached


def test_package_imports_no_jax(tmp_path):
    code = ("import sys, ouroboros_jax.rate as r; s = r.RatingStore.in_run_dir(sys.argv[1]); "
            "i = s.enqueue('p', ['a'], mode='pointwise'); s.add_rating(i, 'a', scores=[2]); "
            "print(len(r.completion_scores(s)), r.wait_for_ratings(s, 1, 0, None).reached, "
            "json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'numpy'))))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code, str(tmp_path)], capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    assert out[:2] == ["1", "True"] and json.loads(out[2]) == []


def test_next_item_query_uses_the_open_items_index(store):
    # Rated items leave the partial index, so a long run's rated history does not slow serving.
    with sqlite3.connect(store.path) as db:
        plan = " ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + NEXT_ITEM_SQL, ("ann",)))
    assert "USING INDEX items_open" in plan and "TEMP B-TREE" not in plan
