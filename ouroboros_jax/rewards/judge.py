"""A language model as judge: pointwise rubric scores and pairwise preferences.

The judge is any decoder LM (the policy itself, or another checkpoint) run
through the jit sampler (`sampling.generate`) on a prompt built from a
template. Two modes:

- pointwise (`Judge.score`, and `JudgeReward` as a reward source): the template
  holds `{prompt}` and `{response}`; the judge writes a verdict from which a
  score is parsed (`parse_score`). The shipped default is the additive 5-point
  rubric of Self-Rewarding language models (Yuan et al. 2024, arXiv
  2401.10020, Fig. 2), in our own wording: one point for each criterion met,
  the verdict ending in "Score: <points>".
- pairwise (`Judge.compare`): the template holds `{prompt}`, `{response_a}` and
  `{response_b}`; the judge names the better one ("A" or "B"). Each pair is
  judged in both orders to cancel position bias; when the two orders disagree
  the pair is a tie (`combine_orders`), and the position-consistency rate (the
  fraction of pairs whose two orders agree) is logged.

A verdict that does not parse is an error with a reason, never a silent zero:
`parse_score` / `parse_choice` return the reason, the failures are counted in
the metrics, and a row none of whose judgements parsed has no score
(`JudgeScores.valid` False); `JudgeReward` then raises (`on_failure="raise"`)
or gives the row the rubric's lowest score and says how many rows that was
(`on_failure="lowest"`).

Judgements are greedy (temperature 0) or sampled; with `num_samples` > 1 the
parsed scores of a row are averaged (pointwise) or the choices of each order
counted (pairwise). Judging is batched: all rows of a call go into one
sampler call (`num_samples` judgements each).

Dimension legend (docs/dimensions.md): R rows, J judgements per row.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Bool, Float

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.transformer import Params
from ouroboros_jax.rewards.base import Completions, Rewards
from ouroboros_jax.sampling import DEFAULT_PROMPT_LEN_BUCKETS, generate

DEFAULT_POINTWISE_TEMPLATE = """\
Review the user's question and the response below, and score the response with the additive \
5-point system described here. Points add up, one for each criterion the response meets:
- Add 1 point if the response is relevant and gives some information related to the question, \
even if it is incomplete or contains some irrelevant content.
- Add a 2nd point if the response addresses a substantial part of the question but does not \
answer it fully or directly.
- Add a 3rd point if the response answers the basic elements of the question usefully, even if \
it reads like a search result or misses some detail.
- Add a 4th point if the response is written from an assistant's point of view, addresses the \
question directly and completely, and is well organised, with at most small room for improvement \
in clarity, length or focus.
- Add a 5th point if the response is tailored to the question without extraneous content, shows \
expert knowledge, and is engaging and insightful.

Question: {prompt}
Response: {response}

Explain your total in at most 100 words, then end with a line of the form "Score: <points>".
"""

DEFAULT_PAIRWISE_TEMPLATE = """\
Compare two responses to the user's question and decide which one is more helpful, correct and \
harmless. Judge the content only: neither the order of the responses nor their length matters.

Question: {prompt}
Response A: {response_a}
Response B: {response_b}

Explain your decision in at most 100 words, then end with a line of the form "Better: A" or "Better: B".
"""

DEFAULT_SCORE_PATTERN = r"Score:\s*([-+]?[0-9]+(?:\.[0-9]+)?)"
DEFAULT_CHOICE_PATTERN = r"Better:\s*\(?([AB])\)?"
POINTWISE_FIELDS = ("{prompt}", "{response}")
PAIRWISE_FIELDS = ("{prompt}", "{response_a}", "{response_b}")


class JudgeError(ValueError):
    """The judge's verdicts could not be used (a row with no parsable judgement, a bad template)."""


# ---------------------------------------------------------------------------
# Templates


def load_template(template: str | Path, fields: Sequence[str]) -> str:
    """A template's text: the text itself, or read from a file (a `Path`, or a string with no `{`).

    Raises:
      JudgeError: naming the file and the missing placeholder when a field of `fields` is absent.
    """
    where = "template"
    if isinstance(template, Path) or "{" not in template:  # template text always has placeholders
        file = Path(template)
        if not file.is_file():
            raise JudgeError(f"judge template file {file}: no such file")
        template, where = file.read_text(encoding="utf-8"), f"judge template file {file}"
    missing = [f for f in fields if f not in template]
    if missing:
        raise JudgeError(f"{where}: missing placeholder(s) {missing}; a template needs {list(fields)}")
    return template


def fill(template: str, **values: str) -> str:
    """`template` with `{name}` replaced by each value (other braces are left as written)."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


# ---------------------------------------------------------------------------
# Parsing verdicts


@dataclasses.dataclass(frozen=True)
class Parsed:
    """One parsed judgement: `value` (a score, or "A" / "B") or None with the `reason` it failed."""

    value: Any
    reason: str = ""


def parse_score(text: str, *, pattern: str = DEFAULT_SCORE_PATTERN, low: float = 0.0,
                high: float = 5.0) -> Parsed:
    """The score of a pointwise verdict: the last match of `pattern` (group 1), within [low, high].

    Returns `Parsed(score)` or `Parsed(None, reason)` (no match, not a number, out of range).
    """
    matches = list(re.finditer(pattern, text))
    if not matches:
        return Parsed(None, f"no score found (pattern {pattern!r}) in {text[-60:]!r}")
    raw = matches[-1].group(1)
    try:
        score = float(raw)
    except ValueError:
        return Parsed(None, f"score {raw!r} is not a number")
    if not math.isfinite(score) or not low <= score <= high:
        return Parsed(None, f"score {raw} outside [{low:g}, {high:g}]")
    return Parsed(score)


def parse_choice(text: str, *, pattern: str = DEFAULT_CHOICE_PATTERN) -> Parsed:
    """The choice of a pairwise verdict: the last match of `pattern`, "A" or "B"."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return Parsed(None, f"no choice found (pattern {pattern!r}) in {text[-60:]!r}")
    choice = matches[-1].group(1).strip().upper()
    if choice not in ("A", "B"):
        return Parsed(None, f"choice {choice!r} is neither A nor B")
    return Parsed(choice)


def combine_orders(first: Sequence[str | None], swapped: Sequence[str | None]) -> tuple[str, bool]:
    """One pair's outcome from its judgements in both orders.

    Args:
      first: the choices ("A", "B" or None when unparsed) with a shown as A, b as B.
      swapped: the choices with b shown as A, a as B.
    Returns:
      (outcome, consistent): outcome "a", "b" or "tie"; consistent is True when
      both orders prefer the same response. Within one order the majority of
      the parsed choices counts (an even split, or no parsed choice, prefers
      neither); a pair is decided only when both orders prefer the same side.
    """
    def prefers_a(choices: Sequence[str | None], a_label: str) -> float:
        parsed = [c for c in choices if c is not None]
        if not parsed:
            return 0.0
        share = sum(c == a_label for c in parsed) / len(parsed)
        return 1.0 if share > 0.5 else -1.0 if share < 0.5 else 0.0

    one, two = prefers_a(first, "A"), prefers_a(swapped, "B")
    if one == two and one != 0.0:
        return ("a" if one > 0 else "b"), True
    return "tie", False


# ---------------------------------------------------------------------------
# The judge


@dataclasses.dataclass
class JudgeScores:
    """Pointwise judgements of R rows (J = num_samples judgements each).

    Attributes:
      scores: [R] mean parsed score of each row; NaN where none parsed.
      valid: [R] whether at least one judgement of the row parsed.
      texts: the R * J verdicts, row-major.
      reasons: for each row, the failure reasons of its unparsed judgements.
    """

    scores: Float[np.ndarray, " R"]
    valid: Bool[np.ndarray, " R"]
    texts: list[str]
    reasons: list[list[str]]

    @property
    def metrics(self) -> dict[str, float]:
        failures = sum(len(r) for r in self.reasons)
        return {"judge/parse_failures": float(failures),
                "judge/parse_failure_rate": failures / max(len(self.texts), 1),
                "judge/invalid_rows": float((~self.valid).sum()),
                "judge/score": float(np.nanmean(self.scores)) if self.valid.any() else float("nan")}


@dataclasses.dataclass
class JudgeComparisons:
    """Pairwise judgements of P pairs: outcomes "a" / "b" / "tie", and how consistent the orders were."""

    outcomes: list[str]
    consistent: Bool[np.ndarray, " P"]
    texts: list[str]
    reasons: list[list[str]]

    @property
    def metrics(self) -> dict[str, float]:
        failures = sum(len(r) for r in self.reasons)
        return {"judge/position_consistency": float(self.consistent.mean()) if len(self.consistent) else 0.0,
                "judge/ties": float(sum(o == "tie" for o in self.outcomes)),
                "judge/parse_failures": float(failures),
                "judge/parse_failure_rate": failures / max(len(self.texts), 1)}


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """A judge's settings as an experiment config holds them (tyro reads it as `--judge.*`).

    Attributes:
      template: the pointwise template, as text or a file path ("" for the 5-point rubric).
      pairwise_template: the pairwise template, as text or a file path ("" for the default).
      score_pattern, low, high, choice_pattern: how verdicts are read.
      max_new_tokens, temperature, num_samples: how verdicts are sampled.
      on_failure: "raise" or "lowest" for a row with no parsable verdict (`JudgeReward`).
    """

    template: str = ""
    pairwise_template: str = ""
    score_pattern: str = DEFAULT_SCORE_PATTERN
    low: float = 0.0
    high: float = 5.0
    choice_pattern: str = DEFAULT_CHOICE_PATTERN
    max_new_tokens: int = 128
    temperature: float = 0.0
    num_samples: int = 1
    on_failure: str = "raise"

    def __post_init__(self) -> None:
        if self.on_failure not in ("raise", "lowest"):
            raise JudgeError(f"judge.on_failure: must be 'raise' or 'lowest' (got {self.on_failure!r})")
        if self.max_new_tokens < 1:
            raise JudgeError(f"judge.max_new_tokens: must be >= 1 (got {self.max_new_tokens})")


@dataclasses.dataclass
class Judge:
    """A language model that judges responses through the sampler.

    Attributes:
      params, model_config: the judge model (the policy's own parameters, or another checkpoint's).
      encode: judge prompt text -> token ids (apply a chat template here for an instruct model).
      decode: verdict token ids -> text.
      template: the pointwise template (`{prompt}`, `{response}`), its text or a file path.
      pairwise_template: the pairwise template (`{prompt}`, `{response_a}`, `{response_b}`).
      score_pattern, low, high: how a score is read and its valid range.
      choice_pattern: how a pairwise choice is read.
      max_new_tokens: verdict length; stop_token_ids: end a verdict.
      temperature: 0 for greedy judgements; num_samples: judgements per row (averaged).
      mesh, prompt_len_buckets: passed to the sampler.
    """

    params: Params
    model_config: ModelConfig
    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    template: str | Path = DEFAULT_POINTWISE_TEMPLATE
    pairwise_template: str | Path = DEFAULT_PAIRWISE_TEMPLATE
    score_pattern: str = DEFAULT_SCORE_PATTERN
    low: float = 0.0
    high: float = 5.0
    choice_pattern: str = DEFAULT_CHOICE_PATTERN
    max_new_tokens: int = 128
    stop_token_ids: Sequence[int] = ()
    temperature: float = 0.0
    num_samples: int = 1
    mesh: Mesh | None = None
    prompt_len_buckets: Sequence[int] | None = DEFAULT_PROMPT_LEN_BUCKETS

    def __post_init__(self) -> None:
        self.template = load_template(self.template, POINTWISE_FIELDS)
        self.pairwise_template = load_template(self.pairwise_template, PAIRWISE_FIELDS)
        if self.num_samples < 1:
            raise JudgeError(f"Judge.num_samples must be >= 1 (got {self.num_samples})")
        if self.temperature == 0.0 and self.num_samples > 1:
            raise JudgeError("Judge.num_samples > 1 needs temperature > 0 (greedy judgements are identical)")
        if not self.low < self.high:
            raise JudgeError(f"Judge: low ({self.low}) must be below high ({self.high})")

    @classmethod
    def from_config(cls, config: JudgeConfig, params: Params, model_config: ModelConfig, *,
                    encode: Callable[[str], list[int]], decode: Callable[[Sequence[int]], str],
                    stop_token_ids: Sequence[int] = (), mesh: Mesh | None = None,
                    prompt_len_buckets: Sequence[int] | None = DEFAULT_PROMPT_LEN_BUCKETS) -> Judge:
        """A judge with `config`'s templates (files are read here) and settings."""
        return cls(params, model_config, encode, decode,
                   template=config.template or DEFAULT_POINTWISE_TEMPLATE,
                   pairwise_template=config.pairwise_template or DEFAULT_PAIRWISE_TEMPLATE,
                   score_pattern=config.score_pattern, low=config.low, high=config.high,
                   choice_pattern=config.choice_pattern, max_new_tokens=config.max_new_tokens,
                   stop_token_ids=tuple(stop_token_ids), temperature=config.temperature,
                   num_samples=config.num_samples, mesh=mesh, prompt_len_buckets=prompt_len_buckets)

    def verdicts(self, prompts: Sequence[str], rng: jax.Array) -> list[str]:
        """num_samples verdicts for every judge prompt, row-major, from ONE sampler call."""
        if not prompts:
            return []
        out = generate(self.params, self.model_config, [self.encode(p) for p in prompts],
                       max_new_tokens=self.max_new_tokens, num_samples=self.num_samples,
                       temperature=self.temperature, stop_token_ids=tuple(self.stop_token_ids), rng=rng,
                       mesh=self.mesh, prompt_len_buckets=self.prompt_len_buckets)
        stops = set(int(s) for s in self.stop_token_ids)
        texts = []
        for row, n in zip(out.tokens, out.lengths, strict=True):
            ids = [int(t) for t in row[:int(n)]]
            if ids and ids[-1] in stops:
                ids = ids[:-1]
            texts.append(self.decode(ids))
        return texts

    def score(self, prompts: Sequence[str], responses: Sequence[str], rng: jax.Array, *,
              fields: Sequence[Mapping[str, str]] | None = None) -> JudgeScores:
        """Pointwise scores of (prompt, response) rows, all judged in one sampler call.

        `fields` gives each row's values for further placeholders of the template
        (e.g. `{principle}`).
        """
        if len(prompts) != len(responses):
            raise JudgeError(f"Judge.score: {len(prompts)} prompts but {len(responses)} responses")
        extra = _row_fields(fields, len(prompts))
        texts = self.verdicts([fill(self.template, prompt=p, response=r, **x)
                               for p, r, x in zip(prompts, responses, extra, strict=True)], rng)
        J = self.num_samples
        scores = np.full(len(prompts), np.nan)
        reasons: list[list[str]] = []
        for i in range(len(prompts)):
            parsed = [parse_score(t, pattern=self.score_pattern, low=self.low, high=self.high)
                      for t in texts[i * J:(i + 1) * J]]
            good = [p.value for p in parsed if p.value is not None]
            if good:
                scores[i] = float(np.mean(good))
            reasons.append([p.reason for p in parsed if p.value is None])
        return JudgeScores(scores, ~np.isnan(scores), texts, reasons)

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], rng: jax.Array, *,
                fields: Sequence[Mapping[str, str]] | None = None) -> JudgeComparisons:
        """Pairwise outcomes of (prompt, a, b): both orders of every pair in one sampler call.

        `fields` gives each pair's values for further placeholders (e.g. `{principle}`).
        """
        if not len(prompts) == len(a) == len(b):
            raise JudgeError(f"Judge.compare: {len(prompts)} prompts, {len(a)} a's and {len(b)} b's")
        extra = _row_fields(fields, len(prompts))
        judge_prompts = [fill(self.pairwise_template, prompt=p, response_a=x, response_b=y, **f)
                         for p, x, y, f in zip(prompts, a, b, extra, strict=True)]
        judge_prompts += [fill(self.pairwise_template, prompt=p, response_a=y, response_b=x, **f)
                          for p, x, y, f in zip(prompts, a, b, extra, strict=True)]
        texts = self.verdicts(judge_prompts, rng)
        J, P = self.num_samples, len(prompts)
        parsed = [parse_choice(t, pattern=self.choice_pattern) for t in texts]
        outcomes, consistent, reasons = [], [], []
        for i in range(P):
            first, swapped = parsed[i * J:(i + 1) * J], parsed[(P + i) * J:(P + i + 1) * J]
            outcome, ok = combine_orders([p.value for p in first], [p.value for p in swapped])
            outcomes.append(outcome)
            consistent.append(ok)
            reasons.append([p.reason for p in (*first, *swapped) if p.value is None])
        return JudgeComparisons(outcomes, np.asarray(consistent, bool), texts, reasons)


def _row_fields(fields: Sequence[Mapping[str, str]] | None, rows: int) -> list[Mapping[str, str]]:
    if fields is None:
        return [{}] * rows
    if len(fields) != rows:
        raise JudgeError(f"Judge: {len(fields)} rows of fields for {rows} rows to judge")
    return list(fields)


@dataclasses.dataclass
class JudgeReward:
    """A reward source from a `Judge`'s pointwise scores of each row, from one sampler call per group.

    Each row is judged on its example's `prompt` (or `prompt_of(example)`) and
    its decoded completion. Rows with no parsable judgement raise a
    `JudgeError` naming the first row and its reasons (`on_failure="raise"`),
    or get the rubric's lowest score (`on_failure="lowest"`), counted in the
    metric `judge/invalid_rows`; the reasons are in `details`.
    """

    judge: Judge
    rng: jax.Array = dataclasses.field(default_factory=lambda: jax.random.key(0))
    on_failure: Literal["raise", "lowest"] = "raise"
    prompt_of: Callable[[Any], str] = lambda example: example.prompt
    _calls: int = 0

    def __call__(self, completions: Completions) -> Rewards:
        if completions.texts is None:
            raise JudgeError("JudgeReward: the completions were not decoded (texts is None)")
        prompts = [self.prompt_of(ex) for ex in completions.row_examples()]
        out = self.judge.score(prompts, list(completions.texts), jax.random.fold_in(self.rng, self._calls))
        self._calls += 1
        if not out.valid.all():
            row = int(np.flatnonzero(~out.valid)[0])
            if self.on_failure == "raise":
                raise JudgeError(f"JudgeReward: row {row} has no parsable judgement: {out.reasons[row]} "
                                 f"({int((~out.valid).sum())} of {len(out.valid)} rows failed)")
        rewards = np.where(out.valid, out.scores, self.judge.low)
        details = [{"score": float(s), "reasons": r} for s, r in zip(out.scores, out.reasons, strict=True)]
        return Rewards(rewards, details=details, metrics=out.metrics)
