"""Recursive reward modeling on multi-step arithmetic: errors compound up the chain, and checks contain them.

    python experiments/recursive_reward_modeling.py                 # 3 levels, CPU, about a minute
    python experiments/recursive_reward_modeling.py --levels 4 --gold-size 60

A task of level k is a computation of 2**k steps. Each step claims
``x + d = y`` (x, d digits); the next step starts from ``y mod 10``. A step may
be wrong (y off by 1 or 2); a computation is right when every step is. The error
rate per step is set so that half the computations of each level are right.

- Level 0's reward model (an MLP on the step's (x, d, y)) is trained on gold
  labels of single steps: what a person can check.
- Level k + 1's reward model sees the whole computation (all 2**(k+1) steps);
  its training labels come from an evaluator that sees the computation only
  through level k's verdicts on its two halves (`oversight.rrm`).
- Every level has a gold-labelled anchor set, never trained on.

The chain runs twice from the same data and seeds: unchecked (every composed
label is trained on) and checked (`LevelChecks`: a level below the anchor
threshold, or disagreeing with the level below beyond the tolerance, is flagged
and its labels deferred; a label that the level two below contradicts is
deferred). With `--run-dir` the deferred computations go on that run's rating
queue (`RUN_DIR/ratings.sqlite`, served by ``python -m ouroboros_jax.rate``).
It ends with one line per level:
`rrm: level=K anchor_accuracy checked=0.xx unchecked=0.yy deferred=0.zz`.

The reward models are small MLPs on numeric features, not language models: there
is no policy and no transformer checkpoint to export, so this script takes no
`--export_dir` (the Hugging Face export writes decoder LMs and their reward models).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import jax
import numpy as np
import tyro

from ouroboros_jax.oversight.classifier import init_mlp, predict_proba, train_classifier
from ouroboros_jax.oversight.rrm import (
    Decomposition,
    LevelChecks,
    LevelData,
    LevelReport,
    rating_queue,
    recursive_reward_modeling,
)


@dataclasses.dataclass(frozen=True)
class RRMExperiment:
    levels: int = 3
    """levels of the chain (level k: computations of 2**k steps)."""
    gold_size: int = 100
    """gold-labelled single steps that level 0 is trained on."""
    train_size: int = 4000
    """unlabelled computations per level >= 1."""
    anchor_size: int = 1000
    """gold-labelled anchor computations per level (never trained on)."""
    steps: int = 1500
    """optimizer steps per reward model."""
    batch_size: int = 128
    learning_rate: float = 3e-3
    hidden: int = 256
    """hidden width of the reward models' two layers."""
    anchor_threshold: float = 0.8
    consistency_tolerance: float = 0.15
    seed: int = 0
    run_dir: str | None = None
    """put the deferred computations on this run's rating queue (default: leave them out)."""


def make_tasks(n: int, level: int, rng: np.random.Generator) -> np.ndarray:
    """n computations of 2**level steps: [n, steps, 3] rows of (x, d, claimed y)."""
    num_steps = 2 ** level
    error_rate = 1.0 - 0.5 ** (1.0 / num_steps)  # half of the computations are right
    tasks = np.zeros((n, num_steps, 3), np.int64)
    x = rng.integers(0, 10, n)
    for s in range(num_steps):
        d = rng.integers(0, 10, n)
        wrong = rng.random(n) < error_rate
        off = rng.choice(np.array([-2, -1, 1, 2]), n)
        y = np.maximum(x + d + np.where(wrong, off, 0), 0)
        y = np.where(y == x + d, x + d + 1, y) * wrong + (x + d) * ~wrong  # an error never lands on the sum
        tasks[:, s] = np.stack([x, d, y], axis=1)
        x = y % 10
    return tasks


def gold(tasks: np.ndarray, level: int) -> np.ndarray:
    """A computation is right when every step's claimed y is x + d."""
    return np.all(tasks[..., 0] + tasks[..., 1] == tasks[..., 2], axis=-1)


def featurize(tasks: np.ndarray, level: int) -> np.ndarray:
    return (tasks.reshape(tasks.shape[0], -1) / 3.0).astype(np.float32)


def split(tasks: np.ndarray, level: int) -> list[np.ndarray]:
    half = tasks.shape[1] // 2
    return [tasks[:, :half], tasks[:, half:]]


def describe(tasks: np.ndarray, level: int) -> list[str]:
    return ["; ".join(f"{x} + {d} = {y}" for x, d, y in task) for task in tasks]


def make_fit(cfg: RRMExperiment):
    def fit(features: np.ndarray, labels: np.ndarray, level: int):
        params = init_mlp(jax.random.key(cfg.seed * 100 + level), features.shape[1], (cfg.hidden, cfg.hidden))
        result = train_classifier(params, features, labels, steps=cfg.steps,
                                  batch_size=min(cfg.batch_size, len(labels)),
                                  learning_rate=cfg.learning_rate, seed=cfg.seed + level)
        return lambda x: predict_proba(result.params, x)

    return fit


def make_levels(cfg: RRMExperiment) -> list[LevelData]:
    rng = np.random.default_rng(cfg.seed)
    levels = []
    for k in range(cfg.levels):
        train = make_tasks(cfg.gold_size if k == 0 else cfg.train_size, k, rng)
        anchor = make_tasks(cfg.anchor_size, k, rng)
        levels.append(LevelData(train=train, anchor=anchor, anchor_gold=gold(anchor, k),
                                train_gold=gold(train, k) if k == 0 else None))
    return levels


def fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.2f}"


def main(argv: Sequence[str] | None = None) -> dict[str, list[LevelReport]]:
    cfg = tyro.cli(RRMExperiment, args=argv, description=__doc__)
    if cfg.levels < 1:
        raise SystemExit("--levels must be >= 1")
    started = time.perf_counter()
    levels, decomposition = make_levels(cfg), Decomposition(featurize, split)
    defer = None
    if cfg.run_dir is not None:
        from ouroboros_jax.rate import RatingStore

        defer = rating_queue(RatingStore.in_run_dir(cfg.run_dir), describe)
    checks = LevelChecks(cfg.anchor_threshold, cfg.consistency_tolerance)
    runs = {"unchecked": recursive_reward_modeling(levels, decomposition, make_fit(cfg), checks=None,
                                                   gold_of=gold),
            "checked": recursive_reward_modeling(levels, decomposition, make_fit(cfg), checks=checks,
                                                 defer=defer, gold_of=gold)}
    print("level  run        anchor_acc  label_acc  labels  deferred  disagreement  flagged")
    for k in range(cfg.levels):
        for name, reports in runs.items():
            r = reports[k]
            print(f"{k:5d}  {name:9s}  {fmt(r.anchor_accuracy):>10s}  {fmt(r.label_accuracy):>9s}  "
                  f"{r.labels:6d}  {fmt(r.deferred):>8s}  {fmt(r.disagreement):>12s}  "
                  f"{'; '.join(r.reasons) if r.flagged else '-'}")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    for k in range(cfg.levels):
        c, u = runs["checked"][k], runs["unchecked"][k]
        print(f"rrm: level={k} anchor_accuracy checked={fmt(c.anchor_accuracy)} "
              f"unchecked={fmt(u.anchor_accuracy)} deferred={fmt(c.deferred)}")
    return runs


if __name__ == "__main__":
    main()
