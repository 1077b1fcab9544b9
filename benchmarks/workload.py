"""The GRPO workload every library runs in the side-by-side benchmarks.

One tiny Qwen2-shaped model, saved once as a Hugging Face checkpoint with a
matching tokenizer, and one batch shape: `prompts` prompts of `prompt_len`
tokens, `group` completions each of exactly `completion_len` tokens.

The tokenizer is word-level: token i is the word `t<i>`, so a prompt is a
string such as "t17 t4 t902" that every library encodes to the same ids. Its
end-of-sequence token `<eos>` has the id `vocab`, one past the model's
vocabulary, so the model can never emit it and every completion runs to its
full length in every library (equal work per step). The pad token is `t0`;
prompts never contain it.

The reward is a cheap host function of the completion text, the same in every
library: the fraction of completion tokens with an even id.

Top-level imports are numpy and the standard library only: the Tunix worker
imports this module from its own virtual environment, where ouroboros_jax is
not installed. Functions that build the checkpoint import ouroboros_jax lazily.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

EOS = "<eos>"
PAD = "t0"


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Qwen2-shaped decoder (q/k/v biases, tied embeddings, float32)."""

    vocab: int = 8192
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    d_ff: int = 704

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"ModelShape.d_model={self.d_model} is not a multiple of heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"ModelShape.heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def describe(self) -> str:
        return (f"qwen2-shaped, vocab {self.vocab}, d_model {self.d_model}, {self.layers} layers, "
                f"{self.heads}/{self.kv_heads} heads, d_ff {self.d_ff}, tied embeddings, float32")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One GRPO step's shape: prompts x group rows of prompt_len + completion_len tokens."""

    prompts: int = 4
    group: int = 4
    prompt_len: int = 32
    completion_len: int = 256

    def __post_init__(self) -> None:
        for name in ("prompts", "group", "prompt_len", "completion_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"Workload.{name} must be >= 1, got {getattr(self, name)}")
        if self.group < 2:
            raise ValueError(f"Workload.group must be >= 2 (GRPO compares completions), got {self.group}")

    @property
    def rows(self) -> int:
        return self.prompts * self.group

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.completion_len

    @property
    def tokens(self) -> int:
        """Tokens one step processes: every row's prompt and completion."""
        return self.rows * self.seq_len

    def describe(self) -> str:
        return (f"{self.prompts} prompts x {self.group} completions, prompt {self.prompt_len} + "
                f"completion {self.completion_len} tokens")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a worker needs besides the files: the work, the update's knobs, the mode."""

    directory: str
    mode: str  # "step" (generate + reward + update), "update" (the given batch), "generate"
    work: Workload
    learning_rate: float = 1e-6
    clip: float = 0.2
    max_grad_norm: float = 1.0
    micro_batch: int = 0  # rows per micro-batch (0: the whole batch)
    remat: bool = False
    seed: int = 0

    MODES = ("step", "update", "generate")

    def __post_init__(self) -> None:
        if self.mode not in self.MODES:
            raise ValueError(f"Settings.mode must be one of {self.MODES}, got {self.mode!r}")
        micro = self.micro_batch or self.work.rows
        if self.work.rows % micro:
            raise ValueError(f"Settings.micro_batch={micro} does not divide the {self.work.rows} rows")

    @property
    def micro(self) -> int:
        return self.micro_batch or self.work.rows

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        raw = json.loads(text)
        return cls(**(raw | {"work": Workload(**raw["work"])}))


# ---------------------------------------------------------------------------
# Text, prompts and reward (shared by every library)


def ids_to_text(ids: Any) -> str:
    return " ".join(f"t{int(i)}" for i in ids)


def prompt_ids(work: Workload, vocab: int, seed: int = 0) -> np.ndarray:
    """[prompts, prompt_len] token ids in [1, vocab): no pad, no end token."""
    return np.random.RandomState(seed).randint(1, vocab, (work.prompts, work.prompt_len)).astype(np.int32)


def prompt_texts(work: Workload, vocab: int, seed: int = 0) -> list[str]:
    return [ids_to_text(row) for row in prompt_ids(work, vocab, seed)]


def reward(text: str) -> float:
    """The fraction of a completion's tokens with an even id (0 for an empty completion)."""
    words = text.split()
    return sum(int(w[1:]) % 2 == 0 for w in words if w[1:].isdigit()) / len(words) if words else 0.0


def group_advantages(rewards: np.ndarray, group: int, eps: float = 1e-4) -> np.ndarray:
    """GRPO's advantages, reward minus group mean over group std (sample std), flattened."""
    r = np.asarray(rewards, np.float64).reshape(-1, group)
    adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + eps)
    return adv.reshape(-1).astype(np.float32)


def hf_generation_config(new_tokens: int, pad_token_id: int = 0):
    """`transformers` sampling at temperature 1, no truncation, exactly `new_tokens` new tokens."""
    import transformers

    return transformers.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                         temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None,
                                         pad_token_id=pad_token_id)


# ---------------------------------------------------------------------------
# Files: checkpoint, tokenizer, the update batch (written once by the parent)


def write_tokenizer(directory: Path, vocab: int) -> None:
    """tokenizer.json + tokenizer_config.json: words t0..t<vocab-1>, then <eos> = vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"t{i}": i for i in range(vocab)} | {EOS: vocab}
    tok = Tokenizer(models.WordLevel(words, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS])
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": PAD,
              "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def hf_tokenizer(directory: str | Path):
    """The checkpoint's tokenizer as a `transformers` fast tokenizer.

    Loaded explicitly: `AutoTokenizer` picks the Qwen2 (byte-level BPE) class
    from the model type of config.json, which does not fit these files.
    """
    import transformers

    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(directory) / "tokenizer.json"),
                                                eos_token=EOS, pad_token=PAD)


def make_checkpoint(directory: Path, shape: ModelShape, max_seq_len: int, seed: int = 0) -> Path:
    """Random weights in our initialisation, exported once as a Hugging Face checkpoint + tokenizer."""
    import jax

    from ouroboros_jax.models import export_hf_checkpoint, init_params

    cfg = model_config(shape, max_seq_len)
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(seed))
    directory.mkdir(parents=True, exist_ok=True)
    export_hf_checkpoint(params, cfg, directory, extra_config={"pad_token_id": 0})
    write_tokenizer(directory, shape.vocab)
    return directory


def model_config(shape: ModelShape, max_seq_len: int):
    from ouroboros_jax.config import ModelConfig

    return ModelConfig(family="qwen2", vocab_size=shape.vocab, d_model=shape.d_model, n_layers=shape.layers,
                       n_heads=shape.heads, n_kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                       d_ff=shape.d_ff, rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=True,
                       max_seq_len=max_seq_len)


def make_update_batch(directory: Path, work: Workload, seed: int = 0) -> None:
    """batch.npz: one GRPO batch as a rollout would leave it, for the update-only benchmark.

    Full-length prompts (Hugging Face models number positions 0..T-1 through
    left padding while ours skip pads, so padding-free prompts keep first-update
    losses comparable); completions end at varying lengths; the old log-probs
    are the policy's own, slightly off (as after an earlier update) so some
    ratios leave the clip range; advantages are group-normalised 0/1 rewards.
    """
    import jax

    from ouroboros_jax.models import load_hf_checkpoint, policy_logprobs

    cfg, params = load_hf_checkpoint(directory)
    rs = np.random.RandomState(seed)
    B, P, C = work.rows, work.prompt_len, work.completion_len
    tokens = rs.randint(1, cfg.vocab_size, (B, P + C)).astype(np.int32)
    lengths = rs.randint(C // 4, C + 1, B)
    completion_mask = np.arange(C)[None] < lengths[:, None]
    tokens[:, P:] = np.where(completion_mask, tokens[:, P:], 0)
    attention = np.concatenate([np.ones((B, P), bool), completion_mask], axis=1)
    loss_mask = np.concatenate([np.zeros((B, P), bool), completion_mask], axis=1)
    advantages = group_advantages(rs.randint(0, 2, B).astype(np.float32), work.group)
    logp, _ = jax.jit(lambda p: policy_logprobs(p, cfg, tokens, attention, with_entropy=False))(params)
    old_logp = np.where(loss_mask, np.asarray(logp) + 0.1 * rs.randn(B, P + C), 0.0).astype(np.float32)
    np.savez(directory / "batch.npz", tokens=tokens, attention=attention, loss_mask=loss_mask,
             advantages=advantages, old_logp=old_logp)


def load_batch(directory: str | Path) -> dict[str, np.ndarray]:
    with np.load(Path(directory) / "batch.npz") as f:
        return dict(f)


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "config.json").read_text())
