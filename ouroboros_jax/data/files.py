"""Prompt sets from JSONL files: a field mapping, answer parsers (GSM8K's `####`), clear errors.

Each line is one JSON object. `prompt_field` becomes the prompt; `answer_field`
becomes `gold["answer"]` (after the answer parser); every other field is
carried into `gold` unchanged, so a verifier can use it. The whole file is read
and checked when the source is built, so bad data fails before training starts,
with the file, the line number and the field in the message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ouroboros_jax.data.source import DataError, Example, PromptSource


def gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K worked solution: the number after the last `####`.

    Thousands separators are removed ("#### 1,600" -> "1600") so the gold is a
    plain number for the math verifier.
    """
    if not isinstance(solution, str) or "####" not in solution:
        raise ValueError("no '#### <answer>' line in the solution")
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise ValueError("nothing after '####'")
    return answer


def raw_answer(value: Any) -> Any:
    """The answer as stored, numbers turned into strings (verifiers compare text answers)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


ANSWER_PARSERS: dict[str, Callable[[Any], Any]] = {"raw": raw_answer, "gsm8k": gsm8k_answer}


def answer_parser(answer_format: str) -> Callable[[Any], Any]:
    """The parser for `answer_format` (one of ANSWER_PARSERS), with an error naming the choices."""
    if answer_format not in ANSWER_PARSERS:
        raise DataError(f"answer_format: must be one of {sorted(ANSWER_PARSERS)} (got {answer_format!r})")
    return ANSWER_PARSERS[answer_format]


def record_to_example(
    record: Mapping[str, Any], *, example_id: str, where: str, prompt_field: str, answer_field: str,
    parse_answer: Callable[[Any], Any] = raw_answer,
) -> Example:
    """Map one record onto an `Example`; errors name `where` (e.g. "file.jsonl:12").

    `answer_field=""` reads prompt-only data (no "answer" in gold), as self-play
    proposers and preference data need. The mapped answer field replaces any
    field literally named "answer"; parsed answers keep the raw text in
    `gold["solution"]`.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    required = [prompt_field] + ([answer_field] if answer_field else [])
    for name in required:
        if name not in record:
            raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
    prompt = record[prompt_field]
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field {prompt_field!r} must be a non-empty string (got {prompt!r:.80})")
    gold = {k: v for k, v in record.items() if k not in (prompt_field, answer_field)}
    if answer_field:
        try:
            gold["answer"] = parse_answer(record[answer_field])
        except (ValueError, TypeError, AttributeError) as e:
            raise DataError(f"{where}: field {answer_field!r} cannot be parsed ({e})") from None
        if parse_answer is not raw_answer:
            gold.setdefault("solution", record[answer_field])
    return Example(id=example_id, prompt=prompt, gold=gold)


def read_jsonl(
    path: str | os.PathLike[str], *, prompt_field: str = "question", answer_field: str = "answer",
    answer_format: str = "raw",
) -> list[Example]:
    """Every example of a JSONL file; ids are "<file stem>:<line number>".

    Blank lines are skipped. Raises `DataError` naming the file and line for
    invalid JSON or a missing field, and for a file with no examples.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    parse = answer_parser(answer_format)
    examples = []
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            examples.append(record_to_example(
                record, example_id=f"{file.stem}:{lineno}", where=where, prompt_field=prompt_field,
                answer_field=answer_field, parse_answer=parse))
    if not examples:
        raise DataError(f"{file}: the prompt set is empty (no JSON lines)")
    return examples


def jsonl_source(
    path: str | os.PathLike[str], *, prompt_field: str = "question", answer_field: str = "answer",
    answer_format: str = "raw", seed: int = 0, shuffle: bool = True,
) -> PromptSource:
    """A `PromptSource` over a JSONL file with a field mapping (see `read_jsonl`)."""
    examples = read_jsonl(path, prompt_field=prompt_field, answer_field=answer_field,
                          answer_format=answer_format)
    return PromptSource(examples, seed=seed, shuffle=shuffle, name=str(path))


def gsm8k_source(path: str | os.PathLike[str], *, seed: int = 0, shuffle: bool = True) -> PromptSource:
    """GSM8K in its release format (`question`, `answer` ending in `#### <number>`).

    `gold["answer"]` is the final number; the worked solution is kept in
    `gold["solution"]` (a supervised warm-start can train on it).
    """
    return jsonl_source(path, prompt_field="question", answer_field="answer", answer_format="gsm8k",
                        seed=seed, shuffle=shuffle)
