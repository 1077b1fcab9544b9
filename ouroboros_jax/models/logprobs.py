"""Log-probs of the taken tokens and per-token entropy, computed in chunks of time.

The full logits [B, T, V] in float32 are the largest tensor of an update step
with a Qwen-sized vocabulary (~150k entries): at B=8, T=4096 they take 20 GB,
and their gradient as much again. Here the output projection, the log-softmax
and the gather of the taken token run over chunks of C positions inside a
`lax.scan`, each chunk under `jax.checkpoint`, so only one chunk's logits
[B, C, V] is alive at a time, in the forward pass and in the backward pass
(which recomputes the chunk's logits from the hidden states instead of
storing them).

Alignment. `policy_logprobs` returns values aligned with the input tokens:
`logp[b, t] = log p(tokens[b, t] | tokens[b, :t])`, and 0 at t = 0 (nothing
predicts the first token). The sampler's per-token log-probs use the same
alignment, so old, new and reference log-probs of a completion token sit at
the same index as the token.

Dimension legend: B batch, T time, C chunk of time, D model, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.transformer import Params, hidden_states, lm_head, positions_from_mask

DEFAULT_CHUNK = 256


def _chunk_stats(
    hidden_BCD: Float[Array, "B C D"],
    head_DV: Float[Array, "D V"],
    targets_BC: Int[Array, "B C"],
    temperature: float,
    with_entropy: bool,
) -> tuple[Float[Array, "B C"], Float[Array, "B C"]]:
    """Log-prob of the target and entropy for one chunk, from float32 logits."""
    B, C, D = hidden_BCD.shape
    # A 2-D matmul over the B*C rows: XLA lowers the backward of the 3-D einsum
    # with a transpose of the [B, C, V] gradient, which cost a third of the step on CPU.
    logits_NV = jnp.dot(hidden_BCD.reshape(B * C, D), head_DV.astype(hidden_BCD.dtype),
                        preferred_element_type=jnp.float32)
    if temperature != 1.0:
        logits_NV = logits_NV / temperature
    # One shift by the (constant) row max, then sibling sums over the same
    # exponentials: XLA reads the logits once for the normaliser and the entropy.
    shift = jax.lax.stop_gradient(jnp.max(logits_NV, axis=-1, keepdims=True))
    exp_NV = jnp.exp(logits_NV - shift)
    total = jnp.sum(exp_NV, axis=-1)
    lse = shift[:, 0] + jnp.log(total)
    # A masked sum instead of a gather: elementwise, so it stays local when the
    # vocabulary axis is sharded over devices.
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits_NV.shape, 1)
    target_logit = jnp.sum(jnp.where(vocab_ids == targets_BC.reshape(-1, 1), logits_NV, 0.0), axis=-1)
    logp = (target_logit - lse).reshape(B, C)
    if not with_entropy:
        return logp, jnp.zeros_like(logp)
    entropy = lse - jnp.sum(exp_NV * logits_NV, axis=-1) / total
    return logp, entropy.reshape(B, C)


def token_logprobs(
    hidden: Float[Array, "B T D"],
    head_DV: Float[Array, "D V"],
    targets: Int[Array, "B T"],
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    with_entropy: bool = True,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"] | None]:
    """`log softmax(hidden @ head / temperature)[targets]` and the entropy, chunked over T.

    Args:
      hidden: final hidden states (any float dtype; bfloat16 stays bfloat16 in
        the matmul, whose result is float32).
      head_DV: the output projection.
      targets: the token whose log-prob is taken at each position.
      temperature: the logits are divided by it (the sampler's temperature,
        so the log-probs are those of the distribution that sampled).
      chunk_size: positions per chunk; T is padded up to a multiple of it.
        A chunk of T or more computes everything in one piece.
      with_entropy: also return the entropy of the (tempered) distribution.

    Returns:
      `(logp, entropy)`, both float32 [B, T]; entropy is None without
      `with_entropy`.
    """
    B, T, D = hidden.shape
    if chunk_size >= T:  # one chunk: no loop to build
        logp, entropy = _chunk_stats(hidden, head_DV, targets, temperature, with_entropy)
        return logp, entropy if with_entropy else None
    C = chunk_size
    n_chunks = -(-T // C)
    pad = n_chunks * C - T
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [B, T, D] -> [n, B, C, D]: the scan runs over the leading axis, and the
    # batch axis stays second so its sharding over devices is undisturbed.
    hidden_nBCD = hidden.reshape(B, n_chunks, C, D).swapaxes(0, 1)
    targets_nBC = targets.reshape(B, n_chunks, C).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(head, x):
        h_BCD, t_BC = x
        return head, _chunk_stats(h_BCD, head, t_BC, temperature, with_entropy)

    _, (logp_nBC, entropy_nBC) = jax.lax.scan(one_chunk, head_DV, (hidden_nBCD, targets_nBC))
    logp = logp_nBC.swapaxes(0, 1).reshape(B, n_chunks * C)[:, :T]
    if not with_entropy:
        return logp, None
    entropy = entropy_nBC.swapaxes(0, 1).reshape(B, n_chunks * C)[:, :T]
    return logp, entropy


def policy_logprobs(
    params: Params,
    model_config: ModelConfig,
    tokens: Int[Array, "B T"],
    attention_mask: Bool[Array, "B T"],
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    with_entropy: bool = True,
    start: int = 0,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"] | None]:
    """Per-token log-probs (and entropy) of a padded batch, aligned with the tokens.

    Pad tokens (attention_mask False) are invisible to the others and rotary
    positions skip them, as in `forward_padded`.

    Args:
      params: model parameters (float32 master weights are cast to
        `model_config.compute_dtype` inside the forward).
      model_config: the architecture.
      tokens: prompt and completion tokens.
      attention_mask: True for real tokens, False for padding.
      temperature: divisor of the logits (the sampling temperature).
      chunk_size: positions per chunk of the output projection.
      with_entropy: also return the entropy.
      start: first position whose log-prob is wanted (the prompt width when
        only completions matter): the output head, the largest cost with a
        big vocabulary, runs on positions `start..T-1` only.

    Returns:
      `(logp, entropy)` [B, T] float32: `logp[b, t]` is the log-prob of
      `tokens[b, t]` given the tokens before it, and `entropy[b, t]` the
      entropy of that predictive distribution; both 0 at t = 0 and at t < start.
    """
    T = tokens.shape[1]
    if not 0 <= start < T:
        raise ValueError(f"start={start} must be in [0, {T})")
    positions = positions_from_mask(attention_mask)
    hidden, _ = hidden_states(params, model_config, tokens, positions, attention_mask)
    # Position t - 1 predicts token t; nothing predicts token 0.
    first = max(start, 1)
    logp, entropy = token_logprobs(
        hidden[:, first - 1:-1], lm_head(params, model_config), tokens[:, first:],
        temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy,
    )
    pad = lambda x: jnp.pad(x, ((0, 0), (first, 0)))
    return pad(logp), None if entropy is None else pad(entropy)
