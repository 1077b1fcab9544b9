"""Self-Rewarding iterations: the model samples, judges its own samples, and trains on its judgements.

Yuan et al. 2024, "Self-Rewarding Language Models" (arXiv 2401.10020), Sec. 2:
iteration t starts from M_t, which

1. samples N candidate responses for each training prompt;
2. judges each candidate with its own rubric prompt (the LM-as-a-judge, here a
   `rewards.judge.Judge` holding M_t's parameters, or any `Scorer`), scores
   averaged over several judgements;
3. builds one preference pair per prompt: the highest-scoring candidate chosen,
   the lowest-scoring rejected, the prompt dropped when they score the same
   (`self_rewarding_pairs`);
4. trains M_{t+1} from M_t with DPO, M_t the frozen reference, through the one
   update step (`objectives.preference`, via `selfplay.preference.train_preference`).

Optionally, judge-training data (the paper's EFT set: labelled judgements) are
mixed into every iteration's pairs, as preference pairs whose chosen side is
the right verdict and whose rejected side a wrong one, so the judge is trained
by the same step. Every iteration reports the held-out gold accuracy (a set
never trained on, graded by a verifier the loop never sees) and the judge's
agreement with gold labels (`judge_agreement`), before the first iteration and
after each.

Dimension legend (docs/dimensions.md): B prompts, G candidates per prompt (N in the paper), R = B * G.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jaxtyping import Float

from ouroboros_jax.batch import EncodedPairs
from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.transformer import Params
from ouroboros_jax.rewards.judge import Judge, JudgeScores
from ouroboros_jax.sampling import DEFAULT_PROMPT_LEN_BUCKETS, generate
from ouroboros_jax.selfplay.preference import train_preference


class Scorer(Protocol):
    """Pointwise judgements of (prompt, response) rows by the model `params` (or by anything else)."""

    def __call__(self, params: Params, prompts: Sequence[str], responses: Sequence[str],
                 rng: jax.Array) -> JudgeScores: ...


def self_judge(judge: Judge) -> Scorer:
    """The model judges itself: `judge`'s template and parsing, with the parameters of the current M_t."""
    def score(params: Params, prompts: Sequence[str], responses: Sequence[str],
              rng: jax.Array) -> JudgeScores:
        return dataclasses.replace(judge, params=params).score(prompts, responses, rng)
    return score


def self_rewarding_pairs(
    scores_BG: Float[np.ndarray, "B G"], *, min_gap: float = 0.0,
) -> tuple[list[tuple[int, int, int]], dict[str, int]]:
    """The paper's pairs: per prompt, the best candidate chosen and the worst rejected.

    Args:
      scores_BG: the judge's score of candidate j of prompt i; NaN where no judgement parsed
        (such a candidate takes part in no pair).
      min_gap: a pair needs best - worst > min_gap (0: any difference; equal scores are a tie).
    Returns:
      (pairs, counts): pairs as (prompt i, chosen j, rejected j), the first candidate
      on equal best (worst) scores; counts of prompts dropped as ties and for having fewer
      than two scored candidates.
    """
    scores_BG = np.asarray(scores_BG, np.float64)
    if scores_BG.ndim != 2:
        raise ValueError(f"self_rewarding_pairs: scores must be [prompts, candidates], got {scores_BG.shape}")
    pairs, ties, unscored = [], 0, 0
    for i, row in enumerate(scores_BG):
        ok = np.flatnonzero(~np.isnan(row))
        if len(ok) < 2:
            unscored += 1
            continue
        best = int(ok[np.argmax(row[ok])])
        worst = int(ok[np.argmin(row[ok])])
        if row[best] - row[worst] <= min_gap:
            ties += 1
            continue
        pairs.append((i, best, worst))
    return pairs, {"ties": ties, "unscored": unscored}


def judge_agreement(scores: Float[np.ndarray, " R"], labels: Sequence[bool], threshold: float) -> float:
    """Fraction of rows where the judge's verdict (score >= threshold) equals the gold label.

    A row the judge could not score counts as a disagreement.
    """
    scores = np.asarray(scores, np.float64)
    if scores.shape != (len(labels),):
        raise ValueError(f"judge_agreement: {scores.shape} scores for {len(labels)} labels")
    says_good = np.where(np.isnan(scores), np.nan, scores >= threshold)
    return float(np.mean(says_good == np.asarray(labels, np.float64)))


@dataclasses.dataclass(frozen=True)
class JudgeLabels:
    """A gold-labelled judging set: is `responses[k]` a good answer to `prompts[k]`? (`labels[k]`)."""

    prompts: Sequence[str]
    responses: Sequence[str]
    labels: Sequence[bool]


@dataclasses.dataclass
class SelfRewardingIteration:
    """One iteration's outcome: M_{t+1}, the pairs it was trained on, and what was measured."""

    params: Params
    pairs: EncodedPairs
    metrics: dict[str, float]
    history: list[dict[str, float]]


@dataclasses.dataclass(frozen=True)
class SelfRewardingSettings:
    """What one iteration does (explicit values; experiment configs fill these).

    Attributes:
      num_candidates: N responses sampled per prompt; temperature, max_new_tokens: their sampling.
      steps, batch_size, learning_rate, beta: the DPO training of each iteration.
      min_gap: the score gap a pair needs (`self_rewarding_pairs`).
      judge_threshold: a score at or above it is a "good" verdict (for `judge_agreement`).
    """

    num_candidates: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 16
    steps: int = 50
    batch_size: int = 32
    learning_rate: float = 1e-4
    beta: float = 0.1
    min_gap: float = 0.0
    judge_threshold: float = 0.5


def self_rewarding_iteration(
    params: Params, model_config: ModelConfig, prompts: Sequence[str], *, scorer: Scorer,
    encode: Callable[[str], list[int]], decode: Callable[[Sequence[int]], str], stop_token_ids: Sequence[int],
    settings: SelfRewardingSettings, rng: jax.Array, judge_pairs: EncodedPairs | None = None,
    mesh: Any = None, seed: int = 0, prompt_len_buckets: Sequence[int] | None = DEFAULT_PROMPT_LEN_BUCKETS,
) -> SelfRewardingIteration:
    """M_t -> M_{t+1}: sample N per prompt, judge them (one scorer call), best vs worst, DPO against M_t."""
    s = settings
    prompt_ids = [encode(p) for p in prompts]
    sample_rng, judge_rng = jax.random.split(rng)
    out = generate(params, model_config, prompt_ids, max_new_tokens=s.max_new_tokens,
                   num_samples=s.num_candidates, temperature=s.temperature,
                   stop_token_ids=tuple(stop_token_ids), rng=sample_rng, mesh=mesh,
                   prompt_len_buckets=prompt_len_buckets)
    G = s.num_candidates
    rows = [[int(t) for t in row[:int(n)]] for row, n in zip(out.tokens, out.lengths, strict=True)]
    stops = set(int(t) for t in stop_token_ids)
    texts = [decode(r[:-1] if r and r[-1] in stops else r) for r in rows]
    judged = scorer(params, [p for p in prompts for _ in range(G)], texts, judge_rng)
    pairs_idx, counts = self_rewarding_pairs(judged.scores.reshape(len(prompts), G), min_gap=s.min_gap)
    pairs = EncodedPairs([list(prompt_ids[i]) for i, _, _ in pairs_idx],
                         [rows[i * G + a] for i, a, _ in pairs_idx],
                         [rows[i * G + b] for i, _, b in pairs_idx])
    metrics = {"pairs": float(pairs.size), "ties": float(counts["ties"]),
               "unscored": float(counts["unscored"]), **judged.metrics}
    if judge_pairs is not None and judge_pairs.size:
        pairs = EncodedPairs(pairs.prompts + judge_pairs.prompts, pairs.chosen + judge_pairs.chosen,
                             pairs.rejected + judge_pairs.rejected)
        metrics["judge_pairs"] = float(judge_pairs.size)
    if pairs.size == 0:
        return SelfRewardingIteration(params, pairs, metrics, [])
    result = train_preference(params, model_config, pairs, steps=s.steps, batch_size=s.batch_size,
                              learning_rate=s.learning_rate, beta=s.beta, objective="dpo", ref_params=params,
                              mesh=mesh, seed=seed)
    return SelfRewardingIteration(result.params, pairs, metrics, result.history)


def run_self_rewarding(
    params: Params, model_config: ModelConfig, prompts: Sequence[str], *, iterations: int,
    scorer: Scorer, heldout_accuracy: Callable[[Params], float], labels: JudgeLabels, rng: jax.Array,
    judge_prompts_per_iteration: int | None = None, measure_scorer: Scorer | None = None,
    report: Callable[[int, dict[str, float]], None] | None = None, **kwargs: Any,
) -> tuple[Params, list[dict[str, float]]]:
    """`iterations` Self-Rewarding iterations from `params`, each measured on held-out gold data.

    Args:
      prompts: the training prompts; iteration t uses `judge_prompts_per_iteration`
        of them (a fresh slice each time, as the paper draws new prompts), or all.
      scorer: who judges (`self_judge(judge)` for the model itself).
      heldout_accuracy: params -> accuracy on a held-out set graded by a gold verifier.
      labels: the gold-labelled judging set for the judge's agreement.
      measure_scorer: whose agreement with `labels` is reported (default: `scorer`); e.g. the
        model's own judgements in a loop judged by a verifier.
      report: called as report(t, metrics) for t = 0 (the start) .. iterations.
      kwargs: passed to `self_rewarding_iteration` (encode, decode, stop_token_ids, settings, ...).
    Returns:
      The final parameters and one metrics dict per measurement (iterations + 1 of them).
    """
    settings: SelfRewardingSettings = kwargs["settings"]

    def measure(p: Params, t: int, extra: dict[str, float]) -> dict[str, float]:
        judged = (measure_scorer or scorer)(p, labels.prompts, labels.responses,
                                            jax.random.fold_in(rng, 10_000 + t))
        m = {"iteration": float(t), "accuracy": heldout_accuracy(p),
             "judge_agreement": judge_agreement(judged.scores, labels.labels, settings.judge_threshold),
             **extra}
        if report is not None:
            report(t, m)
        return m

    seed = kwargs.pop("seed", 0)
    out = [measure(params, 0, {})]
    per = judge_prompts_per_iteration or len(prompts)
    for t in range(iterations):
        chunk = [prompts[(t * per + k) % len(prompts)] for k in range(per)]
        it = self_rewarding_iteration(params, model_config, chunk, scorer=scorer,
                                      rng=jax.random.fold_in(rng, t), seed=seed + t, **kwargs)
        params = it.params
        last = it.history[-1] if it.history else {}
        out.append(measure(params, t + 1, {**it.metrics, "dpo_loss": last.get("loss", float("nan"))}))
    return params, out
