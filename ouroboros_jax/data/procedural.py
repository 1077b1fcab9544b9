"""Embedded procedural tasks: arithmetic and Countdown, generated from a seed, with a held-out split.

Example `i` of a split is a pure function of (task settings, seed, split, i),
built on demand, so a table of a million problems costs nothing until read.
Each problem is placed in the training or the held-out split by a hash of its
content (`stable_fraction`), and each split draws only problems of its own
kind; the two never share a problem, whatever seeds they were built with.
Difficulty is the operand digit count (arithmetic) or how many numbers must
be combined (Countdown).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from ouroboros_jax.data.source import (
    DataError,
    Example,
    LazyExamples,
    PromptSource,
    stable_fraction,
    stable_seed,
)

ARITHMETIC_OPERATIONS = ("+", "-", "*")
TRAIN_SIZE = 100_000
EVAL_SIZE = 1_000
_MAX_DRAWS = 10_000


@dataclass(frozen=True)
class ArithmeticTask:
    """Problems "What is a <op> b?" with operands of up to `digits` digits.

    Subtraction puts the larger operand first so answers stay non-negative
    integers, the number format a small model learns first.
    """

    name: ClassVar[str] = "arithmetic"
    digits: int = 3
    operations: tuple[str, ...] = ("+",)
    heldout_fraction: float = 0.1
    # True: every operand has exactly `digits` digits (10..99 for 2), so digits line up by position.
    fixed_width: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 18:
            raise DataError(f"arithmetic digits: must be in [1, 18] (got {self.digits})")
        bad = [op for op in self.operations if op not in ARITHMETIC_OPERATIONS]
        if not self.operations or bad:
            raise DataError(f"arithmetic operations: must be a non-empty subset of "
                            f"{list(ARITHMETIC_OPERATIONS)} (got {list(self.operations)})")
        _check_fraction(self.heldout_fraction)

    def draw(self, rng: random.Random) -> tuple[str, str, dict[str, object]]:
        """One problem: (hash key, prompt, gold)."""
        op = rng.choice(self.operations)
        low = 10 ** (self.digits - 1) if self.fixed_width and self.digits > 1 else 0
        a, b = rng.randrange(low, 10**self.digits), rng.randrange(low, 10**self.digits)
        if op == "-" and a < b:
            a, b = b, a
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        # a + b and b + a are one problem to a model that knows commutativity.
        key = f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else f"{a}{op}{b}"
        return key, f"What is {a} {op} {b}?", {"answer": str(result)}


@dataclass(frozen=True)
class CountdownTask:
    """Countdown: combine `num_numbers` numbers with + - * / to reach a target.

    Problems are built from a random expression over all the numbers with
    positive-integer intermediate results (the game's rules), so every problem
    has a solution that uses each number exactly once; it is kept in
    `gold["solution"]`.
    """

    name: ClassVar[str] = "countdown"
    num_numbers: int = 4
    max_number: int = 100
    max_target: int = 100
    heldout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 2 <= self.num_numbers <= 8:
            raise DataError(f"countdown num_numbers: must be in [2, 8] (got {self.num_numbers})")
        if self.max_number < 2 or self.max_target < 1:
            raise DataError(f"countdown: max_number must be >= 2 and max_target >= 1 "
                            f"(got {self.max_number}, {self.max_target})")
        _check_fraction(self.heldout_fraction)

    def draw(self, rng: random.Random) -> tuple[str, str, dict[str, object]] | None:
        """One problem (hash key, prompt, gold), or None when the drawn target is out of range."""
        numbers = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
        target, solution = _random_expression(numbers, rng, product_cap=10 * self.max_target)
        if not 1 <= target <= self.max_target:
            return None
        key = f"{sorted(numbers)}={target}"
        prompt = (f"Using the numbers {numbers}, create an equation that equals {target}. "
                  "You can use +, -, * and /, and each number must be used exactly once.")
        return key, prompt, {"numbers": numbers, "target": target, "solution": solution}


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise DataError(f"heldout_fraction: must be in (0, 1) (got {fraction})")


def _random_expression(numbers: Sequence[int], rng: random.Random, product_cap: int) -> tuple[int, str]:
    """Combine all `numbers` pairwise at random; (value, expression) with integer steps > 0.

    Products above `product_cap` are skipped: the remaining numbers rarely bring
    them back into the target range, and skipping them halves the rejected draws.
    """
    items = [(n, str(n)) for n in numbers]
    while len(items) > 1:
        a, ea = items.pop(rng.randrange(len(items)))
        b, eb = items.pop(rng.randrange(len(items)))
        if a < b:  # larger first, so "-" and "/" can stay positive integers
            (a, ea), (b, eb) = (b, eb), (a, ea)
        ops = "+" + ("*" if a * b <= product_cap else "") + ("-" if a > b else "")
        ops += "/" if a % b == 0 else ""
        op = rng.choice(ops)
        value = a + b if op == "+" else a * b if op == "*" else a - b if op == "-" else a // b
        items.append((value, f"({ea} {op} {eb})"))
    value, expr = items[0]
    return value, expr[1:-1]


def procedural_example(
    task: ArithmeticTask | CountdownTask, *, seed: int, index: int, heldout: bool,
) -> Example:
    """Example `index` of a split: drawn until a problem of that split comes up (deterministic)."""
    name = task.name
    split = "eval" if heldout else "train"
    rng = random.Random(stable_seed(name, seed, split, index))
    for _ in range(_MAX_DRAWS):
        drawn = task.draw(rng)
        if drawn is None:
            continue
        key, prompt, gold = drawn
        if (stable_fraction(key) < task.heldout_fraction) == heldout:
            return Example(id=f"{name}-{split}-{seed}-{index}", prompt=prompt, gold=gold)
    raise DataError(f"{name}: no {split} problem found in {_MAX_DRAWS} draws for {task}; the "
                    "problem space is too small for a held-out split (raise the difficulty)")


def procedural_source(
    task: ArithmeticTask | CountdownTask, *, seed: int = 0, heldout: bool = False,
    size: int | None = None, shuffle: bool | None = None,
) -> PromptSource:
    """A `PromptSource` over `size` lazily generated problems of one split.

    Defaults: TRAIN_SIZE training problems (reshuffled each epoch) or EVAL_SIZE
    held-out problems (in generation order, the same fixed set on every call).
    """
    size = size if size is not None else (EVAL_SIZE if heldout else TRAIN_SIZE)
    if size <= 0:
        raise DataError(f"procedural source size: must be positive (got {size})")
    make: Callable[[int], Example] = lambda i: procedural_example(task, seed=seed, index=i, heldout=heldout)
    name = f"{task.name}-{'eval' if heldout else 'train'}"
    return PromptSource(LazyExamples(size, make), seed=seed, name=name,
                        shuffle=(not heldout) if shuffle is None else shuffle)


def arithmetic_source(
    *, seed: int = 0, heldout: bool = False, digits: int = 3, operations: Sequence[str] = ("+",),
    size: int | None = None, fixed_width: bool = False,
) -> PromptSource:
    """Arithmetic problems ("What is 347 + 85?", gold {"answer": "432"}); see `ArithmeticTask`."""
    task = ArithmeticTask(digits=digits, operations=tuple(operations), fixed_width=fixed_width)
    return procedural_source(task, seed=seed, heldout=heldout, size=size)


def countdown_source(
    *, seed: int = 0, heldout: bool = False, num_numbers: int = 4, max_number: int = 100,
    max_target: int = 100, size: int | None = None,
) -> PromptSource:
    """Countdown problems (gold {"numbers": [...], "target": N, "solution": ...}); see `CountdownTask`."""
    task = CountdownTask(num_numbers=num_numbers, max_number=max_number, max_target=max_target)
    return procedural_source(task, seed=seed, heldout=heldout, size=size)

