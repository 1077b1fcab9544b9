"""Building sources and encoders from `DataConfig`: the one place the data layer reads config.

Settings that `DataConfig` does not carry yet (answer format, system prompt,
procedural difficulty, overflow handling) are keyword arguments here; when one
is not given, the field of the same name is read from the config if it has
one, else the documented default applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ouroboros_jax.config import DataConfig
from ouroboros_jax.data.files import jsonl_source
from ouroboros_jax.data.packaged import humaneval_source, reasoning_gym_source, tfds_source
from ouroboros_jax.data.procedural import arithmetic_source, countdown_source
from ouroboros_jax.data.render import PromptEncoder, PromptFormat, PromptTokenizer
from ouroboros_jax.data.source import DataError, PromptSource

SPLITS = ("train", "eval")


def _setting(data_cfg: DataConfig, name: str, given: Any, default: Any) -> Any:
    """An explicit argument, else the config field `name` when it exists, else `default`."""
    if given is not None:
        return given
    return getattr(data_cfg, name, default)


def make_source(
    data_cfg: DataConfig, *, split: str, answer_format: str | None = None, digits: int | None = None,
    operations: Sequence[str] | None = None, num_numbers: int | None = None, task: str | None = None,
    size: int | None = None,
) -> PromptSource:
    """The prompt source `data_cfg` describes, for training (`split="train"`) or evaluation ("eval").

    Training reads `data.path` / `data.split` and reshuffles every epoch;
    evaluation reads `data.eval_path` / `data.eval_split` in order. Procedural
    tasks draw training and evaluation problems from disjoint halves of the
    problem space. Args beyond the config: `answer_format` ("raw" or "gsm8k",
    for jsonl and tfds), `digits` and `operations` (arithmetic), `num_numbers`
    (Countdown), `task` (reasoning-gym), `size` (procedural table size).
    """
    if split not in SPLITS:
        raise DataError(f"make_source split: must be one of {list(SPLITS)} (got {split!r})")
    train = split == "train"
    seed = data_cfg.seed
    match data_cfg.source:
        case "arithmetic":
            return arithmetic_source(
                seed=seed, heldout=not train, size=size, digits=_setting(data_cfg, "digits", digits, 3),
                operations=tuple(_setting(data_cfg, "operations", operations, ("+",))),
                fixed_width=bool(getattr(data_cfg, "fixed_width", False)))
        case "countdown":
            return countdown_source(seed=seed, heldout=not train, size=size,
                                    num_numbers=_setting(data_cfg, "num_numbers", num_numbers, 4))
        case "jsonl":
            path = data_cfg.path if train else data_cfg.eval_path
            if not path:
                raise DataError("data.eval_path: is required to evaluate on a JSONL source")
            return jsonl_source(path, prompt_field=data_cfg.prompt_field, answer_field=data_cfg.answer_field,
                                answer_format=_setting(data_cfg, "answer_format", answer_format, "raw"),
                                seed=seed, shuffle=train)
        case "tfds":
            return tfds_source(data_cfg.tfds_name, split=data_cfg.split if train else data_cfg.eval_split,
                               data_dir=data_cfg.tfds_data_dir, prompt_field=data_cfg.prompt_field,
                               answer_field=data_cfg.answer_field,
                               answer_format=_setting(data_cfg, "answer_format", answer_format, "raw"),
                               seed=seed, shuffle=train)
        case "humaneval":
            path = (data_cfg.path if train else data_cfg.eval_path) or data_cfg.path or None
            return humaneval_source(data_cfg.split if train else data_cfg.eval_split, path=path,
                                    seed=seed, shuffle=train)
        case "reasoning_gym":
            name = _setting(data_cfg, "task", task, "")
            if not name:
                raise DataError("data.task: names the reasoning-gym task when data.source is 'reasoning_gym'")
            return reasoning_gym_source(name, seed=seed, heldout=not train, size=size)
    raise DataError(f"data.source: no source named {data_cfg.source!r}")


def make_prompt_encoder(
    data_cfg: DataConfig, tokenizer: PromptTokenizer, *, max_len: int | None,
    system_prompt: str | None = None, overflow: str | None = None,
) -> PromptEncoder:
    """A `PromptEncoder` for `data_cfg`'s template and chat setting.

    Args:
      max_len: the prompt token cap, normally the longest of `sampling.prompt_len_buckets`.
      system_prompt: the system prompt ("" for none).
      overflow: "error" (default) or "truncate" for prompts over the cap.
    """
    prompt_format = PromptFormat(template=data_cfg.template, chat=data_cfg.chat_template,
                                 system_prompt=_setting(data_cfg, "system_prompt", system_prompt, ""))
    return PromptEncoder(tokenizer, prompt_format, max_len=max_len,
                         overflow=_setting(data_cfg, "prompt_overflow", overflow, "error"))
