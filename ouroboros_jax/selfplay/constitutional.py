"""Constitutional AI: critique and revision (SL phase), AI preferences under principles (RL phase).

Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback" (arXiv 2212.08073):

- SL phase (`critique_and_revise`, then `sft_on_revisions`): the model answers
  each prompt; for each answer it draws a principle of the constitution,
  writes a critique following the principle's critique request, then a
  revision following its revision request; several rounds revise the last
  revision again, each with a newly drawn principle. The model is then
  fine-tuned on (prompt, final revision) with `objectives.sft` through the one
  update step.
- RL phase (RLAIF; `ai_preference_pairs`): for pairs of responses to a
  prompt, a feedback model (a `rewards.judge.Judge`) says which is better under
  a drawn principle's preference question, judged in both orders (ties
  dropped); the resulting preference pairs train a Bradley-Terry reward model
  (`selfplay.reward_model.train_reward_model`), and the policy is trained
  against it with GRPO (`trainer.train` with a `rewards.ModelReward`).
  Pairs whose generated verdicts leave them undecided (a tie, or verdicts that
  did not parse) can be labelled instead from the feedback model's
  log-probabilities of the two answers (`choice_preferences`), as the paper
  labels every comparison.

The constitution is a JSON file: {"principles": [{"name", "critique_request",
"revision_request", "preference"}, ...]}; one ships with the package
(`constitution.json`, `load_constitution()`). How the model is asked is a
`CritiqueTemplates` (text with `{prompt}`, `{response}`, `{critique_request}`,
`{critique}`, `{revision_request}` placeholders): plain text for an instruct
model (apply its chat template in `encode`), or a compact form for a toy task.
Every stage runs as one sampler call for all prompts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Float

from ouroboros_jax.batch import EncodedPairs, pack_rows
from ouroboros_jax.config import ModelConfig
from ouroboros_jax.data import DataError
from ouroboros_jax.models.transformer import Params
from ouroboros_jax.rewards.judge import Judge, fill
from ouroboros_jax.sampling import DEFAULT_PROMPT_LEN_BUCKETS, generate
from ouroboros_jax.selfplay.generations import token_stats
from ouroboros_jax.selfplay.preference import PreferencePair, encode_pairs
from ouroboros_jax.supervised import supervised_warmstart

CONSTITUTION_PATH = Path(__file__).with_name("constitution.json")
PRINCIPLE_FIELDS = ("name", "critique_request", "revision_request", "preference")


@dataclasses.dataclass(frozen=True)
class Principle:
    """One principle: how to critique a response, how to revise it, and which of two to prefer."""

    name: str
    critique_request: str
    revision_request: str
    preference: str


def load_constitution(path: str | os.PathLike[str] | None = None) -> list[Principle]:
    """The principles of a constitution file (default: the one shipped with the package).

    Raises:
      DataError: naming the file and the principle for invalid JSON, a missing or
        empty field, or a file with no principles.
    """
    file = Path(path) if path is not None else CONSTITUTION_PATH
    if not file.is_file():
        raise DataError(f"constitution {file}: no such file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"constitution {file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    items = data.get("principles") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise DataError(f"constitution {file}: expected an object with a non-empty list 'principles'")
    out = []
    for k, item in enumerate(items):
        where = f"constitution {file}: principle {k}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object, got {type(item).__name__}")
        for name in PRINCIPLE_FIELDS:
            if not isinstance(item.get(name), str) or not item[name].strip():
                raise DataError(f"{where}: field {name!r} missing or not a non-empty string")
        out.append(Principle(*(item[name] for name in PRINCIPLE_FIELDS)))
    return out


def draw_principles(constitution: Sequence[Principle], n: int, rng: random.Random) -> list[Principle]:
    """`n` principles drawn uniformly with replacement (one per response, as in the paper)."""
    if not constitution:
        raise ValueError("draw_principles: the constitution has no principles")
    return [rng.choice(list(constitution)) for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class CritiqueTemplates:
    """How the model is asked to critique and revise (placeholders in braces)."""

    critique: str = ("{prompt}\n\nResponse: {response}\n\nCritique request: {critique_request}\n\n"
                     "Critique:")
    revision: str = ("{prompt}\n\nResponse: {response}\n\nCritique request: {critique_request}\n\n"
                     "Critique: {critique}\n\nRevision request: {revision_request}\n\nRevision:")


@dataclasses.dataclass
class Revisions:
    """The SL phase's record for B prompts: first tries, and per round critiques, revisions, principles."""

    prompts: list[str]
    initial: list[str]
    critiques: list[list[str]]
    revisions: list[list[str]]
    principles: list[list[str]]

    @property
    def final(self) -> list[str]:
        return self.revisions[-1] if self.revisions else self.initial


@dataclasses.dataclass(frozen=True)
class Generator:
    """The sampler with fixed settings: texts in, one text out per row (one sampler call)."""

    params: Params
    model_config: ModelConfig
    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    stop_token_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    mesh: Mesh | None = None
    prompt_len_buckets: Sequence[int] | None = DEFAULT_PROMPT_LEN_BUCKETS

    def __call__(self, texts: Sequence[str], rng: jax.Array, num_samples: int = 1) -> list[str]:
        out = generate(self.params, self.model_config, [self.encode(t) for t in texts],
                       max_new_tokens=self.max_new_tokens, num_samples=num_samples,
                       temperature=self.temperature, stop_token_ids=tuple(self.stop_token_ids), rng=rng,
                       mesh=self.mesh, prompt_len_buckets=self.prompt_len_buckets)
        stops = {int(s) for s in self.stop_token_ids}
        rows = [[int(t) for t in row[:int(n)]] for row, n in zip(out.tokens, out.lengths, strict=True)]
        return [self.decode(r[:-1] if r and r[-1] in stops else r) for r in rows]


def critique_and_revise(
    generator: Generator, prompts: Sequence[str], constitution: Sequence[Principle], *, rounds: int = 1,
    templates: CritiqueTemplates = CritiqueTemplates(), rng: jax.Array, seed: int = 0,
    initial: Sequence[str] | None = None,
) -> Revisions:
    """First tries (or `initial`), then `rounds` of critique and revision, each under a drawn principle.

    Each stage is one sampler call for all prompts: 1 + 2 * rounds calls in all.
    """
    draw = random.Random(seed)
    first = list(initial) if initial is not None else generator(prompts, jax.random.fold_in(rng, 0))
    if len(first) != len(prompts):
        raise ValueError(f"critique_and_revise: {len(first)} initial responses for {len(prompts)} prompts")
    out = Revisions(list(prompts), first, [], [], [])
    current = first
    for r in range(rounds):
        principles = draw_principles(constitution, len(prompts), draw)
        asks = [dict(prompt=p, response=x, critique_request=c.critique_request,
                     revision_request=c.revision_request)
                for p, x, c in zip(prompts, current, principles, strict=True)]
        critiques = generator([fill(templates.critique, **a) for a in asks],
                              jax.random.fold_in(rng, 2 * r + 1))
        current = generator([fill(templates.revision, critique=c, **a)
                             for a, c in zip(asks, critiques, strict=True)],
                            jax.random.fold_in(rng, 2 * r + 2))
        out.critiques.append(critiques)
        out.revisions.append(current)
        out.principles.append([c.name for c in principles])
    return out


class _Cycle:
    """Examples drawn in order, round and round (a prompt source for `supervised_warmstart`)."""

    def __init__(self, items: Sequence[Any]):
        self.items, self.next = list(items), 0

    def take(self, n: int) -> list[Any]:
        out = [self.items[(self.next + k) % len(self.items)] for k in range(n)]
        self.next = (self.next + n) % len(self.items)
        return out


def sft_on_revisions(
    params: Params, model_config: ModelConfig, prompts: Sequence[str], revisions: Sequence[str], *,
    encode: Callable[[str], list[int]], eos_id: int, steps: int, batch_size: int, learning_rate: float,
    keep: Callable[[str, str], bool] | None = None, mesh: Any = None, seed: int = 0,
    length: int | None = None,
) -> tuple[Params, int]:
    """Supervised fine-tuning on (prompt, revision) through the one step (`objectives.sft`).

    `keep(prompt, revision)` filters the rows (e.g. drop empty revisions). Returns the new
    parameters and the number of rows trained on.
    """
    rows = [(p, r) for p, r in zip(prompts, revisions, strict=True) if r and (keep is None or keep(p, r))]
    if not rows:
        return params, 0
    new = supervised_warmstart(params, model_config, _Cycle(rows),
                               encode=lambda xs: [encode(p) for p, _ in xs],
                               answer_ids=lambda x: encode(x[1]) + [eos_id], steps=steps,
                               batch_size=batch_size, learning_rate=learning_rate, seed=seed, mesh=mesh,
                               length=length)
    return new, len(rows)


def choice_preferences(
    judge: Judge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], *,
    fields: Sequence[Mapping[str, str]] | None = None, choices: tuple[str, str] = ("Better: A", "Better: B"),
    encode_choice: Callable[[str], list[int]],
) -> Float[np.ndarray, " P"]:
    """P(a is better) from the judge's log-probabilities of answering `choices[0]` (A) or `choices[1]` (B).

    Each pair's pairwise prompt is scored in both orders (a shown as A, then as
    B); within an order the two answers' probabilities are normalised, and the
    two orders are averaged, which cancels a constant position bias (Bai et al.
    2022, sec. 4.1: preference labels from the feedback model's normalised
    log-probabilities of the options). Nothing is parsed, so every pair gets a
    probability; one teacher-forced forward over 4 rows per pair.

    Args:
      encode_choice: answer text -> token ids, appended to the encoded judge prompt
        (plain tokenizer encoding: the answer continues the assistant turn).
    """
    if not len(prompts) == len(a) == len(b):
        raise ValueError(f"choice_preferences: {len(prompts)} prompts, {len(a)} a's and {len(b)} b's")
    P = len(prompts)
    if P == 0:
        return np.zeros(0)
    extra = list(fields) if fields is not None else [{}] * P
    shown = [(p, x, y, f) for p, x, y, f in zip(prompts, a, b, extra, strict=True)]
    shown += [(p, y, x, f) for p, x, y, f in zip(prompts, a, b, extra, strict=True)]
    asks = [judge.encode(fill(judge.pairwise_template, prompt=p, response_a=x, response_b=y, **f))
            for p, x, y, f in shown]
    answers = [encode_choice(c) for c in choices]
    batch = pack_rows(asks * 2, [answers[0]] * (2 * P) + [answers[1]] * (2 * P))
    logp, _ = token_stats(judge.params, judge.model_config, batch.tokens, batch.attention_mask)
    total = np.where(batch.loss_mask, logp, 0.0).sum(axis=1)  # [4P]: A then B answers, both orders
    says_a = 1.0 / (1.0 + np.exp(total[2 * P:] - total[:2 * P]))  # [2P]: P(answer A) per shown order
    return 0.5 * (says_a[:P] + 1.0 - says_a[P:])


def ai_preferences(
    judge: Judge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str],
    constitution: Sequence[Principle], *, rng: jax.Array, seed: int = 0,
    undecided: Literal["drop", "logprob"] = "drop", choices: tuple[str, str] = ("Better: A", "Better: B"),
    encode_choice: Callable[[str], list[int]] | None = None,
) -> tuple[list[PreferencePair], dict[str, float]]:
    """RLAIF labels: the judge compares a and b under a drawn principle (`{principle}` in its pairwise
    template gets the principle's preference question), both orders, one sampler call.

    Pairs the verdicts leave undecided (ties: the orders disagree or did not
    parse) are dropped (`undecided="drop"`), or labelled by `choice_preferences`
    (`undecided="logprob"`, with `choices` and `encode_choice`); a pair whose
    probability is exactly 1/2 is dropped either way.

    Returns:
      The (prompt, preferred, other) pairs, their `id` the principle judged under, and the
      judge's metrics (position consistency, ties, parse failures) with `pairs`,
      `pairs/by_verdict`, `pairs/by_logprob` and `pairs/dropped`.
    """
    if undecided not in ("drop", "logprob"):
        raise ValueError(f"ai_preferences: undecided must be 'drop' or 'logprob' (got {undecided!r})")
    if undecided == "logprob" and encode_choice is None:
        raise ValueError("ai_preferences: undecided='logprob' needs encode_choice")
    principles = draw_principles(constitution, len(prompts), random.Random(seed))
    fields = [{"principle": p.preference} for p in principles]
    out = judge.compare(prompts, a, b, rng, fields=fields)
    outcomes = list(out.outcomes)
    ties = [i for i, o in enumerate(outcomes) if o == "tie"]
    if undecided == "logprob" and ties:
        prob_a = choice_preferences(judge, [prompts[i] for i in ties], [a[i] for i in ties],
                                    [b[i] for i in ties], fields=[fields[i] for i in ties], choices=choices,
                                    encode_choice=encode_choice)
        for i, p in zip(ties, prob_a, strict=True):
            outcomes[i] = "a" if p > 0.5 else "b" if p < 0.5 else "tie"
    pairs = [PreferencePair(p, *((x, y) if o == "a" else (y, x)), id=c.name)
             for p, x, y, o, c in zip(prompts, a, b, outcomes, principles, strict=True) if o != "tie"]
    by_verdict = len(outcomes) - len(ties)
    return pairs, {**out.metrics, "pairs": float(len(pairs)), "pairs/by_verdict": float(by_verdict),
                   "pairs/by_logprob": float(len(pairs) - by_verdict),
                   "pairs/dropped": float(len(outcomes) - len(pairs))}


def ai_preference_pairs(
    judge: Judge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str],
    constitution: Sequence[Principle], *, rng: jax.Array, seed: int = 0,
    encode: Callable[[str], list[int]], encode_response: Callable[[str], list[int]],
    undecided: Literal["drop", "logprob"] = "drop", choices: tuple[str, str] = ("Better: A", "Better: B"),
    encode_choice: Callable[[str], list[int]] | None = None,
) -> tuple[EncodedPairs, dict[str, float]]:
    """`ai_preferences`, encoded: prompts with `encode`, responses with `encode_response`.

    Returns:
      The encoded (prompt, preferred, other) pairs and the judge's metrics (see `ai_preferences`).
    """
    pairs, metrics = ai_preferences(judge, prompts, a, b, constitution, rng=rng, seed=seed,
                                    undecided=undecided, choices=choices, encode_choice=encode_choice)
    return encode_pairs(pairs, encode, encode_response), metrics
