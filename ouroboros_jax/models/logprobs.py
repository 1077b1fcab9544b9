"""Log-probs of the taken tokens and per-token entropy, computed in chunks of time.

The full logits [B, T, V] in float32 are the largest tensor of an update step
with a Qwen-sized vocabulary (~150k entries): at B=8, T=4096 they take 20 GB,
and their gradient as much again. Here the output projection, the log-softmax
and the gather of the taken token run over chunks of W positions inside a
`lax.scan`, each chunk under `jax.checkpoint`, so only one chunk's logits
[B, W, V] is alive at a time, in the forward pass and in the backward pass
(which recomputes the chunk's logits from the hidden states instead of
storing them).

Alignment. `policy_logprobs` returns values aligned with the input tokens:
`logp[b, t] = log p(tokens[b, t] | tokens[b, :t])`, and 0 at t = 0 (nothing
predicts the first token). The sampler's per-token log-probs use the same
alignment, so old, new and reference log-probs of a completion token sit at
the same index as the token.

Dimension legend (docs/dimensions.md): B rows, T positions, W a chunk (window) of
positions, R rows of a flattened [B * W] chunk, D model, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.transformer import Params, hidden_states, lm_head, positions_from_mask

DEFAULT_CHUNK = 256


# Rows of logits per block inside a chunk: a block's float32 logits take about
# 16 MiB (2**22 entries), within the clamps below; see `_chunk_stats`.
_BLOCK_ENTRIES = 2**22
_MIN_BLOCK_ROWS, _MAX_BLOCK_ROWS = 128, 1024


def _row_block(n_rows: int, vocab: int) -> int:
    """Rows per block: ~_BLOCK_ENTRIES logits, clamped, and no more than there are rows."""
    return min(n_rows, max(_MIN_BLOCK_ROWS, min(_MAX_BLOCK_ROWS, _BLOCK_ENTRIES // vocab)))


def _block_stats(h_RD, head_DV, targets_R, temperature: float, with_entropy: bool):
    """One block of rows: (logp, entropy) and what the gradient needs (tempered logits, lse, E[z])."""
    z_RV = jnp.dot(h_RD, head_DV, preferred_element_type=jnp.float32)
    if temperature != 1.0:
        z_RV = z_RV / temperature
    # One shift by the row max, then sibling sums over the same exponentials.
    shift = jnp.max(z_RV, axis=-1, keepdims=True)
    exp_RV = jnp.exp(z_RV - shift)
    total = jnp.sum(exp_RV, axis=-1)
    lse = shift[:, 0] + jnp.log(total)
    # A masked sum instead of a gather: elementwise, so it stays local when the
    # vocabulary axis is sharded over devices.
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, z_RV.shape, 1)
    target = jnp.sum(jnp.where(vocab_ids == targets_R[:, None], z_RV, 0.0), axis=-1)
    if not with_entropy:
        zeros = jnp.zeros_like(lse)
        return (target - lse, zeros), (z_RV, lse, zeros)
    mean_z = jnp.sum(exp_RV * z_RV, axis=-1) / total
    return (target - lse, lse - mean_z), (z_RV, lse, mean_z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _rows_stats(h_RD, head_DV, targets_R, temperature: float, with_entropy: bool, rows: int):
    return _rows_stats_fwd(h_RD, head_DV, targets_R, temperature, with_entropy, rows)[0]


def _rows_stats_fwd(h_RD, head_DV, targets_R, temperature, with_entropy, rows):
    R, D = h_RD.shape

    def block(_, x):
        h, targets = x  # one block: [rows, D], [rows]
        return None, _block_stats(h, head_DV, targets, temperature, with_entropy)

    xs = (h_RD.reshape(R // rows, rows, D), targets_R.reshape(R // rows, rows))
    _, ((logp, entropy), (z_blocks, lse, mean_z)) = jax.lax.scan(block, None, xs)
    return (logp.reshape(R), entropy.reshape(R)), (h_RD, head_DV, targets_R, z_blocks, lse, mean_z)


def _rows_stats_bwd(temperature, with_entropy, rows, residuals, cotangents):
    """d logits = g_logp (onehot - p) - g_entropy p (z - E[z]), then the two matmuls, block by block."""
    h_RD, head_DV, targets_R, z_blocks, lse, mean_z = residuals
    R, D = h_RD.shape
    g_logp, g_entropy = (g.reshape(R // rows, rows) for g in cotangents)

    def block(d_head, x):
        h, targets, z, lse, mean_z, g_logp, g_entropy = x
        p = jnp.exp(z - lse[:, None])
        vocab_ids = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
        d_z = jnp.where(vocab_ids == targets[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
        if with_entropy:
            d_z = d_z - g_entropy[:, None] * p * (z - mean_z[:, None])
        if temperature != 1.0:
            d_z = d_z / temperature
        d_h = jnp.dot(d_z, head_DV.T, preferred_element_type=jnp.float32).astype(h.dtype)
        return d_head + jnp.dot(h.T, d_z, preferred_element_type=jnp.float32), d_h

    xs = (h_RD.reshape(R // rows, rows, D), targets_R.reshape(R // rows, rows), z_blocks, lse, mean_z,
          g_logp, g_entropy)
    d_head, d_h = jax.lax.scan(block, jnp.zeros(head_DV.shape, jnp.float32), xs)
    return d_h.reshape(R, D), d_head.astype(head_DV.dtype), None


_rows_stats.defvjp(_rows_stats_fwd, _rows_stats_bwd)


def _chunk_stats(
    hidden_BWD: Float[Array, "B W D"],
    head_DV: Float[Array, "D V"],
    targets_BW: Int[Array, "B W"],
    temperature: float,
    with_entropy: bool,
) -> tuple[Float[Array, "B W"], Float[Array, "B W"]]:
    """Log-prob of the target and entropy for one chunk, from float32 logits.

    The B*W rows run through the output projection in blocks of `_row_block`
    rows (2-D matmuls: the 3-D einsum's backward transposed the [B, W, V]
    gradient, a third of the step on CPU), and the gradient is written by hand:
    the forward keeps each block's logits, the backward turns them into the
    logits' gradient one block at a time and multiplies it out. Autodiff of
    the same expressions kept three [B*W, V] float32 arrays alive (logits,
    their exponentials, the masked target pick) and wrote the gradient as a
    fourth; here one is kept and the rest live one cache-sized block at a
    time, which took ~10% off a CPU update step at vocabulary 8192 (fewer
    fresh pages to fault in and fewer passes over memory). Same values, same
    matmul count.
    """
    B, W, D = hidden_BWD.shape
    R = B * W
    rows = _row_block(R, head_DV.shape[1])
    pad = -R % rows
    h_RD = jnp.pad(hidden_BWD.reshape(R, D), ((0, pad), (0, 0)))
    targets_R = jnp.pad(targets_BW.reshape(R), (0, pad))
    logp, entropy = _rows_stats(h_RD, head_DV.astype(hidden_BWD.dtype), targets_R, temperature,
                                with_entropy, rows)
    return logp[:R].reshape(B, W), entropy[:R].reshape(B, W)


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
    W = chunk_size
    n_chunks = -(-T // W)
    pad = n_chunks * W - T
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [B, T, D] -> [n, B, W, D]: the scan runs over the leading axis, and the
    # batch axis stays second so its sharding over devices is undisturbed.
    hidden_nBWD = hidden.reshape(B, n_chunks, W, D).swapaxes(0, 1)
    targets_nBW = targets.reshape(B, n_chunks, W).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(head, x):
        h_BWD, t_BW = x
        return head, _chunk_stats(h_BWD, head, t_BW, temperature, with_entropy)

    _, (logp_nBW, entropy_nBW) = jax.lax.scan(one_chunk, head_DV, (hidden_nBWD, targets_nBW))
    logp = logp_nBW.swapaxes(0, 1).reshape(B, n_chunks * W)[:, :T]
    if not with_entropy:
        return logp, None
    entropy = entropy_nBW.swapaxes(0, 1).reshape(B, n_chunks * W)[:, :T]
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
