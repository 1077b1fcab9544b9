"""Linear-time scanning of LaTeX in model output: braces, boxed answers, math segments.

Everything here is one pass over the text (or a constant number of passes),
because completions are hostile input: 8,000 unclosed ``\\boxed{`` or 100 KB of
``$`` signs must cost milliseconds, not a search from every position. No sympy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
# Math delimiters in the order they are tried at one position: "$$" before "$".
_OPENERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_INLINE = {"$", "\\("}  # inline math does not span a blank line
_OPENER = re.compile(r"\$|\\[\[(]")
_BRACE_EVENT = re.compile(r"\\.|[{}]", re.DOTALL)


def brace_pairs(text: str) -> dict[int, int]:
    """Index of each ``{`` that is closed -> index of its ``}``; ``\\{`` and ``\\}`` are escapes."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for match in _BRACE_EVENT.finditer(text):
        char = match.group()
        if char == "{":
            stack.append(match.start())
        elif char == "}" and stack:
            pairs[stack.pop()] = match.start()
    return pairs


def matching_brace(text: str, open_index: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_index``, honouring ``\\{`` escapes."""
    depth = 0
    i, n = open_index, len(text)
    while i < n:
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


@dataclass(frozen=True)
class Boxed:
    """One ``\\boxed{...}`` (or ``\\fbox``, or ``\\boxed 5``): where it is and what it holds."""

    start: int
    end: int
    content: str


def boxed_answers(text: str) -> list[Boxed]:
    """Every closed ``\\boxed{}``/``\\fbox{}`` (and ``\\boxed 5``) in order, in linear time."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return []
    pairs = brace_pairs(text)
    found = []
    for match in matches:
        pos = match.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == "{":
            close = pairs.get(pos)
            if close is not None:
                found.append(Boxed(match.start(), close + 1, text[pos + 1 : close].strip()))
        elif pos > match.end() and pos < len(text):
            token = re.match(r"[^\s$]+", text[pos : pos + 200])
            if token:
                found.append(Boxed(match.start(), pos + token.end(), token.group()))
    return found


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (``\\boxed 5`` too)."""
    found = boxed_answers(text)
    return found[-1].content if found else None


# What may stand between boxed answers that belong together:
# "\boxed{1}, \boxed{2}", "$\boxed{1}$ and $\boxed{2}$", "\boxed{1} \quad \text{and} \quad \boxed{2}".
_GLUE_NOISE = re.compile(
    r"\\(?:text|mbox|textbf|mathrm)\s*\{[^{}]{0,40}\}|\$|\\[()\[\]]|\\\\|\\(?:quad|qquad|[,;:! ])|[\s,;&~]"
)
_GLUE_WORDS = re.compile(r"(?:(?:[A-Za-z]+\s+){0,2}(?:and|or))?(?:\s*[A-Za-z](?:_\{?\w+\}?)?\s*=)?")
MAX_GROUP = 10


def is_glue(gap: str) -> bool:
    """Whether ``gap`` only joins two answers: delimiters, spacing, commas, "and", a short ``\\text{}``."""
    if len(gap) > 120:
        return False
    rest = _GLUE_NOISE.sub(" ", gap).strip()
    return not rest or _GLUE_WORDS.fullmatch(rest) is not None


def last_boxed_group(text: str) -> tuple[str, int, int] | None:
    """The last boxed answer with the boxed answers joined to it: ``("1, 2", start, end)``.

    "\\boxed{1} and \\boxed{2}" states the answer {1, 2}. Boxed answers belong to
    one group when only delimiters, spacing, commas, a short ``\\text{}`` or a
    few words ending in "and"/"or" stand between them (never a full stop).
    """
    found = boxed_answers(text)
    if not found:
        return None
    group = [found[-1]]
    for previous in reversed(found[:-1]):
        if len(group) >= MAX_GROUP:
            break
        gap = text[previous.end : group[0].start]
        if not is_glue(gap):
            break
        group.insert(0, previous)
    contents = [b.content for b in group if b.content]
    if not contents:
        return None
    return ", ".join(contents), group[0].start, group[-1].end


@dataclass(frozen=True)
class Segment:
    """A math segment ``$...$``, ``$$...$$``, ``\\(...\\)`` or ``\\[...\\]``."""

    start: int
    end: int
    content: str


def _find_closer(text: str, closer: str, start: int) -> int:
    close = text.find(closer, start)
    while closer[0] == "$" and close > 0 and text[close - 1] == "\\":
        close = text.find(closer, close + 1)
    return close


def math_segments(text: str) -> list[Segment]:
    """Every closed math segment, left to right, in linear time.

    A delimiter whose closer appears nowhere after it can never close later
    either, so each kind is searched for at most once past its last closer.
    """
    segments = []
    dead: set[str] = set()
    i, n = 0, len(text)
    while i < n:
        match = _OPENER.search(text, i)
        if match is None:
            break
        j = match.start()
        if text.startswith("$", j) and j and text[j - 1] == "\\":
            i = j + 1  # "\$" is a dollar sign, not a delimiter
            continue
        for opener, closer in _OPENERS:
            if opener in dead or not text.startswith(opener, j):
                continue
            close = _find_closer(text, closer, j + len(opener))
            if close < 0:
                dead.add(opener)
                continue
            content = text[j + len(opener) : close]
            if opener in _INLINE and "\n\n" in content:
                continue
            segments.append(Segment(j, close + len(closer), content.strip()))
            i = close + len(closer)
            break
        else:
            i = j + 1
    return segments
