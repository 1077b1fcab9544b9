"""Reward sources: the protocol, and a weighted combination of sources.

A reward source turns a group of completions into one reward per row. It is
called on the host with a `Completions` (the sampled token rows, their decoded
texts and the examples of their prompts) and returns `Rewards`: the rewards
[R], and, where it can tell, which rows are `correct` (a verifier), per-row
`details` (verdicts, with their reasons and errors) and `metrics` to log.
Verifiers, learned reward models, ensembles and PAR are sources; a language
model acting as judge, or a queue of human ratings, is one more.

Rows are prompt-major: row i*G + j is sample j of prompt i (G = group_size).

Dimension legend (docs/dimensions.md): B prompts, G samples per prompt, R rows (B * G).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from jaxtyping import Bool, Float

from ouroboros_jax.sampling import SampleOutput

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Completions:
    """A batch of groups of completions, as a reward source sees it.

    Attributes:
      sample: the sampled rows (prompt and completion tokens, `sampling.SampleOutput`).
      texts: the decoded completion of each row (stop token stripped); None
        for rows that were never decoded (e.g. token-level reference responses).
      examples: one example per prompt (B of them), each with the prompt's gold data.
    """

    sample: SampleOutput
    texts: Sequence[str] | None
    examples: Sequence[Any]

    @property
    def num_rows(self) -> int:
        return int(np.asarray(self.sample.lengths).shape[0])

    @property
    def group_size(self) -> int:
        """G: completions per prompt."""
        return self.num_rows // max(len(self.examples), 1)

    def row_examples(self) -> list[Any]:
        """The example of every row (each prompt's example repeated G times)."""
        return [ex for ex in self.examples for _ in range(self.group_size)]


@dataclasses.dataclass
class Rewards:
    """What a reward source says about R rows.

    Attributes:
      rewards: [R] one reward per row.
      correct: [R] whether each row is right, when the source can tell (a verifier); else None.
      details: per-row records (e.g. verifier verdicts, with `reason`, `extracted`, `timed_out`), or None.
      metrics: scalars to log with the step (e.g. an ensemble's disagreement).
    """

    rewards: Float[np.ndarray, " R"]
    correct: Bool[np.ndarray, " R"] | None = None
    details: list[Any] | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class RewardSource(Protocol):
    """Anything that scores completions: `source(completions) -> Rewards`."""

    def __call__(self, completions: Completions) -> Rewards: ...


def checked(out: Rewards, rows: int, name: str) -> Rewards:
    """`out` with float64 rewards, after checking it has one reward (and verdict) per row.

    A non-finite reward (NaN, inf) is a failure of the source, never an input: inf would count
    as right and NaN would poison every advantage of its group. Such a row gets reward 0 and
    `correct` False, its detail becomes a verdict with `error="invalid"` and the reason (so the
    rollout counts it among the verifier errors), and the metrics count the rows as
    `{name}/non_finite` and in the total `reward/non_finite`.
    """
    rewards = np.asarray(out.rewards, np.float64)
    if rewards.shape != (rows,):
        raise ValueError(f"reward source {name!r} returned shape {rewards.shape}; expected ({rows},), "
                         "one reward per sampled row")
    if out.correct is not None and np.shape(out.correct) != (rows,):
        raise ValueError(f"reward source {name!r}: `correct` has shape {np.shape(out.correct)}; "
                         f"expected ({rows},)")
    bad = ~np.isfinite(rewards)
    if not bad.any():
        return dataclasses.replace(out, rewards=rewards)
    from verifiers import Verdict  # imports no JAX

    details = list(out.details) if out.details is not None else [None] * rows
    for i in np.flatnonzero(bad):
        details[i] = Verdict.fail(f"reward source {name!r} returned {rewards[i]}, not a finite reward; "
                                  "scored 0", error="invalid")
    log.warning("reward source %r returned %d non-finite reward(s) of %d; scored 0", name, bad.sum(), rows)
    metrics = dict(out.metrics)
    metrics[f"{name}/non_finite"] = metrics.get(f"{name}/non_finite", 0.0) + float(bad.sum())
    metrics["reward/non_finite"] = metrics.get("reward/non_finite", 0.0) + float(bad.sum())
    correct = None if out.correct is None else np.where(bad, False, np.asarray(out.correct, bool))
    return Rewards(np.where(bad, 0.0, rewards), correct, details, metrics)


@dataclasses.dataclass
class FnReward:
    """A reward source from a plain function of the completions: `fn(completions) -> [R]`."""

    fn: Callable[[Completions], Sequence[float] | np.ndarray]

    def __call__(self, completions: Completions) -> Rewards:
        return Rewards(np.asarray(self.fn(completions), np.float64))


@dataclasses.dataclass
class WeightedRewards:
    """A weighted sum of named reward sources: `sum_k weight_k * source_k(completions)`.

    `correct` and `details` come from the first source that gives them (the
    verifier, typically, even at weight 0: accuracy is then still measured);
    the metrics of all sources are merged. With a `timer` (`metrics.PhaseTimer`)
    each source's wall time is recorded as the phase of its name.

    Attributes:
      terms: name -> (source, weight), in call order.
      timer: optional phase timer.
    """

    terms: Mapping[str, tuple[RewardSource, float]]
    timer: Any = None

    def __call__(self, completions: Completions) -> Rewards:
        R = completions.num_rows
        total = np.zeros(R, np.float64)
        correct, details, metrics = None, None, {}
        for name, (source, weight) in self.terms.items():
            phase = self.timer.phase(name) if self.timer is not None else contextlib.nullcontext()
            with phase:
                out = checked(source(completions), R, name)
            total = total + weight * out.rewards
            if correct is None and out.correct is not None:
                correct, details = np.asarray(out.correct, bool), out.details
            non_finite = metrics.get("reward/non_finite", 0.0) + out.metrics.get("reward/non_finite", 0.0)
            metrics |= out.metrics | ({"reward/non_finite": non_finite} if non_finite else {})
        return Rewards(total, correct, details, metrics)

