"""Jit-compiled KV-cache sampler for group rollouts.

`generate` takes prompts (token-id lists, or a padded array with a mask), packs
them left-padded into a shape bucket, and runs one compiled program:

1. prefill: the B prompts go through the model once, filling a KV cache of P
   slots (P the prompt bucket) and giving the logits of the first new token;
2. group copy: the cache and those logits are repeated G = num_samples times,
   prompt-major (row i*G + j is sample j of prompt i), so a group shares one
   prefill;
3. decode: a `lax.while_loop` feeds one token per row per step into a cache of
   P + max_new_tokens slots and stops as soon as every row has emitted a stop
   token (or max_new_tokens is reached).

Pads are invisible: positions count only real tokens (cumsum of the mask, as in
`forward_padded`) and the key mask hides pad slots, so a prompt's completion
does not depend on the batch it is in. Each row draws from its own key
(`fold_in(rng, row)`, then the step), so neither batch padding nor the mesh
changes what a row samples.

Dimension legend (docs/dimensions.md): B prompts, G samples per prompt,
R = B*G rows, P prompt slots (bucketed), C new (completion) tokens,
S = P + C cache slots, V vocab, L layers, K kv heads, H head dim.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.multihost_utils import process_allgather
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, Bool, Float, Int

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.transformer import (
    KVCache,
    Params,
    hidden_states,
    init_cache,
    logits_from_hidden,
    positions_from_mask,
    unstack_cache,
    unstack_layers,
)
from ouroboros_jax.sharding import ACTIVATION_AXES, batch_shards, check_divisible, logical_to_spec

# The SamplingConfig default: a training run compiles once per bucket it meets.
DEFAULT_PROMPT_LEN_BUCKETS: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
PAD_ID = 0  # written after a row has stopped and into prompt padding; the masks say what is real


class SampleOutput(NamedTuple):
    """Completions of `generate`, as host (numpy) arrays; R = prompts * num_samples rows.

    Row i*num_samples + j is sample j of prompt i. Completion column n holds the
    n-th new token; a row's tokens are columns [0, lengths[row]), the rest PAD_ID.

    Attributes:
      tokens: [R, C] int32 new tokens; a stop token, when hit, is included.
      mask: [R, C] bool, True on the `lengths` real completion tokens.
      logprobs: [R, C] float32, log-probability of each token under the
        distribution it was drawn from: softmax(logits / temperature) restricted
        to the top-k / top-p kept set and renormalised. 0 for greedy (a point
        mass); 0 where mask is False.
      policy_logprobs: [R, C] float32, log_softmax(logits / tau)[token] with tau
        the temperature (1 for greedy), no top-k / top-p truncation: what the
        training forward computes with its logits divided by the same temperature
        (the "old policy" of an importance ratio). Equals `logprobs` when top_k=0,
        top_p=1 and temperature > 0. 0 where mask is False.
      lengths: [R] int32 completion lengths (stop token included).
      truncated: [R] bool, True when the row hit max_new_tokens without a stop token.
      prompt_tokens: [R, P] int32 prompts as fed, left-padded to the bucket P
        and repeated per sample, so `sequences()` is the training batch.
      prompt_mask: [R, P] bool, True on real prompt tokens.
      steps: model forward passes run (prefill included); below C when every
        row stopped early.
    """

    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
    policy_logprobs: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray
    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    steps: int

    def sequences(self) -> tuple[np.ndarray, np.ndarray]:
        """Prompt and completion side by side: tokens and mask [R, P + C].

        `forward_padded(params, cfg, *sequences())` at column P - 1 + n gives
        the logits that predicted completion token n.
        """
        tokens = np.concatenate([self.prompt_tokens, self.tokens], axis=1)
        return tokens, np.concatenate([self.prompt_mask, self.mask], axis=1)


# ---------------------------------------------------------------------------
# Buckets and prompt packing (host side)


def bucket_size(n: int, buckets: Sequence[int] | None, multiple: int = 1) -> int:
    """The padded size for `n`: the smallest bucket >= n, rounded up to `multiple`.

    Args:
      n: the real size (prompt length or number of prompts).
      buckets: increasing sizes; None means powers of two. Beyond the largest
        bucket, sizes grow in steps of the largest, so the count stays bounded
        by the longest input a run meets.
      multiple: e.g. the number of batch shards of the mesh.
    Returns:
      The bucketed size (>= n, >= 1, divisible by `multiple`).
    """
    n = max(int(n), 1)
    if buckets is None:
        size = 1 << (n - 1).bit_length()
    else:
        fits = [b for b in buckets if b >= n]
        size = fits[0] if fits else -(-n // buckets[-1]) * buckets[-1]
    return -(-size // multiple) * multiple


def pack_prompts(
    prompt_tokens: Sequence[Sequence[int]] | np.ndarray, prompt_mask: np.ndarray | None = None
) -> tuple[Int[np.ndarray, "B T"], Bool[np.ndarray, "B T"]]:
    """Prompts as a left-padded (tokens, mask) pair with T the longest prompt.

    Args:
      prompt_tokens: a list of token-id lists, or an int array [B, T0].
      prompt_mask: with an array, the bool mask [B, T0] of real tokens, in any
        layout (left, right or interleaved padding); None means all real.
    Returns:
      tokens [B, T] int32 (pads are PAD_ID) and mask [B, T] bool, each row's
      real tokens in their original order, flush right.
    """
    if prompt_mask is None and not isinstance(prompt_tokens, np.ndarray | jax.Array):
        rows = [np.asarray(p, np.int32).reshape(-1) for p in prompt_tokens]
        width = max((len(r) for r in rows), default=0)
        tokens = np.full((len(rows), max(width, 1)), PAD_ID, np.int32)
        mask = np.zeros(tokens.shape, bool)
        for i, r in enumerate(rows):
            tokens[i, tokens.shape[1] - len(r):] = r
            mask[i, tokens.shape[1] - len(r):] = True
    else:
        tokens = np.asarray(prompt_tokens, np.int32)
        mask = np.ones(tokens.shape, bool) if prompt_mask is None else np.asarray(prompt_mask, bool)
        if tokens.ndim != 2 or mask.shape != tokens.shape:
            raise ValueError(f"prompt_tokens {tokens.shape} and prompt_mask {mask.shape} must be "
                             "equal 2-D shapes [batch, length]")
        order = np.argsort(mask, axis=1, kind="stable")  # pads first, real tokens kept in order
        tokens = np.where(np.take_along_axis(mask, order, 1), np.take_along_axis(tokens, order, 1), PAD_ID)
        mask = np.take_along_axis(mask, order, 1)
    if len(tokens) == 0:
        raise ValueError("prompt_tokens: no prompts given")
    empty = np.flatnonzero(~mask.any(axis=1))
    if len(empty):
        raise ValueError(f"prompt_tokens: prompt {int(empty[0])} is empty; every prompt needs a token")
    return tokens, mask


def _pad_to_bucket(tokens, mask, batch: int, length: int):
    """Left-pad to `length` columns; extra rows are one-token dummies (never live)."""
    B, T = tokens.shape
    out_t = np.full((batch, length), PAD_ID, np.int32)
    out_m = np.zeros((batch, length), bool)
    out_t[:B, length - T:] = tokens
    out_m[:B, length - T:] = mask
    out_m[B:, -1] = True  # a dummy row needs one real key, or its attention has nothing to read
    return out_t, out_m


# ---------------------------------------------------------------------------
# Choosing tokens from logits (inside jit)

DRAW_BLOCK = 256  # vocabulary block of the two-level inverse-CDF draw


def _first_above(cum: Float[Array, "R M"], weights: Float[Array, "R M"], target: Float[Array, " R"]):
    """First index whose running sum passes `target` and that has weight.

    Where float rounding leaves no such index (u * total rounded up to the
    total), the last index with weight: never one of probability zero.
    """
    has_weight = weights > 0
    above = (cum > target[:, None]) & has_weight
    last = cum.shape[-1] - 1 - jnp.argmax(has_weight[:, ::-1], axis=-1)
    return jnp.where(above.any(axis=-1), jnp.argmax(above, axis=-1), last)


def draw_inverse_cdf(logits: Float[Array, "R V"], u: Float[Array, " R"], block: int = DRAW_BLOCK
                     ) -> Int[Array, " R"]:
    """Sample from softmax(logits) by inverting the CDF at u ~ uniform[0, 1).

    One uniform per row instead of a Gumbel variate per vocabulary entry (the
    per-entry random bits and two logs cost more than the rest of a small
    model's decode step). Two levels, block sums then the chosen block, keep the
    work to one pass over V with short running sums.

    Args:
      logits: unnormalised log-probabilities; -inf marks a dropped token.
      u: one uniform number in [0, 1) per row.
      block: entries per block.
    Returns:
      token indices [R], never of a -inf entry.
    """
    R, V = logits.shape
    nb = -(-V // block)
    w = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    w = jnp.pad(w, ((0, 0), (0, nb * block - V))).reshape(R, nb, block)
    sums = w.sum(axis=-1)
    csum = jnp.cumsum(sums, axis=-1)
    target = u * csum[:, -1]
    b = _first_above(csum, sums, target)
    inner = jnp.take_along_axis(w, b[:, None, None], axis=1)[:, 0]
    before = jnp.where(b > 0, jnp.take_along_axis(csum, jnp.maximum(b - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    i = _first_above(before[:, None] + jnp.cumsum(inner, axis=-1), inner, target)
    return (b * block + i).astype(jnp.int32)


def choose_tokens(
    logits: Float[Array, "R V"],
    keys: Any,
    temperature: Float[Array, ""],
    top_p: Float[Array, ""],
    *,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
) -> tuple[Int[Array, " R"], Float[Array, " R"], Float[Array, " R"]]:
    """Draw one token per row; the order is temperature, then top-k, then top-p.

    Top-p keeps, after top-k, the most probable tokens whose probability mass
    *before* them is below `top_p` (so the most probable token always stays).

    Args:
      logits: float32 logits of the next token.
      keys: one PRNG key per row, [R].
      temperature: > 0 (unused when greedy).
      top_p: nucleus mass in (0, 1] (used when `use_top_p`).
      greedy: take the argmax (ties: the lowest id).
      top_k: keep the k most probable tokens; 0 keeps all.
      use_top_p: apply the nucleus cut (static, so top_p == 1 skips the sort).
    Returns:
      tokens [R], their log-probs under the sampling distribution (0 for greedy)
      and under softmax(logits / tau), tau = temperature (1 for greedy).
    """
    if greedy:
        tokens = jnp.argmax(logits, axis=-1)
        policy = jax.nn.log_softmax(logits, axis=-1)
        policy_lp = jnp.take_along_axis(policy, tokens[:, None], axis=-1)[:, 0]
        return tokens.astype(jnp.int32), jnp.zeros_like(policy_lp), policy_lp
    scaled = logits / temperature
    policy = jax.nn.log_softmax(scaled, axis=-1)
    u = jax.vmap(jax.random.uniform)(keys)
    V = logits.shape[-1]
    k = min(top_k, V) if top_k else V
    if k == V and not use_top_p:
        tokens = draw_inverse_cdf(scaled, u)
        policy_lp = jnp.take_along_axis(policy, tokens[:, None], axis=-1)[:, 0]
        return tokens.astype(jnp.int32), policy_lp, policy_lp
    # Work in the sorted top-k space: the truncation is a prefix there, and the draw
    # maps back through the indices without a scatter over the vocabulary.
    vals, idx = jax.lax.top_k(scaled, k)
    if use_top_p:
        probs = jax.nn.softmax(vals, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        vals = jnp.where(mass_before < top_p, vals, -jnp.inf)
    choice = draw_inverse_cdf(vals, u)
    tokens = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    kept_lp = jnp.take_along_axis(jax.nn.log_softmax(vals, axis=-1), choice[:, None], axis=-1)[:, 0]
    policy_lp = jnp.take_along_axis(policy, tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), kept_lp, policy_lp


# ---------------------------------------------------------------------------
# The compiled program


class _Static(NamedTuple):
    """Everything that fixes the compiled program besides the config and shapes."""

    max_new_tokens: int
    num_samples: int
    greedy: bool
    top_k: int
    use_top_p: bool
    mesh: Mesh | None
    unroll_layers: bool = False


class _State(NamedTuple):
    """The decode loop's carry; `step` is the next completion column to fill."""

    step: Int[Array, ""]
    cache: KVCache
    last: Int[Array, " R"]
    done: Bool[Array, " R"]
    stopped: Bool[Array, " R"]
    lengths: Int[Array, " R"]
    tokens: Int[Array, "R C"]
    logprobs: Float[Array, "R C"]
    policy_logprobs: Float[Array, "R C"]


def _constrain(x, logical: tuple[str | None, ...], mesh: Mesh | None):
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical)))


def _constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    axes = ACTIVATION_AXES["kv_cache_LBKSH"]
    if isinstance(cache.k, tuple):  # one [B, K, S, H] array per layer
        return KVCache(*(tuple(_constrain(c, axes[1:], mesh) for c in cs) for cs in cache))
    return KVCache(_constrain(cache.k, axes, mesh), _constrain(cache.v, axes, mesh))


def _prefill(params: Params, cfg: ModelConfig, tokens_BP, mask_BP, static: _Static):
    """Run the prompts once; return next-token logits [R, V] and the group cache [L, R, K, S, H]."""
    B, P = tokens_BP.shape
    G, C = static.num_samples, static.max_new_tokens
    positions = positions_from_mask(mask_BP)
    cache = init_cache(cfg, B, P)
    if static.unroll_layers:
        cache = unstack_cache(cache)
    cache = _constrain_cache(cache, static.mesh)
    hidden, cache = hidden_states(params, cfg, tokens_BP, positions, mask_BP, cache, 0)
    # Prompts are flush right, so every row's next token is predicted at column P - 1.
    logits_BV = logits_from_hidden(params, cfg, hidden[:, -1:])[:, 0]

    def grow(x):  # [(L,) B, K, P, H] -> [(L,) R, K, P + C, H], rows prompt-major
        lead = x.ndim - 4
        pad = [(0, 0)] * x.ndim
        pad[lead + 2] = (0, C)
        return jnp.pad(jnp.repeat(x, G, axis=lead), pad)

    cache = KVCache(*(tuple(map(grow, c)) if isinstance(c, tuple) else grow(c) for c in cache))
    return jnp.repeat(logits_BV, G, axis=0), _constrain_cache(cache, static.mesh)


def _emit(state: _State, logits, n, row_keys, knobs, static: _Static) -> _State:
    """Choose token n for every row and record it where the row is still live."""
    temperature, top_p, stop_V = knobs
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, n)
    tok, lp, policy_lp = choose_tokens(logits, keys, temperature, top_p, greedy=static.greedy,
                                       top_k=static.top_k, use_top_p=static.use_top_p)
    live = ~state.done
    hit = stop_V[tok] & live

    def put(buf, value, fill):
        col = jnp.where(live, value, fill).astype(buf.dtype)[:, None]
        return _constrain(jax.lax.dynamic_update_slice_in_dim(buf, col, n, axis=1), ("batch", None),
                          static.mesh)

    return state._replace(
        last=tok, done=state.done | hit, stopped=state.stopped | hit,
        lengths=state.lengths + live.astype(jnp.int32),
        tokens=put(state.tokens, tok, PAD_ID), logprobs=put(state.logprobs, lp, 0.0),
        policy_logprobs=put(state.policy_logprobs, policy_lp, 0.0))


@functools.partial(jax.jit, static_argnames=("cfg", "static"))
def _sample_bucket(params: Params, cfg: ModelConfig, tokens_BP, mask_BP, live_B, knobs, rng,
                   *, static: _Static) -> dict[str, Array]:
    """Prefill, copy per sample, decode until all rows stop. One program per bucket and knobs.

    `knobs` = (temperature, top_p, stop_V) are run-time values: changing them never recompiles.
    """
    B, P = tokens_BP.shape
    G, C = static.num_samples, static.max_new_tokens
    R = B * G
    if static.unroll_layers:
        params = unstack_layers(params, cfg)  # once, outside the decode loop
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(R))
    logits, cache = _prefill(params, cfg, tokens_BP, mask_BP, static)
    kv_mask = jnp.concatenate([jnp.repeat(mask_BP, G, axis=0), jnp.ones((R, C), bool)], axis=1)
    kv_mask = _constrain(kv_mask, ("batch", None), static.mesh)
    start = jnp.repeat(jnp.sum(mask_BP, axis=1), G)  # position of completion token 0
    zeros = lambda dt: _constrain(jnp.zeros((R, C), dt), ("batch", None), static.mesh)
    state = _State(
        step=jnp.asarray(1), cache=cache, last=jnp.zeros((R,), jnp.int32),
        done=~jnp.repeat(live_B, G), stopped=jnp.zeros((R,), bool), lengths=jnp.zeros((R,), jnp.int32),
        tokens=zeros(jnp.int32), logprobs=zeros(jnp.float32), policy_logprobs=zeros(jnp.float32))
    state = _emit(state, logits, 0, row_keys, knobs, static)

    def cond(s: _State):
        return (s.step < C) & ~jnp.all(s.done)

    def body(s: _State) -> _State:
        n = s.step  # feed token n - 1 at slot P + n - 1, read the logits of token n
        hidden, cache = hidden_states(params, cfg, s.last[:, None], (start + n - 1)[:, None], kv_mask,
                                      s.cache, P + n - 1)
        logits = logits_from_hidden(params, cfg, hidden)[:, 0]
        s = s._replace(cache=_constrain_cache(cache, static.mesh), step=n + 1)
        return _emit(s, logits, n, row_keys, knobs, static)

    state = jax.lax.while_loop(cond, body, state)
    return dict(tokens=state.tokens, logprobs=state.logprobs, policy_logprobs=state.policy_logprobs,
                lengths=state.lengths, truncated=~state.stopped, steps=state.step)


# ---------------------------------------------------------------------------
# Public entry point


LAYER_LOOPS = ("auto", "scan", "unroll")


# "auto" unrolls the layers on CPU from this many cache slots on (see `generate`).
UNROLL_MIN_CACHE_SLOTS = 512


def _unroll_layers(layer_loop: str, mesh: Mesh | None, cache_slots: int) -> bool:
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"layer_loop: must be one of {LAYER_LOOPS} (got {layer_loop!r})")
    if layer_loop == "auto":
        platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        if platform in ("gpu", "cuda", "rocm"):
            return True  # H200, 1.5B model: 1.75-1.8x the scan's decode speed (BENCHMARKS.md)
        return platform == "cpu" and cache_slots >= UNROLL_MIN_CACHE_SLOTS
    return layer_loop == "unroll"


def program_settings(
    cfg: ModelConfig, mesh: Mesh | None, *, max_new_tokens: int, num_samples: int, temperature: float,
    top_p: float, top_k: int, stop_token_ids: Sequence[int], rng: jax.Array, cache_slots: int,
    layer_loop: str = "auto",
) -> tuple[_Static, tuple[np.ndarray, np.ndarray, np.ndarray], jax.Array]:
    """The sampler program's static settings, its traced knobs (temperature, top-p, stop-token
    mask) and a typed PRNG key, as `generate` (and `multihost.generate_rows`) pass them."""
    greedy = temperature == 0  # top-k / top-p do not change an argmax: keep one greedy program
    static = _Static(max_new_tokens, num_samples, greedy, 0 if greedy else int(top_k),
                     top_p < 1 and not greedy, mesh, _unroll_layers(layer_loop, mesh, cache_slots))
    stop_V = np.zeros(cfg.vocab_size, bool)
    stop_V[list(stop_token_ids)] = True
    knobs = (np.float32(temperature or 1.0), np.float32(top_p), stop_V)
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):  # a legacy uint32 key
        rng = jax.random.wrap_key_data(rng)
    return static, knobs, rng


def check_cache_fits(cfg: ModelConfig, mesh: Mesh, *, rows: int, cache_slots: int) -> None:
    """Raise (naming the axis) when the KV cache of `rows` rows cannot be split over `mesh`."""
    cache_shape = (cfg.n_layers, rows, cfg.n_kv_heads, cache_slots, cfg.head_dim)
    cache_axes = ACTIVATION_AXES["kv_cache_LBKSH"]
    check_divisible("kv_cache", cache_shape, logical_to_spec(cache_axes), mesh, cache_axes)


def _check_args(cfg: ModelConfig, max_new_tokens, num_samples, temperature, top_p, top_k, stop_token_ids):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1 (got {max_new_tokens})")
    if num_samples < 1:
        raise ValueError(f"num_samples: must be >= 1 (got {num_samples})")
    if not temperature >= 0:
        raise ValueError(f"temperature: must be >= 0, 0 meaning greedy (got {temperature})")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1] (got {top_p})")
    if top_k < 0:
        raise ValueError(f"top_k: must be >= 0, 0 meaning off (got {top_k})")
    bad = [t for t in stop_token_ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids: {bad} outside the vocabulary [0, {cfg.vocab_size})")


def generate(
    params: Params,
    model_config: ModelConfig,
    prompt_tokens: Sequence[Sequence[int]] | np.ndarray,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Sequence[int] = (),
    rng: jax.Array,
    prompt_mask: np.ndarray | None = None,
    mesh: Mesh | None = None,
    prompt_len_buckets: Sequence[int] | None = DEFAULT_PROMPT_LEN_BUCKETS,
    batch_buckets: Sequence[int] | None = None,
    layer_loop: str = "auto",
) -> SampleOutput:
    """Sample `num_samples` completions for each prompt with a KV cache.

    Bucketing: the prompt length is padded up to a bucket of
    `prompt_len_buckets`, the number of prompts to a bucket of `batch_buckets`
    (None: the next power of two), both rounded up to the mesh's batch shards.
    One program is compiled per (prompt bucket, batch bucket, max_new_tokens,
    num_samples, greedy, top_k, top_p < 1, mesh, model config); temperature,
    top_p and stop_token_ids are run-time values and never recompile.

    Args:
      params: model parameters (sharded under `sharding.RULES` when `mesh` is given).
      model_config: the model architecture.
      prompt_tokens: a list of token-id lists (unpadded), or an int array [B, T]
        with `prompt_mask`.
      max_new_tokens: completion length limit C.
      num_samples: G samples per prompt; rows are prompt-major.
      temperature: softmax temperature; 0 means greedy (top_k, top_p ignored).
      top_p: nucleus mass, 1 is off. top_k: 0 is off.
      stop_token_ids: tokens that end a row (the stop token is kept in it).
      rng: a PRNG key; row r draws from fold_in(rng, r), so results do not depend
        on the batch bucket or the mesh.
      prompt_mask: bool [B, T] marking real tokens of an array `prompt_tokens`.
      mesh: shard rows over (data, fsdp) and the KV cache's heads over tensor.
      prompt_len_buckets, batch_buckets: the bucketing policy above.
      layer_loop: how the program runs the layers: "scan" (one compiled layer
        body, the shortest compile), "unroll" (one piece per layer, each reading
        its own weight and cache arrays) or "auto" (unroll on GPU, and on CPU from
        UNROLL_MIN_CACHE_SLOTS cache slots on; scan otherwise, TPU included). On CPU a scanned
        decode step copies each layer's cache out of the stacked array, which
        dominates at long contexts: for a 4-layer, 16-row model the unrolled
        loop decoded 1056 slots at 20 ms/step against 27 for the scan, while
        at 96-288 slots the scan was the faster one (6 vs 8 ms/step). On an
        H200 (1.5B model, 1290 slots) the unrolled loop decoded 1.75-1.8x as
        fast as the scan at batch 64 and 256. Same tokens either way.
    Returns:
      A `SampleOutput` of host arrays with B * num_samples rows.
    """
    cfg = model_config
    _check_args(cfg, max_new_tokens, num_samples, temperature, top_p, top_k, stop_token_ids)
    tokens, mask = pack_prompts(prompt_tokens, prompt_mask)
    (B, T), G, C = tokens.shape, num_samples, max_new_tokens
    if T + C > cfg.max_seq_len:
        raise ValueError(f"longest prompt ({T}) + max_new_tokens ({C}) exceeds the model's "
                         f"max_seq_len ({cfg.max_seq_len})")
    shards = batch_shards(mesh)
    P = bucket_size(T, prompt_len_buckets)
    B_pad = bucket_size(B, batch_buckets, multiple=shards)
    tokens_p, mask_p = _pad_to_bucket(tokens, mask, B_pad, P)
    static, knobs, rng = program_settings(cfg, mesh, max_new_tokens=C, num_samples=G, temperature=temperature,
                                          top_p=top_p, top_k=top_k, stop_token_ids=stop_token_ids, rng=rng,
                                          cache_slots=P + C, layer_loop=layer_loop)
    inputs = (tokens_p, mask_p, np.arange(B_pad) < B)
    if mesh is not None:
        check_cache_fits(cfg, mesh, rows=B_pad * G, cache_slots=P + C)
        rows = NamedSharding(mesh, logical_to_spec(("batch", None)))
        inputs = (jax.device_put(tokens_p, rows), jax.device_put(mask_p, rows),
                  jax.device_put(inputs[2], NamedSharding(mesh, logical_to_spec(("batch",)))))
    out = _sample_bucket(params, cfg, *inputs, knobs, rng, static=static)
    # Over several processes (hosts), each gets every row: the prompts were the same on all of them.
    out = jax.device_get(out) if out["tokens"].is_fully_addressable else process_allgather(out, tiled=True)
    R = B * G
    lengths = out["lengths"][:R]
    return SampleOutput(
        tokens=out["tokens"][:R], mask=np.arange(C)[None, :] < lengths[:, None],
        logprobs=out["logprobs"][:R], policy_logprobs=out["policy_logprobs"][:R], lengths=lengths,
        truncated=out["truncated"][:R], prompt_tokens=np.repeat(tokens_p[:B], G, axis=0),
        prompt_mask=np.repeat(mask_p[:B], G, axis=0), steps=int(out["steps"]))


def compiled_programs() -> int:
    """How many sampler programs are compiled so far (one per bucket and static knobs)."""
    return _sample_bucket._cache_size()
