"""Prompt sources: JSONL, GSM8K, tensorflow-datasets, HumanEval, reasoning-gym, procedural tasks.

Every source is a `PromptSource`: a finite table of `Example`s walked epoch
after epoch in an order fixed by (seed, epoch), resumable from one integer
position (`state()` / `restore()`). Prompts become model input through a
`PromptFormat` (template, system prompt, chat template) and token ids through
a `PromptEncoder` (with a length cap). `make_source` and `make_prompt_encoder`
build them from `DataConfig`. Nothing here imports JAX.

    source = make_source(cfg.data, split="train")
    encoder = make_prompt_encoder(cfg.data, tokenizer, max_len=cfg.sampling.prompt_len_buckets[-1])
    for batch in source.batches(cfg.train.prompts_per_step):
        prompt_ids = encoder.encode_batch(batch)     # list[list[int]]
        golds = [ex.gold for ex in batch]            # what each verifier receives as `example`
        ...
        checkpoint["data"] = source.state()          # later: source.restore(checkpoint["data"])
"""

from ouroboros_jax.data.factory import make_prompt_encoder, make_source
from ouroboros_jax.data.files import ANSWER_PARSERS, gsm8k_answer, gsm8k_source, jsonl_source, read_jsonl
from ouroboros_jax.data.packaged import humaneval_source, reasoning_gym_source, tfds_source
from ouroboros_jax.data.procedural import (
    ArithmeticTask,
    CountdownTask,
    arithmetic_source,
    countdown_source,
    procedural_source,
)
from ouroboros_jax.data.render import (
    PromptEncoder,
    PromptFormat,
    PromptTokenizer,
    PromptTooLongError,
    fill_template,
)
from ouroboros_jax.data.source import DataError, Example, LazyExamples, PromptSource, epoch_permutation

__all__ = [
    "ANSWER_PARSERS", "ArithmeticTask", "CountdownTask", "DataError", "Example", "LazyExamples",
    "PromptEncoder", "PromptFormat", "PromptSource", "PromptTokenizer", "PromptTooLongError",
    "arithmetic_source", "countdown_source", "epoch_permutation", "fill_template", "gsm8k_answer",
    "gsm8k_source", "humaneval_source", "jsonl_source", "make_prompt_encoder", "make_source",
    "procedural_source", "read_jsonl", "reasoning_gym_source", "tfds_source",
]
