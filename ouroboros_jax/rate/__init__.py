"""People in the loop: a queue of completions to rate, a rating page, and the ratings back for training.

    producer (trainer)  --RatingStore.enqueue-->  RUN_DIR/ratings.sqlite  <--  RatingServer (page + JSON API)
    trainer  <--preference_pairs / completion_scores / wait_for_ratings--  the same file

- `items`: `NewItem` (what a producer enqueues), `Item`, `Rating`,
  `CompletionScore`, the validation rules and the active-selection priority
  (`ensemble_spread`, `item_priority`).
- `store`: `RatingStore`, the SQLite queue; every write committed before it returns.
- `feedback`: `preference_pairs`, `completion_scores`, `wait_for_ratings`.
- `server`: `RatingServer`, the page and its JSON API (``python -m ouroboros_jax.rate RUN_DIR``).
- `client`: `RatingClient`, the JSON API from Python, and `run_rater` (a simulated rater's loop).

Nothing here imports JAX (`preference_pairs` does when called, for `PreferencePair`).
"""

from ouroboros_jax.rate.client import RatingAPIError, RatingClient, run_rater
from ouroboros_jax.rate.feedback import (
    WaitProgress,
    WaitResult,
    completion_scores,
    console_progress,
    preference_pairs,
    wait_for_ratings,
)
from ouroboros_jax.rate.items import (
    CompletionScore,
    DuplicateRatingError,
    Item,
    NewItem,
    Rating,
    RatingError,
    UnknownItemError,
    ensemble_spread,
    item_priority,
)
from ouroboros_jax.rate.server import RatingServer
from ouroboros_jax.rate.store import DB_NAME, QueueCounts, RatingStore

__all__ = [
    "DB_NAME", "CompletionScore", "DuplicateRatingError", "Item", "NewItem", "QueueCounts", "Rating",
    "RatingAPIError", "RatingClient", "RatingError", "RatingServer", "RatingStore", "UnknownItemError",
    "WaitProgress", "WaitResult", "completion_scores", "console_progress", "ensemble_spread", "item_priority",
    "preference_pairs", "run_rater", "wait_for_ratings",
]
