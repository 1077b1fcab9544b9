"""Tiny random Hugging Face checkpoints built with `transformers` (torch CPU) for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6)

FAMILY_KWARGS: dict[str, dict[str, Any]] = {
    # Llama 3 with GQA and llama3 rope scaling; untied head.
    "llama": dict(rope_theta=500_000.0, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Qwen2.5: q/k/v bias, tied embeddings.
    "qwen2": dict(rope_theta=1_000_000.0, tie_word_embeddings=True),
    # Qwen3: q/k RMSNorm, explicit head_dim, untied.
    "qwen3": dict(rope_theta=1_000_000.0, tie_word_embeddings=False, head_dim=16),
}


def hf_config(family: str, **overrides: Any):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[family]
    return cls(**(COMMON | FAMILY_KWARGS[family] | overrides))


def make_checkpoint(family: str, path: Path, *, seed: int = 0, reward: bool = False,
                    max_shard_size: str | None = None, **overrides: Any):
    """Save a randomly initialised model; returns the torch model (eval mode, float32).

    Skips the calling test when torch or transformers is missing (the `parity` extra).
    """
    import pytest

    why = "tiny HF checkpoints are built with torch and transformers: pip install -e '.[parity]'"
    pytest.importorskip("torch", reason=why)
    pytest.importorskip("transformers", reason=why)
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    if reward:
        cfg.num_labels = 1
        cfg.pad_token_id = 0
        model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model = model.float().eval()
    with torch.no_grad():  # make norms and biases non-trivial so parity means something
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return model
