"""Code tasks for proposer/solver self-play: programs, the sandboxed executor, checks, the task buffer.

A task is a Python function ``f`` with inputs and the outputs the sandbox
computed for them. Three task types read the same triple differently:

* deduction: given ``f`` and an input, predict the output;
* abduction: given ``f`` and an output, find an input that produces it
  (checked by running ``f`` on the predicted input);
* induction: given input/output examples, write ``f`` (checked by running the
  predicted program on held-back inputs the solver never saw).

Values are Python literals (numbers, strings, bytes, booleans, None, and lists,
tuples, sets and dicts of them), stored as their canonical ``repr``. A proposed
program becomes a task only if it parses, defines ``f``, imports nothing from
``FORBIDDEN_MODULES``, and two separate sandboxed runs return the same literal
outputs within the limits (see `validate_proposal`). Nothing here imports JAX.

After Zhao et al. 2025, "Absolute Zero: Reinforced Self-play Reasoning with
Zero Data" (arXiv:2505.03335).
"""

from __future__ import annotations

import ast
import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from verifiers import parse_python

TASK_TYPES: tuple[str, ...] = ("deduction", "abduction", "induction")
# Imports that make a program nondeterministic or reach outside it; the double run catches the rest.
FORBIDDEN_MODULES: tuple[str, ...] = (
    "asyncio", "datetime", "io", "multiprocessing", "os", "pathlib", "random", "secrets", "shutil",
    "signal", "socket", "subprocess", "sys", "threading", "time", "uuid",
)


class TaskError(ValueError):
    """A program, input or task file that cannot make a task; the message says which and why."""


@dataclass(frozen=True)
class CodeTask:
    """One verified task.

    Attributes:
      kind: one of `TASK_TYPES`.
      program: Python source defining ``f``.
      inputs: canonical argument lists, e.g. ``"3, 'ab'"`` for ``f(3, 'ab')``.
      outputs: canonical ``repr`` of ``f(*args)`` for each input, as the sandbox returned it.
      n_visible: pairs shown to an induction solver; the rest are held back for the check.
      origin: ``"seed"`` or ``"proposed"``.
    """

    kind: str
    program: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    n_visible: int = 1
    origin: str = "proposed"

    @functools.cached_property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        """Identity for deduplication: type, program up to formatting and comments, inputs."""
        return self.kind, ast.dump(parse_python(self.program)), self.inputs

    @property
    def held_back(self) -> tuple[tuple[str, str], ...]:
        """(input, output) pairs an induction solver never sees."""
        return tuple(zip(self.inputs, self.outputs, strict=True))[self.n_visible:]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "program": self.program, "inputs": list(self.inputs),
                "outputs": list(self.outputs), "n_visible": self.n_visible, "origin": self.origin}


# ---------------------------------------------------------------------------
# Literal values


def _literal(text: str, what: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise TaskError(f"{what} is not a Python literal: {text[:80]!r} ({type(e).__name__})") from None


def canonical_value(text: str) -> str:
    """The canonical repr of a literal value (``(1,2)`` -> ``(1, 2)``); raises TaskError otherwise."""
    return repr(_literal(text.strip(), "value"))


def parse_args(text: str, max_chars: int = 1000) -> str:
    """Canonical argument list of ``f(<text>)``: ``"3,'a'"`` -> ``"3, 'a'"``; raises TaskError."""
    text = text.strip()
    if not text:
        raise TaskError("empty input: f needs at least one argument")
    if len(text) > max_chars:
        raise TaskError(f"input longer than {max_chars} characters")
    args = _literal(f"({text},)", "input")
    canonical = ", ".join(repr(a) for a in args)
    if len(canonical) > max_chars:
        raise TaskError(f"input longer than {max_chars} characters")
    return canonical


def same_value(a: Any, b: Any) -> bool:
    """Equality of literal values that also requires equal types (``1 != 1.0 != True``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, set):
        return sorted(map(repr, a)) == sorted(map(repr, b))
    return a == b


def same_output(predicted: str, expected: str) -> bool:
    """Whether two literal texts hold the same value (False when either does not parse)."""
    try:
        return same_value(_literal(predicted.strip(), "output"), _literal(expected, "output"))
    except TaskError:
        return False


# ---------------------------------------------------------------------------
# Prompts and answers

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
PROPOSER_HEADER = "Propose a new Python {kind} task."
SOLVER_HEADERS = {
    "deduction": "Deduction: predict the output of the call.",
    "abduction": "Abduction: find an input that gives this output.",
    "induction": "Induction: write the function f from its examples.",
}


def fenced(text: str, tag: str) -> str | None:
    """The last fenced block tagged ``tag`` (``python`` also matches ``py``), or None."""
    tags = ("python", "py", "python3") if tag == "python" else (tag,)
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in tags]
    return blocks[-1] if blocks else None


def _show(program: str, inputs: Sequence[str]) -> str:
    lines = "\n".join(inputs)
    return f"```python\n{program.strip()}\n```\n```input\n{lines}\n```"


def proposer_prompt(kind: str, references: Sequence[CodeTask], n_inputs: int) -> str:
    """Ask for a function ``f`` and ``n_inputs`` inputs (one per line), showing reference tasks."""
    what = "one input for it" if n_inputs == 1 else f"{n_inputs} different inputs for it, one per line,"
    parts = [PROPOSER_HEADER.format(kind=kind),
             f"Write a deterministic function f in a ```python block, then {what} in an "
             "```input block (the arguments of the call, as Python literals)."]
    if references:
        parts.append("Existing tasks:")
        parts += [_show(t.program, t.inputs[:n_inputs]) for t in references]
        parts.append("Write a different one.")
    return "\n".join(parts) + "\n"


def solver_prompt(task: CodeTask) -> str:
    """The solver's view of ``task``: program and input, program and output, or examples."""
    head = SOLVER_HEADERS[task.kind]
    if task.kind == "deduction":
        return (f"{head}\n```python\n{task.program.strip()}\n```\nf({task.inputs[0]})\n"
                "Answer with the returned value in an ```output block.\n")
    if task.kind == "abduction":
        return (f"{head}\n```python\n{task.program.strip()}\n```\nf(?) == {task.outputs[0]}\n"
                "Answer with the arguments in an ```input block.\n")
    shown = zip(task.inputs[:task.n_visible], task.outputs[:task.n_visible], strict=True)
    examples = "\n".join(f"f({i}) == {o}" for i, o in shown)
    return f"{head}\n{examples}\nAnswer with the function in a ```python block.\n"


def answer_text(completion: str, tag: str) -> str:
    """The last ``tag`` block of a completion, else the whole completion (stripped)."""
    block = fenced(completion, tag)
    return (completion if block is None else block).strip()


# ---------------------------------------------------------------------------
# Programs


def check_program(program: str, *, max_chars: int, forbidden: Sequence[str] = FORBIDDEN_MODULES) -> None:
    """Static checks before anything runs; raises TaskError naming the problem."""
    if not program.strip():
        raise TaskError("no program")
    if len(program) > max_chars:
        raise TaskError(f"program longer than {max_chars} characters")
    try:
        tree = parse_python(program)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise TaskError(f"program does not parse: {e}") from None
    if not any(isinstance(n, ast.FunctionDef) and n.name == "f" for n in tree.body):
        raise TaskError("program defines no top-level function f")
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            if name.split(".")[0] in forbidden:
                raise TaskError(f"program imports {name}, which is not allowed")


def parse_proposal(completion: str, n_inputs: int, *, max_chars: int, max_value_chars: int,
                   forbidden: Sequence[str] = FORBIDDEN_MODULES) -> tuple[str, tuple[str, ...]]:
    """(program, canonical inputs) from a proposer completion; raises TaskError.

    One input: the whole ```input block is the argument list. Several: one per
    line; the first ``n_inputs`` distinct ones are kept.
    """
    program = fenced(completion, "python")
    if program is None:
        raise TaskError("no ```python block")
    block = fenced(completion, "input")
    if block is None:
        raise TaskError("no ```input block")
    check_program(program, max_chars=max_chars, forbidden=forbidden)
    lines = [block] if n_inputs == 1 else [line for line in block.splitlines() if line.strip()]
    inputs = tuple(dict.fromkeys(parse_args(line, max_value_chars) for line in lines))
    if len(inputs) < n_inputs:
        raise TaskError(f"{len(inputs)} distinct inputs, {n_inputs} needed")
    return program.strip() + "\n", inputs[:n_inputs]


# ---------------------------------------------------------------------------
# Seeds

SEED_PROGRAMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("def f(x):\n    return 3 * x + 1\n", ("2", "5", "-1", "0", "10")),
    ("def f(s):\n    return s[::-1]\n", ("'abc'", "'level'", "'ab'", "''", "'xyz1'")),
    ("def f(xs):\n    return max(xs) - min(xs)\n", ("[3, 1, 4]", "[5]", "[2, 9, -1]", "[0, 0]", "[7, 3]")),
    ("def f(n):\n    total = 0\n    for i in range(n):\n        total += i * i\n    return total\n",
     ("3", "1", "5", "0", "4")),
    ("def f(a, b):\n    return a // b, a % b\n", ("17, 5", "9, 3", "4, 7", "20, 6", "1, 1")),
    ("def f(s):\n    return sorted(set(s))\n", ("'banana'", "'abc'", "'zzz'", "'hello'", "'aab'")),
)


def load_seed_programs(path: str | Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Seed programs from JSONL, one ``{"program": str, "inputs": [str, ...]}`` per line."""
    seeds = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            program, inputs = row["program"], row["inputs"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise TaskError(f"{path}:{number}: need {{'program': str, 'inputs': [str, ...]}} ({e})") from None
        if not isinstance(program, str) or not isinstance(inputs, list) or not inputs \
                or not all(isinstance(i, str) for i in inputs):
            raise TaskError(f"{path}:{number}: 'program' must be a string and 'inputs' a non-empty "
                            "list of strings")
        seeds.append((program, tuple(inputs)))
    if not seeds:
        raise TaskError(f"{path}: no seed programs")
    return tuple(seeds)


# ---------------------------------------------------------------------------
# The task buffer


@dataclass
class TaskBuffer:
    """The pool of verified tasks, per task type, without duplicates.

    When a type holds more than ``capacity`` tasks the oldest proposed one goes
    (seeds stay, so the pool never runs dry).
    """

    capacity: int
    _tasks: dict[str, list[CodeTask]] = field(default_factory=dict, init=False, repr=False)
    _keys: set = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"TaskBuffer capacity must be positive (got {self.capacity})")

    def add(self, task: CodeTask) -> bool:
        """Add ``task`` unless an equal one is present; True when it went in."""
        if task.kind not in TASK_TYPES:
            raise TaskError(f"unknown task type {task.kind!r}; expected one of {TASK_TYPES}")
        key = task.key
        if key in self._keys:
            return False
        pool = self._tasks.setdefault(task.kind, [])
        pool.append(task)
        self._keys.add(key)
        if len(pool) > self.capacity:
            oldest = next((t for t in pool if t.origin != "seed"), pool[0])
            pool.remove(oldest)
            self._keys.discard(oldest.key)
        return True

    def __contains__(self, task: CodeTask) -> bool:
        return task.key in self._keys

    def tasks(self, kind: str) -> list[CodeTask]:
        return list(self._tasks.get(kind, []))

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self._tasks.items()}

    def sample(self, kind: str, n: int, rng: np.random.Generator,
               exclude: Sequence[tuple] = ()) -> list[CodeTask]:
        """``n`` tasks of type ``kind`` (distinct while there are enough), skipping keys in ``exclude``."""
        skip = set(exclude)
        pool = [t for t in self._tasks.get(kind, []) if t.key not in skip]
        if n <= 0 or not pool:
            return []
        picks = rng.choice(len(pool), size=n, replace=n > len(pool))
        return [pool[i] for i in picks]

    def to_jsonl(self, path: str | Path) -> None:
        with open(path, "w") as f:
            for kind in sorted(self._tasks):
                for task in self._tasks[kind]:
                    f.write(json.dumps(task.to_json()) + "\n")
