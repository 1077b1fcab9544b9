"""A tiny random Hugging Face checkpoint (weights, config.json, tokenizer) for trying scripts.

    python -m ouroboros_jax.models.tiny /tmp/tiny-qwen2               # Qwen2 shape, chat template
    python -m ouroboros_jax.models.tiny /tmp/tiny-llama --family llama
    python experiments/gsm8k_grpo.py --model.path /tmp/tiny-qwen2 ...   # see README "Smoke test"

The model is random (it learns nothing useful); it exists so that every script can be run
end to end in seconds on a CPU. The tokenizer is byte-level with no merges (one token per
byte) plus the family's special tokens and chat template, so any text round-trips.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.hf import export_hf_checkpoint
from ouroboros_jax.models.transformer import init_params

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# family -> (special tokens, tokenizer_config.json, the EOS tokens of config.json)
TOKENIZERS: dict[str, tuple[list[str], dict[str, str], list[str]]] = {
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML},
              ["<|endoftext|>"]),
    "llama": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>"],
              {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": LLAMA3},
              ["<|end_of_text|>", "<|eot_id|>"]),
}
TOKENIZERS["qwen3"] = TOKENIZERS["qwen2"]
VOCAB = 320  # > 256 bytes + specials: like real checkpoints, the embedding has rows no token uses


def write_tokenizer(path: str | Path, family: str, *, chat: bool = True) -> None:
    """A byte-level BPE tokenizer without merges (one token per byte) plus `family`'s special tokens;
    `chat=False` leaves out the chat template (a base model)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    path = Path(path)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials, config, _ = TOKENIZERS[family]
    tok.add_special_tokens(specials)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if not chat:
        config = {k: v for k, v in config.items() if k != "chat_template"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def tiny_config(family: str = "qwen2") -> ModelConfig:
    """The tiny architecture of `family`: 2 layers, d_model 32, 4 query / 2 key-value heads."""
    extra = {"llama": dict(qkv_bias=False, tie_embeddings=False, rope_theta=500_000.0),
             "qwen2": dict(qkv_bias=True, tie_embeddings=True, rope_theta=1_000_000.0),
             "qwen3": dict(qkv_bias=False, qk_norm=True, tie_embeddings=False, rope_theta=1_000_000.0)}
    if family not in extra:
        raise ValueError(f"family: must be one of {sorted(extra)} (got {family!r})")
    return ModelConfig(family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=8, d_ff=64, max_seq_len=1024, **extra[family])


def make_tiny_checkpoint(path: str | Path, family: str = "qwen2", *, seed: int = 0,
                         chat: bool = True) -> Path:
    """Write a random `family` checkpoint with a tokenizer to `path`; returns the directory.

    Args:
        path: the output directory (created).
        family: "qwen2", "qwen3" or "llama".
        seed: the initialisation seed.
        chat: write the family's chat template (False: a base model without one).
    """
    cfg = tiny_config(family)
    directory = export_hf_checkpoint(init_params(cfg, jax.random.key(seed)), cfg, path)
    write_tokenizer(directory, family, chat=chat)
    from ouroboros_jax.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(directory)
    eos = [tok.token_to_id(t) for t in TOKENIZERS[family][2]]
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ouroboros_jax.models.tiny",
        description="Write a tiny random Hugging Face checkpoint for trying scripts.")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--family", default="qwen2", choices=sorted(TOKENIZERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_chat", action="store_true", help="leave out the chat template (a base model)")
    args = parser.parse_args(argv)
    directory = make_tiny_checkpoint(args.out, args.family, seed=args.seed, chat=not args.no_chat)
    print(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
