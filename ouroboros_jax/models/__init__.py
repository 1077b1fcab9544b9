"""Pure functional decoder LMs (Llama 3, Qwen2/2.5, Qwen3), reward models, HF import/export."""

from ouroboros_jax.models.hf import (
    config_from_hf,
    config_to_hf,
    export_hf_checkpoint,
    load_hf_checkpoint,
)
from ouroboros_jax.models.logprobs import policy_logprobs, token_logprobs
from ouroboros_jax.models.reward import reward_scores, token_values
from ouroboros_jax.models.safetensors_io import CheckpointError
from ouroboros_jax.models.tokenizer import Tokenizer
from ouroboros_jax.models.transformer import (
    KVCache,
    Params,
    forward,
    forward_padded,
    hidden_states,
    init_cache,
    init_params,
    init_sharded,
    logits_from_hidden,
    param_logical_axes,
    param_shapes,
    param_shardings,
    param_specs,
)

__all__ = [
    "CheckpointError", "KVCache", "Params", "Tokenizer", "config_from_hf", "config_to_hf",
    "export_hf_checkpoint", "forward", "forward_padded", "hidden_states", "init_cache",
    "init_params", "init_sharded", "load_hf_checkpoint", "logits_from_hidden", "param_logical_axes",
    "param_shapes", "param_shardings", "param_specs", "policy_logprobs", "reward_scores", "token_logprobs",
    "token_values",
]
