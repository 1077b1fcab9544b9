"""Format verifier: does a completion follow the response format the prompt asked for?

Usually combined with a correctness verifier as a small shaping term, e.g.
``combine({"math": 1.0, "format": 0.1})``.

The default rules fit reasoning models: an optional ``<think>...</think>``
block (or a lone ``</think>`` when the chat template opened the block in the
prompt), followed by a final answer marked with ``\\boxed{}``,
``<answer>...</answer>`` or ``####``. An example may instead give its own
regular expression under ``format_pattern``; :class:`RegexFormat` makes a
reusable verifier from one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from verifiers.base import Verdict
from verifiers.math.latex import matching_brace

__all__ = ["RegexFormat", "format_problems", "verify"]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _think_problems(text: str, require_think: bool) -> tuple[list[str], str]:
    """Problems with the reasoning block, and the text after it."""
    opens, closes = text.count("<think>"), text.count("</think>")
    if opens == 0 and closes == 0:
        return (["no <think>...</think> block"] if require_think else []), text
    problems = []
    if opens > 1 or closes > 1:
        problems.append("more than one <think> block")
    if closes == 0:
        return problems + ["<think> block is never closed"], ""
    if opens == 1 and not text.lstrip().startswith("<think>"):
        problems.append("text before <think>")
    if opens == 1 and text.index("<think>") > text.index("</think>"):
        problems.append("</think> before <think>")
    return problems, text.rsplit("</think>", 1)[1]


def _answer_problems(after: str) -> list[str]:
    boxes = [m.end() for m in re.finditer(r"\\boxed\s*(?=\{)", after)]
    for start in boxes:
        if matching_brace(after, start) is None:
            return ["unbalanced braces in \\boxed{}"]
    tags = _ANSWER_TAG.findall(after)
    if after.count("<answer>") != after.count("</answer>"):
        return ["unclosed <answer> tag"]
    if not boxes and not tags and "####" not in after:
        return ["no final answer marked with \\boxed{}, <answer></answer> or ####"]
    if any(not t.strip() for t in tags):
        return ["empty <answer></answer>"]
    return []


def format_problems(completion: str, *, require_think: bool = False) -> list[str]:
    """Everything wrong with the completion's format under the default rules (empty: fine)."""
    problems, after = _think_problems(completion, require_think)
    if after.strip():
        problems += _answer_problems(after)
    elif not problems or problems == ["text before <think>"]:
        problems.append("nothing after the reasoning")
    return problems


def verify(completion: str, example: Mapping[str, Any]) -> Verdict:
    """Score 1.0 when the completion is well formed, else 0.0 with what is wrong.

    ``example`` may carry ``format_pattern`` (a regular expression the whole
    stripped completion must match) or ``require_think`` (bool).
    """
    pattern = example.get("format_pattern")
    if pattern:
        return RegexFormat(pattern)(completion, example)
    problems = format_problems(completion, require_think=bool(example.get("require_think")))
    if problems:
        return Verdict.fail("; ".join(problems))
    return Verdict(1.0, True)


@dataclass(frozen=True)
class RegexFormat:
    """A format verifier from a regular expression the whole completion must match.

    Example:
        >>> r1 = RegexFormat(r"<think>.*?</think>\\s*<answer>.*?</answer>")
        >>> r1("<think>2+2</think> <answer>4</answer>", {}).score
        1.0
    """

    pattern: str

    def __call__(self, completion: str, example: Mapping[str, Any]) -> Verdict:
        if re.fullmatch(self.pattern, completion.strip(), re.DOTALL):
            return Verdict(1.0, True)
        return Verdict.fail(f"completion does not match the format {self.pattern!r}")
