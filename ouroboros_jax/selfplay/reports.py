"""What each generation reports, and the guard that watches for collapse.

Diversity measures (host-side, plain Python):

- `distinct_n`: distinct n-grams over all n-grams of a set of sequences
  (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
  Conversation Models"). The generation report applies it to the completions of
  one prompt and averages over prompts (`grouped_distinct_n`): pooled over the
  whole set, it would mostly count how different the prompts are.
- `answer_diversity`: distinct final answers per prompt (what a verifier
  extracted), averaged over prompts.

The collapse guard compares each report with generation 0's: it trips when
distinct-2 or answer diversity falls below a fraction of generation 0's value,
or when the mean per-token log-likelihood of the anchor set's gold answers has
fallen by more than a bound (nats per token). It then warns or stops the loop,
and the report records its state. Reports go to a JSONL file (one object per
generation) and a console line; `plot_arms` draws several runs side by side.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ouroboros_jax.config import ConfigError

REPORT_FILE = "reports.jsonl"
GUARD_ACTIONS = ("warn", "stop")


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Distinct n-grams divided by all n-grams, pooled over `sequences`.

    Args:
      sequences: token-id lists, strings (characters are the units) or word lists.
      n: the n-gram order (1 or more).

    Returns:
      A value in (0, 1]; 0.0 when no sequence has n units.
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1 (got {n})")
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _groups(items: Sequence[Any], group_size: int) -> list[Sequence[Any]]:
    if group_size < 1 or len(items) % group_size:
        raise ValueError(f"{len(items)} items do not split into groups of {group_size}")
    return [items[i:i + group_size] for i in range(0, len(items), group_size)]


def grouped_distinct_n(sequences: Sequence[Sequence[Hashable]], group_size: int, n: int) -> float:
    """`distinct_n` within each prompt's group of `group_size` consecutive sequences, averaged.

    Groups without any n-gram are left out of the mean (0.0 if all are).
    """
    values = [distinct_n(g, n) for g in _groups(sequences, group_size)
              if any(len(s) >= n for s in g)]
    return float(sum(values) / len(values)) if values else 0.0


def answer_diversity(answers: Sequence[Hashable | None], group_size: int) -> float:
    """Mean number of distinct final answers per prompt; None (no answer found) is not an answer."""
    groups = _groups(answers, group_size)
    return float(sum(len({a for a in g if a is not None}) for g in groups) / len(groups))


def final_answer(verdict: Any) -> str | None:
    """The answer a verifier extracted from a completion, as text (None when it found none)."""
    extracted = getattr(verdict, "extracted", None)
    return None if extracted is None else str(extracted)


@dataclasses.dataclass(frozen=True)
class GuardState:
    """The collapse guard's verdict on one report: "ok", "warn" or "stop", and why."""

    status: str
    reasons: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CollapseGuard:
    """Bounds, relative to generation 0, past which the loop warns or stops.

    Attributes:
      min_distinct_ratio: trip when distinct-2 falls below this fraction of
        generation 0's (None: not watched).
      min_answer_diversity_ratio: the same for distinct answers per prompt.
      max_anchor_drop: trip when the anchor set's mean per-token log-likelihood
        is this many nats below generation 0's (None: not watched).
      action: "warn" (log and go on) or "stop" (end the loop after the report).
    """

    min_distinct_ratio: float | None = 0.5
    min_answer_diversity_ratio: float | None = 0.5
    max_anchor_drop: float | None = 0.5
    action: str = "warn"

    def __post_init__(self) -> None:
        if self.action not in GUARD_ACTIONS:
            raise ConfigError(f"guard.action: must be one of {list(GUARD_ACTIONS)} (got {self.action!r})")
        for name in ("min_distinct_ratio", "min_answer_diversity_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(f"guard.{name}: must be in [0, 1] or None (got {value!r})")
        if self.max_anchor_drop is not None and self.max_anchor_drop < 0:
            raise ConfigError(f"guard.max_anchor_drop: must be >= 0 or None (got {self.max_anchor_drop!r})")

    def check(self, report: Mapping[str, Any], baseline: Mapping[str, Any]) -> GuardState:
        """Compare `report` with generation 0's `baseline` (distinct-2, answer_diversity, anchor_logp)."""
        reasons = []
        for key, bound in (("distinct-2", self.min_distinct_ratio),
                           ("answer_diversity", self.min_answer_diversity_ratio)):
            base, now = baseline[key], report[key]
            if bound is not None and base > 0 and now < bound * base:
                reasons.append(f"{key} {now:.3f} < {bound:g} x generation 0's {base:.3f}")
        if self.max_anchor_drop is not None:
            drop = baseline["anchor_logp"] - report["anchor_logp"]
            if drop > self.max_anchor_drop:
                reasons.append(f"anchor log-likelihood fell {drop:.3f} nats/token "
                               f"(bound {self.max_anchor_drop:g})")
        if not reasons:
            return GuardState("ok")
        return GuardState(self.action, tuple(reasons))


# ---------------------------------------------------------------------------
# Report files, console line, plots

CONSOLE_KEYS = (("pass@1", "pass@1", ".3f"), ("distinct-2", "distinct-2", ".3f"),
                ("answers", "answer_diversity", ".2f"), ("ent", "entropy", ".3f"), ("len", "length", ".1f"),
                ("anchor", "anchor_logp", ".3f"), ("drift", "anchor_drift", "+.3f"),
                ("kept ok", "pool/kept_correct_frac", ".2f"))


def format_report(report: Mapping[str, Any], generations: int | None = None) -> str:
    """One console line: generation, pass@1, pass@k, diversity, entropy, length, anchor, guard."""
    g = report["generation"]
    parts = [f"generation {g}/{generations}" if generations is not None else f"generation {g}"]
    pass_k = sorted(k for k in report if k.startswith("pass@") and k != "pass@1")
    for label, key, fmt in CONSOLE_KEYS[:1] + tuple((k, k, ".3f") for k in pass_k) + CONSOLE_KEYS[1:]:
        value = report.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            parts.append(f"{label} {value:{fmt}}")
    status = report.get("guard/status", "ok")
    parts.append(f"guard {status}" + (f" ({'; '.join(report['guard/reasons'])})" if status != "ok" else ""))
    return "  ".join(parts)


class ReportWriter:
    """Appends one JSON object per generation to `REPORT_FILE` in a run directory (flushed per line)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / REPORT_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w")  # one run per directory: a rerun starts the file afresh

    def write(self, report: Mapping[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in report.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_reports(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The reports of a run directory (or of a reports.jsonl file), in generation order."""
    source = Path(path)
    source = source / REPORT_FILE if source.is_dir() else source
    with open(source) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_arms(arms: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str],
              path: str | os.PathLike[str]) -> Path:
    """One panel per key, one curve per arm against the generation; written as a PNG.

    Args:
      arms: arm name -> its reports (each with "generation" and the keys).
      keys: report keys to draw, e.g. ("pass@1", "distinct-2").
      path: the PNG file.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8 * len(keys), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.15, wspace=0.25)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for arm, reports in arms.items():
            points = [(r["generation"], r[key]) for r in reports if r.get(key) is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=arm)
        ax.set_title(key)
        ax.set_xlabel("generation")
        ax.grid(alpha=0.3)
        ax.legend()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
