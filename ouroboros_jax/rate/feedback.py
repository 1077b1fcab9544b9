"""Ratings back to training: preference pairs, direct scores, and waiting for enough of them.

- `preference_pairs`: every pairwise rating that picked completion c of K gives
  K - 1 pairs (prompt, completions[c], completions[j]), j != c, as
  `selfplay.preference.PreferencePair` for the Bradley-Terry reward model or DPO.
  Ratings of one item by several raters each give their own pairs (a
  disagreement stays in the data as it happened).
- `completion_scores`: every pointwise rating's score of each completion, raw and
  mapped onto [0, 1], as a direct reward.
- `wait_for_ratings`: blocks until `min_count` new ratings exist (or the time is
  up), reporting how many it is still waiting for; a trainer calls it between steps.

`since` / `until` are rating ids (ids only grow), so a trainer can keep a cursor
(`WaitResult.last_rating_id`) and read only what arrived after it.

This module does not import JAX; `preference_pairs` imports `PreferencePair`
from `selfplay.preference` when called, which does.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ouroboros_jax.rate.items import CompletionScore, RatingError
from ouroboros_jax.rate.store import RatingStore

if TYPE_CHECKING:
    from ouroboros_jax.selfplay.preference import PreferencePair


def preference_pairs(store: RatingStore, *, since: int = 0, until: int | None = None) -> list[PreferencePair]:
    """The preference pairs of the pairwise ratings with `since < rating id <= until`.

    Pair ids are ``"rating<R>:<c>><j>"``: rating R preferred completion c to completion j.
    """
    from ouroboros_jax.selfplay.preference import PreferencePair  # loads JAX: only when pairs are wanted

    pairs = []
    for rating, item in store.rated(since=since, until=until, mode="pairwise"):
        c = rating.choice
        for j, other in enumerate(item.completions):
            if j != c:
                pairs.append(PreferencePair(item.prompt, item.completions[c], other,
                                            id=f"rating{rating.id}:{c}>{j}"))
    return pairs


def completion_scores(store: RatingStore, *, since: int = 0,
                      until: int | None = None) -> list[CompletionScore]:
    """One `CompletionScore` per completion of every pointwise rating with `since < rating id <= until`."""
    out = []
    for rating, item in store.rated(since=since, until=until, mode="pointwise"):
        width = item.score_max - item.score_min
        for k, (completion, score) in enumerate(zip(item.completions, rating.scores, strict=True)):
            out.append(CompletionScore(
                item_id=item.id, rating_id=rating.id, prompt=item.prompt, completion=completion,
                completion_index=k, score=score, normalized=(score - item.score_min) / width,
                rater=rating.rater, step=item.step, example_id=item.example_id))
    return out


@dataclasses.dataclass(frozen=True)
class WaitProgress:
    """Where a `wait_for_ratings` stands: `have` of `min_count` new ratings after `elapsed_s`."""

    have: int
    min_count: int
    elapsed_s: float
    timeout_s: float | None
    done: bool  # the last report of this wait
    reached: bool

    @property
    def missing(self) -> int:
        return max(0, self.min_count - self.have)


@dataclasses.dataclass(frozen=True)
class WaitResult:
    """`count` new ratings (after `since`) were there when the wait ended; `reached` if >= min_count.

    `last_rating_id` is the highest rating id at that moment: pass it as `since`
    next time to wait for ratings that arrive after this call.
    """

    count: int
    min_count: int
    reached: bool
    elapsed_s: float
    last_rating_id: int


def console_progress(progress: WaitProgress) -> None:
    """The default `on_progress`: one line on stderr each time the count changes, and at the end."""
    limit = "" if progress.timeout_s is None else f" of {progress.timeout_s:.0f} s"
    if not progress.done:
        line = (f"ratings: waiting for {progress.missing} more ({progress.have} of {progress.min_count}), "
                f"{progress.elapsed_s:.0f} s{limit}")
    elif progress.reached:
        line = f"ratings: {progress.have} of {progress.min_count} after {progress.elapsed_s:.0f} s"
    else:
        line = (f"ratings: timed out after {progress.elapsed_s:.0f} s with {progress.have} of "
                f"{progress.min_count}; going on without the {progress.missing} missing")
    print(line, file=sys.stderr, flush=True)


def wait_for_ratings(
    store: RatingStore, min_count: int, timeout_s: float | None,
    on_progress: Callable[[WaitProgress], None] | None = console_progress, *, since: int = 0,
    mode: str | None = None, poll_s: float = 0.5,
) -> WaitResult:
    """Block until at least `min_count` ratings (skips not counted) with id > `since` are stored.

    Args:
      store: the run's rating store.
      min_count: how many new ratings to wait for (0 returns at once).
      timeout_s: give up after this many seconds (None: wait for as long as it takes).
      on_progress: called at the start, whenever the count changes, and once at the
        end (`done=True`); None for silence. The default prints to stderr.
      since: count only ratings with a larger id (a cursor, `WaitResult.last_rating_id`).
      mode: count only ratings of ``pairwise`` or ``pointwise`` items.
      poll_s: how often the database is read.

    Returns:
      A `WaitResult`; `reached` is False when the time ran out first (not an error:
      the caller decides whether to train on what there is).
    """
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
        raise RatingError(f"min_count: expected an integer >= 0, got {min_count!r}", "min_count")
    if timeout_s is not None and not timeout_s >= 0:
        raise RatingError(f"timeout_s: expected a number >= 0 or None, got {timeout_s!r}", "timeout_s")
    if not poll_s > 0:
        raise RatingError(f"poll_s: expected a number > 0, got {poll_s!r}", "poll_s")
    start = time.monotonic()
    reported = -1
    while True:
        have, last = store.count_ratings(since=since, mode=mode)
        elapsed = time.monotonic() - start
        reached = have >= min_count
        done = reached or (timeout_s is not None and elapsed >= timeout_s)
        if on_progress is not None and (done or have != reported):
            on_progress(WaitProgress(have, min_count, elapsed, timeout_s, done, reached))
            reported = have
        if done:
            return WaitResult(have, min_count, reached, elapsed, last)
        remaining = poll_s if timeout_s is None else min(poll_s, max(0.0, timeout_s - elapsed))
        time.sleep(remaining)
