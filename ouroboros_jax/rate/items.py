"""Records of the rating queue: items to rate, ratings, and the rules that validate them.

An item is one prompt with K completions, rated in one of two modes:

- ``pairwise``: the rater picks the best of the K >= 2 completions (``choice``,
  an index into `completions`); a choice of c yields the K - 1 preference
  pairs "c over j" for every other j.
- ``pointwise``: the rater scores each of the K >= 1 completions on the item's
  integer scale ``score_min..score_max`` (``scores``, one number per completion).

A rater may also ``skip`` an item (can't tell, both unusable): the skip is
stored so the item is not shown to that rater again, and yields no training data.

Active selection. Items are served highest `priority` first (oldest first among
equals). Unless the producer gives a priority of its own, it is

    priority = spread + (1 - judge_confidence)

with a missing term counted as 0, where `spread` is the reward-model ensemble's
disagreement (`ensemble_spread`, in reward units) and `judge_confidence` the
probability a judge model gives its own verdict, in [0, 1]. The items the
reward models disagree on most, or the judge is least sure of, come first.

Everything here is plain Python (no JAX): the rating server and the trainer
both import it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

MODES: tuple[str, ...] = ("pairwise", "pointwise")
MAX_COMPLETIONS = 9  # the page binds keys 1..9, one per completion
MAX_SCALE_POINTS = 11  # e.g. 0..10; more buttons than that stop being readable
MAX_RATER_LEN = 64


class RatingError(ValueError):
    """A bad item or rating; `field` names the offending field, `status` is the HTTP status."""

    status = 400

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field}


class UnknownItemError(RatingError):
    """The rating names an item that is not in the queue."""

    status = 404


class DuplicateRatingError(RatingError):
    """The rater has already rated (or skipped) this item."""

    status = 409


# ---------------------------------------------------------------------------
# Field checks: each names the field and says what it expected


def _number(field: str, value: Any, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RatingError(f"{field}: expected a number, got {type(value).__name__} {value!r:.60}", field)
    x = float(value)
    if not math.isfinite(x):
        raise RatingError(f"{field}: must be finite (got {x})", field)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise RatingError(f"{field}: must lie in [{lo}, {hi}] (got {x:g})", field)
    return x


def _integer(field: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RatingError(f"{field}: expected an integer, got {type(value).__name__} {value!r:.60}", field)
    n = int(value)
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise RatingError(f"{field}: must be an integer {bounds} (got {n})", field)
    return n


def _text(field: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RatingError(f"{field}: expected a string, got {type(value).__name__} {value!r:.60}", field)
    if not allow_empty and not value.strip():
        raise RatingError(f"{field}: must not be empty", field)
    return value


def _sequence(field: str, value: Any) -> list[Any]:
    if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__len__"):
        raise RatingError(f"{field}: expected a list, got {type(value).__name__}", field)
    return list(value)


def check_rater(value: Any) -> str:
    """The rater's name, stripped; 1..64 printable characters."""
    name = _text("rater", value).strip()
    if len(name) > MAX_RATER_LEN:
        raise RatingError(f"rater: at most {MAX_RATER_LEN} characters (got {len(name)})", "rater")
    if not name.isprintable():
        raise RatingError("rater: must not contain control characters", "rater")
    return name


# ---------------------------------------------------------------------------
# Active selection


def ensemble_spread(scores_EK: Sequence[Sequence[float]]) -> float:
    """Disagreement of E reward models about the K completions of one prompt.

    With K >= 2 each member's scores are first centred on that member's mean
    over the K completions (a Bradley-Terry reward is defined up to a constant
    per model, so only differences between completions carry information); the
    spread is the standard deviation across members (ddof 0) averaged over the
    completions. With K == 1 it is the standard deviation of the raw scores.
    For K = 2 this is half the standard deviation of the members' margins.
    """
    rows = [[_number(f"ensemble_scores[{e}][{k}]", s)
             for k, s in enumerate(_sequence(f"ensemble_scores[{e}]", row))]
            for e, row in enumerate(_sequence("ensemble_scores", scores_EK))]
    if len(rows) < 2:
        raise RatingError(f"ensemble_scores: need at least 2 members (got {len(rows)})", "ensemble_scores")
    width = len(rows[0])
    if width == 0 or any(len(r) != width for r in rows):
        raise RatingError(f"ensemble_scores: every member needs the same number (>= 1) of scores "
                          f"(got {[len(r) for r in rows]})", "ensemble_scores")
    if width > 1:
        rows = [[s - sum(r) / width for s in r] for r in rows]
    total = 0.0
    for k in range(width):
        column = [r[k] for r in rows]
        mean = sum(column) / len(column)
        total += math.sqrt(sum((s - mean) ** 2 for s in column) / len(column))
    return total / width


def item_priority(spread: float | None, judge_confidence: float | None) -> float:
    """``spread + (1 - judge_confidence)``, a missing term counting 0 (see the module docstring)."""
    priority = 0.0
    if spread is not None:
        priority += spread
    if judge_confidence is not None:
        priority += 1.0 - judge_confidence
    return priority


# ---------------------------------------------------------------------------
# Items


@dataclasses.dataclass(frozen=True)
class NewItem:
    """An item a producer puts in the queue; validated on construction.

    Attributes:
      prompt: the task text shown above the completions.
      completions: K completions (K >= 2 pairwise, K >= 1 pointwise, K <= 9).
      mode: ``pairwise`` or ``pointwise``.
      step: the training step that produced the completions.
      example_id: the prompt's example id in its source.
      ensemble_scores: reward-model scores [E members][K completions]; `spread` is
        computed from them (`ensemble_spread`) when not given.
      spread: the ensemble's disagreement, if computed elsewhere.
      judge_confidence: a judge model's probability for its own verdict, in [0, 1].
      priority: overrides `item_priority(spread, judge_confidence)`.
      score_range: (min, max) integer scale of pointwise scores.
      ratings_wanted: how many raters should rate it before it leaves the queue.
      key: a producer's unique key; enqueuing a key again returns the first
        item's id and changes nothing (a resumed run may re-enqueue safely).
      metadata: any JSON object kept with the item (not shown on the page).
    """

    prompt: str
    completions: Sequence[str]
    mode: str = "pairwise"
    step: int | None = None
    example_id: str | None = None
    ensemble_scores: Sequence[Sequence[float]] | None = None
    spread: float | None = None
    judge_confidence: float | None = None
    priority: float | None = None
    score_range: tuple[int, int] = (1, 5)
    ratings_wanted: int = 1
    key: str | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        _text("prompt", self.prompt)
        if self.mode not in MODES:
            raise RatingError(f"mode: expected one of {MODES} (got {self.mode!r})", "mode")
        completions = tuple(_text(f"completions[{i}]", c, allow_empty=True)
                            for i, c in enumerate(_sequence("completions", self.completions)))
        least = 2 if self.mode == "pairwise" else 1
        if not least <= len(completions) <= MAX_COMPLETIONS:
            raise RatingError(f"completions: a {self.mode} item needs {least}..{MAX_COMPLETIONS} completions "
                              f"(got {len(completions)})", "completions")
        set_("completions", completions)
        if self.step is not None:
            set_("step", _integer("step", self.step, lo=0))
        if self.example_id is not None:
            _text("example_id", self.example_id)
        if self.key is not None:
            _text("key", self.key)
        spread = None if self.spread is None else _number("spread", self.spread, lo=0.0)
        if self.ensemble_scores is not None:
            computed = ensemble_spread(self.ensemble_scores)
            if len(self.ensemble_scores[0]) != len(completions):
                raise RatingError(f"ensemble_scores: {len(self.ensemble_scores[0])} scores per member for "
                                  f"{len(completions)} completions", "ensemble_scores")
            set_("ensemble_scores", tuple(tuple(float(s) for s in row) for row in self.ensemble_scores))
            spread = computed if spread is None else spread
        set_("spread", spread)
        if self.judge_confidence is not None:
            set_("judge_confidence", _number("judge_confidence", self.judge_confidence, lo=0.0, hi=1.0))
        if self.priority is None:
            set_("priority", item_priority(spread, self.judge_confidence))
        else:
            set_("priority", _number("priority", self.priority))
        self._check_scale()
        set_("ratings_wanted", _integer("ratings_wanted", self.ratings_wanted, lo=1))
        if not isinstance(self.metadata, Mapping):
            raise RatingError(f"metadata: expected a mapping, got {type(self.metadata).__name__}", "metadata")
        try:
            json.dumps(dict(self.metadata), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise RatingError(f"metadata: must be JSON-serialisable ({e})", "metadata") from None

    def _check_scale(self) -> None:
        scale = _sequence("score_range", self.score_range)
        if len(scale) != 2:
            raise RatingError(f"score_range: expected (min, max), got {scale!r:.60}", "score_range")
        low, high = _integer("score_range[0]", scale[0]), _integer("score_range[1]", scale[1])
        if not 2 <= high - low + 1 <= MAX_SCALE_POINTS:
            raise RatingError(f"score_range: expected min < max with 2..{MAX_SCALE_POINTS} points "
                              f"(got ({low}, {high}))", "score_range")
        object.__setattr__(self, "score_range", (low, high))


@dataclasses.dataclass(frozen=True)
class Item:
    """An item as stored: a `NewItem`'s fields plus its id, rating count and creation time."""

    id: int
    prompt: str
    completions: tuple[str, ...]
    mode: str
    score_min: int
    score_max: int
    ratings_wanted: int
    n_ratings: int
    priority: float
    spread: float | None
    judge_confidence: float | None
    ensemble_scores: tuple[tuple[float, ...], ...] | None
    step: int | None
    example_id: str | None
    key: str | None
    metadata: dict[str, Any]
    created: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Item:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {name: record[name] for name in fields}
        values["completions"] = tuple(values["completions"])
        if values["ensemble_scores"] is not None:
            values["ensemble_scores"] = tuple(tuple(r) for r in values["ensemble_scores"])
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Rating:
    """One stored rating: exactly one of `choice` (pairwise), `scores` (pointwise) or `skipped`.

    `order` is the permutation of completion indices the page displayed (first
    shown first), kept so position bias can be measured.
    """

    id: int
    item_id: int
    rater: str
    choice: int | None
    scores: tuple[float, ...] | None
    skipped: bool
    order: tuple[int, ...] | None
    created: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CompletionScore:
    """A person's score of one completion; `normalized` maps the item's scale onto [0, 1]."""

    item_id: int
    rating_id: int
    prompt: str
    completion: str
    completion_index: int
    score: float
    normalized: float
    rater: str
    step: int | None
    example_id: str | None


class CheckedRating(NamedTuple):
    """A rating's values after `check_rating`."""

    choice: int | None
    scores: tuple[float, ...] | None
    skipped: bool
    order: tuple[int, ...] | None


def check_rating(item: Item, *, choice: Any = None, scores: Any = None, skip: Any = False,
                 order: Any = None) -> CheckedRating:
    """Validate a rating of `item`.

    Raises:
      RatingError: naming the field: not exactly one of choice / scores / skip,
        a rating of the wrong kind for the item's mode, a choice or score out of
        range, a wrong type, or an order that is not a permutation of the completions.
    """
    if not isinstance(skip, bool):
        raise RatingError(f"skip: expected true or false, got {skip!r:.60}", "skip")
    given = [name for name, v in (("choice", choice), ("scores", scores), ("skip", skip or None))
             if v is not None]
    if len(given) != 1:
        raise RatingError("give exactly one of 'choice' (pairwise items), 'scores' (pointwise items) or "
                          f"'skip' (got {given or 'none'})", given[1] if len(given) > 1 else "choice")
    k = len(item.completions)
    checked_order = None
    if order is not None:
        checked_order = tuple(_integer(f"order[{i}]", v) for i, v in enumerate(_sequence("order", order)))
        if sorted(checked_order) != list(range(k)):
            raise RatingError(f"order: must be a permutation of 0..{k - 1} (got {list(checked_order)})",
                              "order")
    if skip:
        return CheckedRating(None, None, True, checked_order)
    if choice is not None:
        if item.mode != "pairwise":
            raise RatingError(f"item {item.id} is pointwise: rate it with 'scores', not 'choice'", "choice")
        return CheckedRating(_integer("choice", choice, lo=0, hi=k - 1), None, False, checked_order)
    if item.mode != "pointwise":
        raise RatingError(f"item {item.id} is pairwise: rate it with 'choice' (0..{k - 1}), not 'scores'",
                          "scores")
    values = _sequence("scores", scores)
    if len(values) != k:
        raise RatingError(f"scores: item {item.id} has {k} completions, got {len(values)} scores", "scores")
    checked = tuple(_number(f"scores[{i}]", v, lo=item.score_min, hi=item.score_max)
                    for i, v in enumerate(values))
    return CheckedRating(None, checked, False, checked_order)
