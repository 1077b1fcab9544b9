"""Held-out evaluation: pass@1 (greedy and sampled), unbiased pass@k, majority vote @k.

Formulas:
- pass@k, unbiased (Chen et al. 2021, "Evaluating Large Language Models Trained
  on Code", eq. 1): with n samples of which c are correct,
  pass@k = 1 - C(n - c, k) / C(n, k), averaged over problems.
- sampled pass@1 is the same estimator at k = 1, i.e. the mean correctness of
  the n samples.
- maj@k: the most frequent extracted answer among the first k samples (ties go
  to the earliest); the problem counts when that answer was graded correct.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.rewards.base import Completions
from ouroboros_jax.rewards.verifier import ScoreFn
from ouroboros_jax.rollout import strip_stop
from ouroboros_jax.sampling import DEFAULT_PROMPT_LEN_BUCKETS, generate


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `c` correct out of `n` samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i), the numerically stable product form
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_correct(verdicts: Sequence[Any]) -> bool:
    """Whether the most common extracted answer (earliest on ties) was graded correct."""
    answers = [(str(v.extracted), bool(v.correct)) for v in verdicts if v.extracted is not None]
    if not answers:
        return False
    counts = Counter(a for a, _ in answers)
    best = max(counts.values())
    winner = next(a for a, _ in answers if counts[a] == best)
    return any(ok for a, ok in answers if a == winner)


def _complete(params, cfg, prompt_ids, *, n, temperature, max_new_tokens, stop_token_ids, rng, mesh,
              decode, batch_size, buckets):
    texts, lengths = [], []
    for start in range(0, len(prompt_ids), batch_size):
        out = generate(params, cfg, prompt_ids[start:start + batch_size], max_new_tokens=max_new_tokens,
                       num_samples=n, temperature=temperature, stop_token_ids=stop_token_ids,
                       rng=jax.random.fold_in(rng, start), mesh=mesh, prompt_len_buckets=buckets)
        texts += [decode(strip_stop(row[:m], stop_token_ids)) for row, m in zip(out.tokens, out.lengths,
                                                                                  strict=True)]
        lengths += list(out.lengths)
    return texts, np.asarray(lengths, np.float64)


def evaluate(
    params: Any, model_config: ModelConfig, examples: Sequence[Any], prompt_ids: Sequence[Sequence[int]],
    *, decode: Callable[[Sequence[int]], str], score: ScoreFn, num_samples: int, max_new_tokens: int,
    stop_token_ids: Sequence[int], rng: jax.Array, temperature: float = 1.0, ks: Sequence[int] = (),
    mesh: Any = None, batch_size: int = 64, prompt_len_buckets: Sequence[int] = DEFAULT_PROMPT_LEN_BUCKETS,
) -> dict[str, float]:
    """Greedy and sampled accuracy of `params` on held-out examples.

    Returns a flat dict: `eval/greedy_acc`, `eval/pass@1` (sampled, unbiased),
    `eval/pass@k` and `eval/maj@k` for each k in `ks` (k <= num_samples, and
    num_samples itself), `eval/length`, `eval/format_error` (fraction of sampled
    completions from which no answer could be extracted).
    """
    gold = [ex.gold for ex in examples]
    common = dict(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_token_ids), mesh=mesh,
                  decode=decode, batch_size=batch_size, buckets=tuple(prompt_len_buckets))
    greedy_texts, _ = _complete(params, model_config, list(prompt_ids), n=1, temperature=0.0,
                                rng=rng, **common)
    greedy = [bool(v.correct) for v in score(greedy_texts, gold)]
    texts, lengths = _complete(params, model_config, list(prompt_ids), n=num_samples,
                               temperature=temperature, rng=jax.random.fold_in(rng, 1), **common)
    verdicts = list(score(texts, [g for g in gold for _ in range(num_samples)]))
    correct = np.array([bool(v.correct) for v in verdicts]).reshape(len(examples), num_samples)
    out = {
        "eval/greedy_acc": float(np.mean(greedy)),
        "eval/pass@1": float(correct.mean()),
        "eval/length": float(lengths.mean()),
        "eval/format_error": float(np.mean([v.extracted is None for v in verdicts])),
    }
    for k in sorted({*ks, num_samples}):
        if k > num_samples:
            continue
        out[f"eval/pass@{k}"] = float(np.mean([pass_at_k(num_samples, int(c), k) for c in correct.sum(1)]))
        groups = [verdicts[i * num_samples:i * num_samples + k] for i in range(len(examples))]
        out[f"eval/maj@{k}"] = float(np.mean([majority_correct(g) for g in groups]))
    return out


# ---------------------------------------------------------------------------
# Best-of-N: sample N, keep the one a reward model or a judge scores highest


def best_of_n_choice(rewards_BG: np.ndarray) -> np.ndarray:
    """Index [B] of the highest-rewarded sample of each prompt (the first on equal rewards).

    NaN rewards (an unscored sample) are never chosen unless a whole row is NaN (then sample 0).
    """
    rewards_BG = np.asarray(rewards_BG, np.float64)
    if rewards_BG.ndim != 2:
        raise ValueError(f"best_of_n_choice: rewards must be [prompts, samples], got {rewards_BG.shape}")
    return np.argmax(np.where(np.isnan(rewards_BG), -np.inf, rewards_BG), axis=1)


def evaluate_best_of_n(
    params: Any, model_config: ModelConfig, examples: Sequence[Any], prompt_ids: Sequence[Sequence[int]],
    *, decode: Callable[[Sequence[int]], str], score: ScoreFn, reward: Callable[[Any], Any], n: int,
    max_new_tokens: int, stop_token_ids: Sequence[int], rng: jax.Array, temperature: float = 1.0,
    mesh: Any = None, prompt_len_buckets: Sequence[int] = DEFAULT_PROMPT_LEN_BUCKETS,
) -> dict[str, float]:
    """Best-of-N at inference: N samples per prompt, the reward source's favourite kept.

    `reward` is any reward source (`rewards.ModelReward`, `rewards.JudgeReward`, ...),
    called once on all B * N samples; `score` is the gold verifier. Returns
    `eval/best_of_{n}` (pass@1 of the kept sample), beside `eval/pass@1` (the mean of
    all samples), `eval/maj@{n}` and `eval/pass@{n}` on the same samples, and
    `eval/best_of_{n}_oracle_gap` (pass@n minus best-of-n: what a perfect scorer would add).
    """
    out = generate(params, model_config, list(prompt_ids), max_new_tokens=max_new_tokens, num_samples=n,
                   temperature=temperature, stop_token_ids=tuple(stop_token_ids), rng=rng, mesh=mesh,
                   prompt_len_buckets=tuple(prompt_len_buckets))
    texts = [decode(strip_stop(row[:m], stop_token_ids))
             for row, m in zip(out.tokens, out.lengths, strict=True)]
    rewards = np.asarray(reward(Completions(out, texts, list(examples))).rewards, np.float64)
    verdicts = list(score(texts, [ex.gold for ex in examples for _ in range(n)]))
    correct = np.array([bool(v.correct) for v in verdicts]).reshape(len(examples), n)
    kept = best_of_n_choice(rewards.reshape(len(examples), n))
    best = float(correct[np.arange(len(examples)), kept].mean())
    groups = [verdicts[i * n:(i + 1) * n] for i in range(len(examples))]
    any_right = float(correct.any(axis=1).mean())
    return {f"eval/best_of_{n}": best, "eval/pass@1": float(correct.mean()),
            f"eval/maj@{n}": float(np.mean([majority_correct(g) for g in groups])),
            f"eval/pass@{n}": any_right, f"eval/best_of_{n}_oracle_gap": any_right - best}
