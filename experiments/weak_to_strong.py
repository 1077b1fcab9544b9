"""Weak-to-strong supervision on CPU: a small MLP supervises a large one (Burns et al. 2023).

    python experiments/weak_to_strong.py                          # 3 seeds, CPU, about a minute
    python experiments/weak_to_strong.py --seeds 5 --confidence-coef 0.75

The task: points x in R^F (Gaussian); the label says whether
``sin(2 x0) + x1 x2 + 0.5 x3^2 - 0.5 x4 > 0.3``. The weak model is a narrow
MLP on x. The strong model is a wider MLP that reads x through a fixed
"pretrained" representation (x, the three nonlinear terms of the concept, and
8 random tanh features): the stand-in for a strong model's latent knowledge,
in which the concept is simple (in Burns et al. the strong models are
pretrained language models). Per seed:

1. the weak model is trained on a small gold-labelled set;
2. it labels a held-out pool (soft predictions);
3. the strong model is trained on the pool's weak labels, once with plain
   cross-entropy and once with the auxiliary confidence loss
   (`objectives.binary_classification(confidence_coef=...)`, warmed up over
   the first 20% of the steps), and once on the pool's gold labels (the ceiling);
4. all are scored on a test set; PGR = (strong_on_weak - weak) / (strong_on_gold - weak).

It ends with the means over seeds:
`weak_to_strong: weak=0.xx strong_gold=0.yy strong_on_weak=0.zz pgr=0.pp pgr_confidence=0.qq`.

The weak and strong models are small MLP classifiers, not language models: there is
no policy and no transformer checkpoint to export, so this script takes no
`--export_dir` (the Hugging Face export writes decoder LMs and their reward models).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import tyro

from ouroboros_jax.oversight.weak_to_strong import ModelSpec, Split, WeakToStrongResult, weak_to_strong


@dataclasses.dataclass(frozen=True)
class WeakToStrongExperiment:
    seeds: int = 3
    features: int = 8
    gold_size: int = 400
    """gold labels the weak model is trained on."""
    pool_size: int = 4000
    """held-out examples the weak model labels for the strong one."""
    test_size: int = 2000
    weak_hidden: int = 4
    """width of the weak model's one hidden layer (on the raw features)."""
    strong_hidden: int = 16
    """width of the strong model's one hidden layer (on the pretrained representation)."""
    steps: int = 800
    learning_rate: float = 3e-3
    confidence_coef: float = 0.5


def make_split(n: int, num_features: int, rng: np.random.Generator) -> Split:
    x = rng.normal(size=(n, num_features)).astype(np.float32)
    score = np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3] ** 2 - 0.5 * x[:, 4]
    return Split(x, (score > 0.3).astype(np.float32))


def pretrained_view(x: np.ndarray) -> np.ndarray:
    """The strong model's fixed representation of x: x, the nonlinear terms, random tanh features."""
    W = np.random.default_rng(123).normal(size=(x.shape[1], 8)).astype(np.float32)
    return np.concatenate([x, np.sin(2 * x[:, :1]), x[:, 1:2] * x[:, 2:3], x[:, 3:4] ** 2, np.tanh(x @ W)], 1)


def main(argv: Sequence[str] | None = None) -> list[WeakToStrongResult]:
    cfg = tyro.cli(WeakToStrongExperiment, args=argv, description=__doc__)
    if cfg.features < 5:
        raise SystemExit("--features must be >= 5 (the label reads x0..x4)")
    started = time.perf_counter()
    weak = ModelSpec((cfg.weak_hidden,), steps=cfg.steps, learning_rate=cfg.learning_rate)
    strong = ModelSpec((cfg.strong_hidden,), steps=cfg.steps, learning_rate=cfg.learning_rate)
    results = []
    print("seed  weak  strong_gold  strong_on_weak  strong_on_weak_conf   pgr  pgr_conf")
    for seed in range(cfg.seeds):
        rng = np.random.default_rng(seed)
        sizes = (cfg.gold_size, cfg.pool_size, cfg.test_size)
        gold, pool, test = (make_split(n, cfg.features, rng) for n in sizes)
        r = weak_to_strong(gold, pool, test, weak, strong, confidence_coef=cfg.confidence_coef, seed=seed,
                           strong_view=pretrained_view)
        results.append(r)
        print(f"{seed:4d}  {r.weak:.3f}  {r.strong_gold:11.3f}  {r.strong_on_weak:14.3f}  "
              f"{r.strong_on_weak_confidence:19.3f}  {r.pgr:5.2f}  {r.pgr_confidence:8.2f}", flush=True)
    mean = lambda name: float(np.mean([getattr(r, name) for r in results]))
    print(f"wall time {time.perf_counter() - started:.0f} s")
    print(f"weak_to_strong: weak={mean('weak'):.2f} strong_gold={mean('strong_gold'):.2f} "
          f"strong_on_weak={mean('strong_on_weak'):.2f} pgr={mean('pgr'):.2f} "
          f"pgr_confidence={mean('pgr_confidence'):.2f}")
    return results


if __name__ == "__main__":
    main()
