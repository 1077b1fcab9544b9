"""Which answer a completion (or a worked gold solution) commits to; plain strings, no sympy.

Order: a "final answer" statement made after the last boxed answer; the last
group of ``\\boxed{}`` answers ("\\boxed{1} and \\boxed{2}" is the list 1, 2);
the last GSM8K ``####`` line; the last anchored "the answer is" / "answer:".
With ``mode="any"`` unmarked text falls back to whichever comes last, a math
segment or a number. Text after a chat-template turn marker (a model writing
the next ``<|im_start|>user`` turn itself) is ignored.

Every step is linear in the length of the text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from verifiers.math.latex import is_glue, last_boxed, last_boxed_group, math_segments

Mode = Literal["anchored", "any"]

_TURN_MARKER = re.compile(
    r"<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|<\|end\|>|<\|im_start\|>\s*(?:user|system)"
)
_HOPE = re.compile(r"\s*I hope it is correct\.?", re.IGNORECASE)
_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
_FINAL = re.compile(r"final\s+answer\s*(?:is\s*:?|:|=)\s*(?:is\s*:?\s*)?", re.IGNORECASE)
_ANCHOR = re.compile(
    r"(?:final\s+answer|the\s+answer|\banswer)\s*(?:is\s*:?|:|=)\s*(?:is\s*)?", re.IGNORECASE
)
# A number not glued to a word ("AZYUK2A" holds none).
_NUMBER = re.compile(r"(?<![A-Za-z_\d.])-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?")
_COPULA = re.compile(r"\s(?:is|are|was|equals|=)\s")
_KEEP_WORDS = {"or", "and", "pi", "sqrt", "sin", "cos", "tan", "log", "ln", "exp", "infty"}


def strip_debris(text: str) -> str:
    """The completion up to a chat-template end-of-turn or new-turn marker."""
    match = _TURN_MARKER.search(text)
    return text[: match.start()] if match else text


def _plain_word(chunk: str) -> bool:
    letters = re.sub(r"[^A-Za-z]", "", chunk)
    return len(letters) >= 2 and "\\" not in chunk and letters.lower() not in _KEEP_WORDS


def _trim_tail(tail: str) -> str:
    """The answer at the start of the text after an anchor: math only, no trailing prose."""
    line = _HOPE.split(tail.strip(), maxsplit=1)[0].split("\n", 1)[0].strip()
    group = last_boxed_group(line)
    if group is not None:
        return group[0]
    segments = math_segments(line)
    if segments and segments[0].start < 3 and segments[0].content:
        # "$12$ and $13$" states both.
        joined = [segments[0]]
        for segment in segments[1:]:
            if not segment.content or not is_glue(line[joined[-1].end : segment.start]):
                break
            joined.append(segment)
        return ", ".join(s.content for s in joined)
    line = re.split(r"\.\s", line, maxsplit=1)[0]
    kept = _leading_math(line)
    if kept:
        return kept
    return _in_sentence(line).rstrip(" .,;:")


def _leading_math(text: str) -> str:
    """The math-like words that start ``text``, up to the first plain word."""
    kept = []
    for word in text.split():
        if _plain_word(word) and re.fullmatch(r"[A-Za-z]+[.,;:!]?", word):
            break
        kept.append(word)
    return " ".join(kept).rstrip(" .,;:")


def _in_sentence(line: str) -> str:
    """The answer inside a sentence: "The largest $n$ is 34" -> "34"; a textual answer stays whole.

    What follows the last "is" / "=" when it starts with math, else the one number
    or math segment in the sentence. A sentence with several ("either 3 or 5") is
    left whole, and so fails: a hedge must not earn the credit of its last option.
    """
    if not re.search(r"\d", line):
        return line  # "Monday."
    copulas = list(_COPULA.finditer(line))
    if copulas:
        after = _leading_math(line[copulas[-1].end() :].strip())
        if re.search(r"[\d\\]", after):
            return after
    segments = [seg for seg in math_segments(line) if seg.content]
    outside = line
    for seg in reversed(segments):
        outside = outside[: seg.start] + " " + outside[seg.end :]
    found = [seg.content for seg in segments] + [m.group().strip() for m in _NUMBER.finditer(outside)]
    return found[0] if len(found) == 1 else line


def _last_of(text: str) -> str | None:
    """Whichever ends last in ``text``: a math segment or a number."""
    segments = [s for s in math_segments(text) if s.content]
    numbers = list(_NUMBER.finditer(text))
    last_segment = segments[-1] if segments else None
    last_number = numbers[-1] if numbers else None
    if last_number and (last_segment is None or last_number.start() >= last_segment.end):
        return last_number.group().strip()
    return last_segment.content if last_segment else None


def extract_answer(text: str, mode: Mode = "anchored") -> str | None:
    """The answer a completion commits to, or None when it marks none.

    Args:
        text: the model's completion.
        mode: ``"anchored"`` grades only marked answers (boxed, ``####``,
            "final answer is", "answer:"); ``"any"`` falls back to the last LaTeX
            expression or number, for data whose answers are unmarked.
    """
    if mode not in ("anchored", "any"):
        raise ValueError(f"mode must be 'anchored' or 'any', got {mode!r}")
    text = strip_debris(text)
    group = last_boxed_group(text)
    finals = list(_FINAL.finditer(text))
    if finals and (group is None or finals[-1].start() > group[2]):
        # "... \boxed{255} ... Final Answer: The final answer is $10,455$": the last statement wins.
        answer = _trim_tail(text[finals[-1].end() :])
        if answer:
            return answer
    if group is not None:
        return group[0]
    gsm = list(_GSM8K.finditer(text))
    if gsm and gsm[-1].group(1).strip():
        return _trim_tail(gsm[-1].group(1))
    anchors = list(_ANCHOR.finditer(text))
    if anchors:
        answer = _trim_tail(text[anchors[-1].end() :])
        if answer:
            return answer
    if mode == "any":
        return _last_expression(text)
    return None


def _last_expression(text: str) -> str | None:
    """The last LaTeX expression or number, for ``mode="any"``."""
    text = _HOPE.sub("", text).rstrip()
    segments = [s for s in math_segments(text) if s.content]
    if segments and segments[-1].end >= len(text) - 2:
        return segments[-1].content
    lines = [line for line in text.splitlines() if line.strip()]
    if lines:
        # "it is 2\pi": the run of math-like words ending the last line.
        chunks = lines[-1].rstrip(" .,;:").split()
        start = len(chunks)
        while start and not _plain_word(chunks[start - 1]) and chunks[start - 1] not in ("$", ":"):
            start -= 1
        tail = " ".join(chunks[start:])
        if tail and re.search(r"[\d\\]", tail):
            return tail
    return _last_of(text)


def gold_answer(example: Mapping[str, Any] | str, key: str = "answer") -> str:
    """The bare gold answer of an example: a bare answer, a boxed one, after ``####``, or after
    "The final answer is" in a worked solution."""
    if isinstance(example, Mapping):
        for name in (key, "solution", "gold", "target"):
            if example.get(name) is not None:
                example = example[name]
                break
        else:
            raise KeyError(f"example has no {key!r} (or 'solution') field")
    raw = str(example)
    group = last_boxed_group(raw)
    if group is not None:
        return group[0]
    gsm = list(_GSM8K.finditer(raw))
    if gsm:
        return gsm[-1].group(1).strip()
    finals = list(_FINAL.finditer(raw))
    if finals:
        answer = _trim_tail(raw[finals[-1].end() :])
        if answer:
            return answer
    return raw.strip()


__all__ = ["Mode", "extract_answer", "gold_answer", "last_boxed", "strip_debris"]
