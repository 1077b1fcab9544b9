"""Tokenizer wrapper over `tokenizers` (tokenizer.json) with Hugging Face chat templates.

Chat templates are the Jinja2 strings in `tokenizer_config.json`, rendered in a
sandboxed environment with the helpers Hugging Face templates expect
(`raise_exception`, `tojson`, `strftime_now`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ouroboros_jax.models.safetensors_io import CheckpointError


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> token ids, special tokens, and chat templates."""

    def __init__(self, tokenizer: Any, config: Mapping[str, Any] | None = None):
        self._tok = tokenizer
        self.config = dict(config or {})
        self.chat_template: str | None = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take "default"
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default", next(iter(named.values())))
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        self.add_bos = bool(self.config.get("add_bos_token", False))
        # char_level tokenizers: the characters they can encode, and their special tokens
        self._alphabet: frozenset[str] | None = None
        self._specials: tuple[str, ...] = ()

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json` (and `tokenizer_config.json` when present)."""
        from tokenizers import Tokenizer as HFTokenizer

        directory = Path(path)
        tok_file = directory / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"{directory}: tokenizer.json not found")
        try:
            tok = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust library raises its own exception type
            raise CheckpointError(f"{tok_file}: cannot be read ({e})") from None
        config: dict[str, Any] = {}
        cfg_file = directory / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
        template_file = directory / "chat_template.jinja"
        if template_file.is_file() and "chat_template" not in config:
            config["chat_template"] = template_file.read_text()
        return cls(tok, config)

    @classmethod
    def char_level(cls, alphabet: str, *, specials: Sequence[str] = ("<pad>", "<bos>", "<eos>")) -> Tokenizer:
        """A character-level tokenizer (one id per character), for tiny models trained from scratch.

        Ids 0.. are the `specials` (pad, bos, eos by default), then the characters
        of `alphabet` in order. Text with a character outside the alphabet (other than
        inside a special token's spelling) is refused by `encode` with a ValueError that
        names the characters: a silent padding id would train on text the model never saw.
        """
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        chars = list(dict.fromkeys(alphabet))
        vocab = {tok: i for i, tok in enumerate([*specials, *chars])}
        tok = HFTokenizer(models.WordLevel(vocab, unk_token=specials[0]))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens(list(specials))
        names = dict(zip(("pad_token", "bos_token", "eos_token"), specials, strict=False))
        out = cls(tok, names)
        out._alphabet, out._specials = frozenset(chars), tuple(specials)
        return out

    def _check_alphabet(self, texts: Sequence[str]) -> None:
        if self._alphabet is None:
            return
        for text in texts:
            plain = text
            for special in self._specials:
                plain = plain.replace(special, "")
            unknown = sorted(set(plain) - self._alphabet)
            if unknown:
                raise ValueError(f"text {text[:60]!r}: characters {''.join(unknown)!r} are outside this "
                                 f"character-level tokenizer's alphabet {''.join(sorted(self._alphabet))!r}")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def pad_id(self) -> int:
        for candidate in (self.pad_token, self.eos_token):
            tid = self.token_to_id(candidate)
            if tid is not None:
                return tid
        return 0

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens only when asked (templates add their own)."""
        self._check_alphabet([text])
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        self._check_alphabet(texts)
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]:
        return self._tok.decode_batch([list(b) for b in batch], skip_special_tokens=skip_special_tokens)

    def special_token_ids(self) -> dict[str, int]:
        """`bos_token_id`, `eos_token_id`, `pad_token_id` (those this tokenizer has): the keys a
        model's config.json carries, e.g. `export_hf_checkpoint(..., extra_config=...)`."""
        ids = {"bos_token_id": self.bos_id, "eos_token_id": self.eos_id,
               "pad_token_id": self.token_to_id(self.pad_token)}
        return {k: v for k, v in ids.items() if v is not None}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into directory `path`: the files
        `transformers.AutoTokenizer` loads (a fast tokenizer) and `Tokenizer.from_dir` reads back."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render messages with the checkpoint's chat template (as text)."""
        if not self.chat_template:
            raise CheckpointError("tokenizer_config.json has no chat_template")
        return _compile(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: (
        json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys))
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
