"""The `Example` record and `PromptSource`: a deterministic, resumable stream over a finite table.

Every source in this package is a finite, random-access table of examples
(a JSONL file, a tfds split, HumanEval, or a procedural task generated lazily
by index) wrapped in a `PromptSource`. The source walks the table epoch after
epoch; the order within epoch `e` is a permutation fixed by `(seed, e)`, so
the whole stream is a pure function of the seed and one integer, the
position (examples consumed so far). A trainer that checkpoints
`source.state()` and later calls `source.restore(state)` continues with
exactly the examples it would have seen had it not stopped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np


class DataError(ValueError):
    """Bad data or a bad data request; the message names the file, record or field."""


@dataclass(frozen=True)
class Example:
    """One prompt with what a verifier needs to grade its completions.

    Attributes:
      id: a stable identifier, unique within its source (e.g. "gsm8k_test:12",
        "HumanEval/0", "arithmetic-train-0-41").
      prompt: the task text, before any template or chat formatting.
      gold: the mapping a verifier receives as its `example` argument: for math
        `{"answer": ...}`; for code `{"tests": ..., "entry_point": ...}`; for
        Countdown `{"numbers": [...], "target": N}`; plus any extra fields.
    """

    id: str
    prompt: str
    gold: Mapping[str, Any] = field(default_factory=dict)


class LazyExamples(Sequence[Example]):
    """A random-access table whose example `i` is built on demand by `make(i)`.

    Used for procedural tasks (example `i` is a pure function of the seed and
    `i`) and for record stores such as `tfds.data_source` (decode record `i`).
    """

    def __init__(self, size: int, make: Callable[[int], Example]):
        self._size = size
        self._make = make

    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...
    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        if isinstance(index, slice):
            return [self._make(i) for i in range(*index.indices(self._size))]
        if not -self._size <= index < self._size:
            raise IndexError(f"index {index} out of range for {self._size} examples")
        return self._make(index % self._size)


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: a permutation of range(size) fixed by (seed, epoch).

    Built from a bit generator's raw output, which NumPy keeps stable across
    releases (the `Generator` distribution methods carry no such promise), so a
    checkpointed position resumes to the same order after an upgrade.
    """
    bits = np.random.PCG64(np.random.SeedSequence([seed, epoch])).random_raw(size)
    return np.argsort(bits, kind="stable")


def stable_fraction(key: str) -> float:
    """A hash of `key` mapped to [0, 1), the same in every process and Python version.

    Procedural tasks use it to place each problem in the training or the held-out
    split by its content, so the two never share a problem whatever the seeds.
    """
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def stable_seed(*parts: object) -> int:
    """A 64-bit seed derived from `parts` (stable across processes, unlike `hash`)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


_SLICE = re.compile(r"^(?P<name>[\w.-]+)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def parse_split(split: str) -> tuple[str, slice]:
    """Split a tfds-style split string "name[start:stop]" into ("name", slice).

    Bounds may be integers or percentages ("test[:80%]"); percentages are
    resolved by `resolve_slice` once the split's size is known.
    """
    m = _SLICE.match(split.strip())
    if m is None:
        raise DataError(f"split {split!r}: expected 'name' or 'name[start:stop]' (e.g. 'test[:100]')")
    return m["name"], slice(m["start"], m["stop"])


def resolve_slice(bounds: slice, size: int) -> range:
    """The indices a `parse_split` slice selects from a split of `size` records."""

    def bound(b: str | None) -> int | None:
        if b is None:
            return None
        if b.endswith("%"):
            return round(size * int(b[:-1]) / 100)
        return int(b)

    return range(size)[slice(bound(bounds.start), bound(bounds.stop))]


class PromptSource:
    """A deterministic, resumable, epoch-wise reshuffled stream of `Example`s.

    Args:
      examples: the table (one epoch), any random-access sequence of examples.
      seed: fixes the order of every epoch.
      shuffle: reshuffle each epoch by (seed, epoch); False keeps table order
        (evaluation sets read in file order).
      name: used in error messages and in `state()`.

    The position counts examples handed out since the start, across epochs;
    `state()` / `restore()` save and set it. `take`, `__next__` and `batches`
    advance it; `first` and indexing read the table without moving it.
    """

    def __init__(self, examples: Sequence[Example], *, seed: int = 0, shuffle: bool = True, name: str = ""):
        if len(examples) == 0:
            raise DataError(f"{name or 'source'}: the prompt set is empty")
        self.examples = examples
        self.seed = seed
        self.shuffle = shuffle
        self.name = name
        self._position = 0
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Examples in one epoch."""
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        """Example `index` in table order (not the shuffled order); the position is untouched."""
        return self.examples[index]

    def __repr__(self) -> str:
        return (f"PromptSource(name={self.name!r}, size={len(self)}, seed={self.seed}, "
                f"shuffle={self.shuffle}, position={self._position})")

    @property
    def position(self) -> int:
        """Examples handed out so far, counted across epochs."""
        return self._position

    @property
    def epoch(self) -> int:
        """The epoch the next example comes from."""
        return self._position // len(self)

    def seek(self, position: int) -> None:
        """Move to an absolute position (as if `position` examples had been taken)."""
        if position < 0:
            raise DataError(f"{self.name}: position must be >= 0 (got {position})")
        self._position = int(position)

    def order(self, epoch: int) -> np.ndarray:
        """The table indices of epoch `epoch`, in the order they are handed out."""
        if not self.shuffle:
            return np.arange(len(self))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_permutation(len(self), self.seed, epoch))
        return self._order[1]

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        epoch, offset = divmod(self._position, len(self))
        example = self.examples[int(self.order(epoch)[offset])]
        self._position += 1
        return example

    def take(self, n: int) -> list[Example]:
        """The next `n` examples (crossing epoch boundaries as needed); advances the position."""
        if n < 0:
            raise DataError(f"{self.name}: take(n) needs n >= 0 (got {n})")
        return [next(self) for _ in range(n)]

    def batches(self, batch_size: int, num_batches: int | None = None) -> Iterator[list[Example]]:
        """Batches of `batch_size` examples, without end unless `num_batches` is given.

        The position advances only when a batch is yielded, so `state()` taken
        after receiving batch k resumes at batch k + 1.
        """
        if batch_size <= 0:
            raise DataError(f"{self.name}: batch_size must be positive (got {batch_size})")
        count = 0
        while num_batches is None or count < num_batches:
            yield self.take(batch_size)
            count += 1

    def first(self, n: int | None = None) -> list[Example]:
        """The first `n` examples of epoch 0 (at most one epoch), without moving the position.

        For evaluation: the same fixed set on every call.
        """
        count = len(self) if n is None else min(n, len(self))
        order = self.order(0)
        return [self.examples[int(i)] for i in order[:count]]

    def state(self) -> dict[str, int | str]:
        """What a checkpoint stores to resume this stream exactly: plain ints and a name."""
        return {"position": self._position, "seed": self.seed, "size": len(self), "name": self.name}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume from `state()`; refuses a state saved from a different seed or table size."""
        for key, mine in (("seed", self.seed), ("size", len(self))):
            if key in state and int(state[key]) != mine:
                raise DataError(
                    f"{self.name}: cannot restore a data position saved with {key}={state[key]} "
                    f"into a source with {key}={mine} (the order would differ)")
        self.seek(int(state["position"]))
