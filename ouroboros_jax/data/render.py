"""Prompt rendering (template, system prompt, chat template) and tokenisation with a length cap.

The tokenizer is anything with the methods of `ouroboros_jax.models.Tokenizer`
used here (`encode_batch`, `apply_chat_template`); the data layer takes it as
a value rather than importing the models package, which imports JAX.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ouroboros_jax.data.source import DataError, Example

OVERFLOW_MODES = ("error", "truncate")


class PromptTokenizer(Protocol):
    """The part of `ouroboros_jax.models.Tokenizer` that prompt encoding uses."""

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]: ...

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True, **kwargs: Any,
    ) -> str: ...


class PromptTooLongError(DataError):
    """A prompt has more tokens than the cap; the message names the example id."""


def fill_template(template: str, prompt: str) -> str:
    """`template` with every "{prompt}" replaced by `prompt`.

    Plain replacement, not `str.format`: math templates are full of braces
    ("put the answer in \\boxed{}") that format would reject.
    """
    if "{prompt}" not in template:
        raise DataError(f"template must contain the placeholder {{prompt}} (got {template!r})")
    return template.replace("{prompt}", prompt)


@dataclass(frozen=True)
class PromptFormat:
    """How an example's prompt becomes model input text.

    Attributes:
      template: wraps the prompt; must contain "{prompt}".
      system_prompt: a system message in chat mode; in plain mode it is put
        before the prompt, separated by a blank line.
      chat: render through the tokenizer's chat template (a user turn plus the
        generation prompt) instead of using the text as is.
    """

    template: str = "{prompt}"
    system_prompt: str = ""
    chat: bool = False

    def __post_init__(self) -> None:
        fill_template(self.template, "")  # reject a template without {prompt} at construction

    def messages(self, example: Example) -> list[dict[str, str]]:
        """The chat messages for `example`: an optional system turn and one user turn."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": fill_template(self.template, example.prompt)}]

    def render(self, example: Example, tokenizer: PromptTokenizer | None = None) -> str:
        """The model input text for `example` (chat mode needs the tokenizer for its template)."""
        if self.chat:
            if tokenizer is None:
                raise DataError("chat formatting needs a tokenizer with a chat template")
            return tokenizer.apply_chat_template(self.messages(example), add_generation_prompt=True)
        text = fill_template(self.template, example.prompt)
        return f"{self.system_prompt}\n\n{text}" if self.system_prompt else text


class PromptEncoder:
    """Examples -> token-id lists, with a length cap.

    Args:
      tokenizer: encodes text (see `PromptTokenizer`).
      prompt_format: template, system prompt, chat mode.
      max_len: the most tokens a prompt may have (the longest prompt bucket of
        the sampler); None for no cap.
      overflow: "error" raises `PromptTooLongError` naming the example;
        "truncate" keeps the last `max_len` tokens, where the question and the
        chat template's generation prompt are (a system prompt or BOS may be lost).
    """

    def __init__(self, tokenizer: PromptTokenizer, prompt_format: PromptFormat | None = None, *,
                 max_len: int | None = None, overflow: str = "error"):
        if overflow not in OVERFLOW_MODES:
            raise DataError(f"overflow: must be one of {list(OVERFLOW_MODES)} (got {overflow!r})")
        if max_len is not None and max_len <= 0:
            raise DataError(f"max_len: must be positive or None (got {max_len})")
        self.tokenizer = tokenizer
        self.format = prompt_format or PromptFormat()
        self.max_len = max_len
        self.overflow = overflow

    def render(self, example: Example) -> str:
        """The model input text of `example`."""
        return self.format.render(example, self.tokenizer)

    def encode(self, example: Example) -> list[int]:
        """Token ids of one example's rendered prompt."""
        return self.encode_batch([example])[0]

    def encode_batch(self, examples: Sequence[Example]) -> list[list[int]]:
        """Token ids of each example's rendered prompt, capped at `max_len`.

        A chat template writes its own special tokens (BOS included) into the
        text, so only plain prompts ask the tokenizer to add special tokens.
        """
        texts = [self.render(ex) for ex in examples]
        ids = self.tokenizer.encode_batch(texts, add_special_tokens=not self.format.chat)
        if self.max_len is None:
            return ids
        out = []
        for ex, tokens in zip(examples, ids, strict=True):
            if len(tokens) > self.max_len:
                if self.overflow == "error":
                    raise PromptTooLongError(
                        f"example {ex.id!r}: prompt has {len(tokens)} tokens, more than the cap "
                        f"{self.max_len}: add a longer bucket to --sampling.prompt_len_buckets (its "
                        "largest is the cap), shorten --data.system_prompt or --data.template, or keep "
                        "the prompt's end with --data.prompt_overflow truncate")
                tokens = tokens[-self.max_len:]
            out.append(tokens)
        return out
