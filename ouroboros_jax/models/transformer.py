"""Pure functional decoder LM for the Llama 3, Qwen2/2.5 and Qwen3 families.

Parameters are a plain dict of arrays; the forward pass is a function of
(params, config, tokens, positions, key mask, optional KV cache). Layers are
stacked along a leading L axis and run with `lax.scan`, so a model compiles
one layer body whatever its depth.

Dimension legend (docs/dimensions.md; used in names and einsum strings):
    B batch, T query time, S key time (cache slots), V vocab, D model,
    N query heads, K key/value heads, Q query heads per kv head, H head dim,
    F mlp hidden, L layers.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.sharding import Logical, logical_shardings

Params = dict[str, Any]

# Logical axis names of every parameter, by parameter name (layer params carry
# the leading "layers" axis). sharding.py maps these names onto the mesh.
LAYER_AXES: dict[str, tuple[str | None, ...]] = {
    "attn_norm_LD": ("layers", "norm"),
    "q_LDNH": ("layers", "embed", "heads", "head_dim"),
    "k_LDKH": ("layers", "embed", "kv_heads", "head_dim"),
    "v_LDKH": ("layers", "embed", "kv_heads", "head_dim"),
    "o_LNHD": ("layers", "heads", "head_dim", "embed"),
    "q_bias_LNH": ("layers", "heads", "head_dim"),
    "k_bias_LKH": ("layers", "kv_heads", "head_dim"),
    "v_bias_LKH": ("layers", "kv_heads", "head_dim"),
    "o_bias_LD": ("layers", "norm"),
    "q_norm_LH": ("layers", "head_dim"),
    "k_norm_LH": ("layers", "head_dim"),
    "mlp_norm_LD": ("layers", "norm"),
    "gate_LDF": ("layers", "embed", "mlp"),
    "up_LDF": ("layers", "embed", "mlp"),
    "down_LFD": ("layers", "mlp", "embed"),
}
TOP_AXES: dict[str, tuple[str | None, ...]] = {
    "embed_VD": ("vocab", "embed"),
    "final_norm_D": ("norm",),
    "lm_head_DV": ("embed", "vocab"),
    "score_D": ("norm",),
}


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype({"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name])


def param_shapes(cfg: ModelConfig, *, head: str = "lm") -> Params:
    """Shapes of every parameter, as the same nested dict as the params.

    `head` is "lm" for a language model and "score" for a reward model.
    """
    L, D, N, K, H, F, V = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads,
                           cfg.head_dim, cfg.d_ff, cfg.vocab_size)
    layers = {
        "attn_norm_LD": (L, D), "q_LDNH": (L, D, N, H), "k_LDKH": (L, D, K, H),
        "v_LDKH": (L, D, K, H), "o_LNHD": (L, N, H, D), "mlp_norm_LD": (L, D),
        "gate_LDF": (L, D, F), "up_LDF": (L, D, F), "down_LFD": (L, F, D),
    }
    if cfg.qkv_bias:
        layers |= {"q_bias_LNH": (L, N, H), "k_bias_LKH": (L, K, H), "v_bias_LKH": (L, K, H)}
    if cfg.o_bias:
        layers["o_bias_LD"] = (L, D)
    if cfg.qk_norm:
        layers |= {"q_norm_LH": (L, H), "k_norm_LH": (L, H)}
    shapes: Params = {"embed_VD": (V, D), "final_norm_D": (D,), "layers": layers}
    if head == "score":
        shapes["score_D"] = (D,)
    elif not cfg.tie_embeddings:
        shapes["lm_head_DV"] = (D, V)
    return shapes


def param_logical_axes(cfg: ModelConfig, *, head: str = "lm") -> Params:
    """Logical axis names for every parameter (same tree as the params)."""
    shapes = param_shapes(cfg, head=head)
    out: Params = {k: TOP_AXES[k] for k in shapes if k != "layers"}
    out["layers"] = {k: LAYER_AXES[k] for k in shapes["layers"]}
    return out


def param_specs(cfg: ModelConfig, *, head: str = "lm") -> Params:
    """Every parameter as a `sharding.Logical` (shape and logical axes): what shardings are made from."""
    is_shape = lambda x: isinstance(x, tuple)
    return jax.tree.map(lambda shape, axes: Logical(tuple(shape), tuple(axes)), param_shapes(cfg, head=head),
                        param_logical_axes(cfg, head=head), is_leaf=is_shape)


def param_shardings(cfg: ModelConfig, mesh: Mesh, *, head: str = "lm") -> Params:
    """Shardings of every parameter under the rules table (`sharding.RULES`)."""
    return logical_shardings(param_specs(cfg, head=head), mesh)


def init_sharded(cfg: ModelConfig, rng: jax.Array, mesh: Mesh | None, *, head: str = "lm") -> Params:
    """Random parameters (`init_params`) created directly in their shardings (no gather on one device)."""
    fn = lambda key: init_params(cfg, key, head=head)
    if mesh is None:
        return jax.jit(fn)(rng)
    return jax.jit(fn, out_shardings=param_shardings(cfg, mesh, head=head))(rng)


def init_params(cfg: ModelConfig, rng: jax.Array, *, head: str = "lm") -> Params:
    """Random parameters: normal(0, 0.02) matrices, unit norms, zero biases.

    Call it under `jax.jit(..., out_shardings=...)` to create the params sharded
    (see `init_sharded`).
    """
    shapes = param_shapes(cfg, head=head)
    dtype = dtype_of(cfg.dtype)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(rng, len(flat))
    leaves = []
    for (path, shape), key in zip(flat, keys, strict=True):
        name = path[-1].key
        if "norm" in name:
            leaves.append(jnp.ones(shape, dtype))
        elif "bias" in name:
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append((0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ---------------------------------------------------------------------------
# Building blocks


def rms_norm(x: Float[Array, "... D"], scale: Float[Array, " D"], eps: float) -> Float[Array, "... D"]:
    """RMSNorm computed in float32, cast back before the scale (as Hugging Face does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies [H/2], with linear or Llama 3 scaling applied."""
    H = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x: Float[Array, "B T N H"], positions: Int[Array, "B T"],
               inv_freq: np.ndarray) -> Float[Array, "B T N H"]:
    """Rotate halves of the head dimension (the Hugging Face "rotate_half" layout)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # B T H/2
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class KVCache(NamedTuple):
    """Keys and values for every layer: [L, B, K, S, H].

    Heads come before slots so that a layer's [B, K, S, H] block is already in
    the layout of the attention's batched matmuls (batch dims B, K leading, the
    slots and head dim contiguous): a decode step reads the cache once instead
    of first copying it into that layout. `unstack_cache` gives the unstacked
    form: k and v as tuples of L arrays [B, K, S, H].
    """

    k: Float[Array, "L B K S H"]
    v: Float[Array, "L B K S H"]


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty cache of `length` slots, in the compute dtype."""
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_dim)
    dtype = dtype_of(cfg.compute_dtype)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))  # two buffers, so both can be donated


def _attention(q_BTNH, k_BKSH, v_BKSH, allowed_BTS, cfg: ModelConfig):
    """Softmax attention of queries [B, T, N, H] over keys and values [B, K, S, H]."""
    B, T, N, H = q_BTNH.shape
    q = q_BTNH.reshape(B, T, cfg.n_kv_heads, cfg.q_per_kv, H)
    if T == 1:
        return _decode_attention(q[:, 0], k_BKSH, v_BKSH, allowed_BTS[:, 0]).reshape(B, 1, N, H)
    probs = jax.nn.softmax(_block_scores(q, k_BKSH, allowed_BTS), axis=-1).astype(v_BKSH.dtype)
    out = jnp.einsum("BKQTS,BKSH->BTKQH", probs, v_BKSH)
    return out.reshape(B, T, N, H)


def _decode_attention(q_BKQH, k_BKSH, v_BKSH, allowed_BS):
    """One query per row (a decode step): the same softmax attention, oriented for a KV cache.

    With one query, each (row, kv head) is a [Q, H] x [H, S] product: a few
    query vectors against the whole cache, which bounds the step by how fast
    the cache is read. The key product is written with the cache as the left
    operand ([S, H] x [H, Q], contraction on the minor axis of both) and the
    value product as probs [Q, S] x values [S, H] with a [Q, H] result: in
    those orientations XLA's CPU matmul streams the cache as it lies, while
    the mirrored forms (q x k^T, or a transposed output) repack the cache
    first and ran 6-7x slower at 1k slots. The transposes left are of the
    small [S, Q] scores.
    """
    H = q_BKQH.shape[-1]
    scores = jnp.einsum("BKSH,BKQH->BKSQ", k_BKSH, q_BKQH, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(H)
    scores = jnp.where(allowed_BS[:, None, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=2).astype(v_BKSH.dtype)
    probs_BKQS = jax.lax.optimization_barrier(probs.transpose(0, 1, 3, 2))
    return jnp.einsum("BKQS,BKSH->BKQH", probs_BKQS, v_BKSH)


# Causal self-attention without a cache runs over query blocks of at least this
# many positions (at most _MAX_QUERY_BLOCKS blocks); see `_causal_attention`.
_MIN_QUERY_BLOCK = 64
_MAX_QUERY_BLOCKS = 8


def _query_blocks(T: int) -> list[tuple[int, int]]:
    """Equal splits [start, end) of T, no shorter than _MIN_QUERY_BLOCK, at most _MAX_QUERY_BLOCKS."""
    n_blocks = max(1, min(_MAX_QUERY_BLOCKS, T // _MIN_QUERY_BLOCK))
    size = -(-T // n_blocks)
    return [(start, min(start + size, T)) for start in range(0, T, size)]


def _block_scores(q_BTKQH, k_BKSH, allowed_BTS):
    """Masked float32 scores [B, K, Q, Tq, S] of one query block."""
    H = q_BTKQH.shape[-1]
    scores = jnp.einsum("BTKQH,BKSH->BKQTS", q_BTKQH, k_BKSH, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(H)
    return jnp.where(allowed_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)


def _causal_forward(q, k, v, allowed):
    """Block by block: outputs [B, T, K, Q, H] and each row's softmax max and sum [B, K, Q, T]."""
    T = q.shape[1]
    outs, maxes, sums = [], [], []
    for start, end in _query_blocks(T):
        scores = _block_scores(q[:, start:end], k[:, :, :end], allowed[:, start:end, :end])
        m = jnp.max(scores, axis=-1, keepdims=True)
        e = jnp.exp(scores - m)
        total = jnp.sum(e, axis=-1, keepdims=True)
        probs = (e / total).astype(v.dtype)
        outs.append(jnp.einsum("BKQTS,BKSH->BTKQH", probs, v[:, :, :end]))
        maxes.append(m[..., 0])
        sums.append(total[..., 0])
    return (jnp.concatenate(outs, axis=1), jnp.concatenate(maxes, axis=-1),
            jnp.concatenate(sums, axis=-1))


@jax.custom_vjp
def _causal_attention_core(q_BTKQH, k_BKTH, v_BKTH, allowed_BTT):
    return _causal_forward(q_BTKQH, k_BKTH, v_BKTH, allowed_BTT)[0]


def _causal_core_fwd(q, k, v, allowed):
    out, m, total = _causal_forward(q, k, v, allowed)
    return out, (q, k, v, allowed, out, m, total)


def _causal_core_bwd(res, d_out):
    """The softmax-attention gradient, recomputing each block's probabilities from (max, sum).

    With P = softmax(S) and O = P V: dV = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(dO * O)), dQ = dS K / sqrt(H), dK = dS^T Q / sqrt(H).
    """
    q, k, v, allowed, out, m, total = res
    H = q.shape[-1]
    delta = jnp.einsum("BTKQH,BTKQH->BKQT", d_out.astype(jnp.float32), out.astype(jnp.float32))
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    dqs = []
    for start, end in _query_blocks(q.shape[1]):
        q_i, do_i = q[:, start:end], d_out[:, start:end]
        k_j, v_j = k[:, :, :end], v[:, :, :end]
        scores = _block_scores(q_i, k_j, allowed[:, start:end, :end])
        probs = jnp.exp(scores - m[..., start:end, None]) / total[..., start:end, None]
        # Products come out in the compute dtype (XLA's CPU fallback matmul has no
        # bfloat16 x bfloat16 -> float32) and are summed over blocks in float32.
        dv = dv.at[:, :, :end].add(jnp.einsum("BKQTS,BTKQH->BKSH", probs.astype(v.dtype), do_i))
        dp = jnp.einsum("BTKQH,BKSH->BKQTS", do_i, v_j, preferred_element_type=jnp.float32)
        ds = (probs * (dp - delta[..., start:end, None]) / math.sqrt(H)).astype(q.dtype)
        dqs.append(jnp.einsum("BKQTS,BKSH->BTKQH", ds, k_j))
        dk = dk.at[:, :, :end].add(jnp.einsum("BKQTS,BTKQH->BKSH", ds, q_i))
    dq = jnp.concatenate(dqs, axis=1)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_causal_attention_core.defvjp(_causal_core_fwd, _causal_core_bwd)


def _causal_attention(q_BTNH, k_BKTH, v_BKTH, allowed_BTT, cfg: ModelConfig):
    """`_attention` when query t sits at key slot t, in query blocks with a hand-written gradient.

    Each query block sees only the keys up to its own end: a key after the
    block's last query is masked for every query in it, so it only ever added
    exp(min - max) = 0 to the softmax, and dropping it leaves every real
    query's output as it was while skipping that part of the score work
    (nearly half of it at 8 blocks). The gradient recomputes each block's
    probabilities from the saved row max and sum instead of keeping the
    [B, N, T, T] float32 scores and probabilities of every layer for the
    backward pass (285 MB per layer at 16 rows of 1056 tokens): the update
    step's memory then grows with T, not T^2, and the largest temporary is
    one block's [B, N, T/8, T]. Blocks are equal splits of T, no shorter than
    _MIN_QUERY_BLOCK (short sequences run in one piece) and at most
    _MAX_QUERY_BLOCKS of them, so the program grows by a bounded number of
    einsums. A query that sees no real key at all (a left-padding position)
    gets a uniform average over its block's keys instead of all T: a value no
    real token reads.
    """
    B, T, N, H = q_BTNH.shape
    if len(_query_blocks(T)) == 1:
        return _attention(q_BTNH, k_BKTH, v_BKTH, allowed_BTT, cfg)
    q = q_BTNH.reshape(B, T, cfg.n_kv_heads, cfg.q_per_kv, H)
    return _causal_attention_core(q, k_BKTH, v_BKTH, allowed_BTT).reshape(B, T, N, H)


def _dot(x: Float[Array, "M A"], w: Float[Array, "A C"]) -> Float[Array, "M C"]:
    """A plain 2-D matmul: the layer's projections run on [B*T, D] rows.

    Merging B and T keeps the batch sharding (B is the major part of B*T), and
    the backward pass is two plain matmuls instead of batched dots with
    transposes of the activations (about 5% of a CPU update step).
    """
    return jnp.dot(x, w)


@jax.checkpoint
def _swiglu(gate, up):
    """silu(gate) * up, recomputed in the backward pass from (gate, up).

    Without the checkpoint the backward pass keeps sigmoid(gate) and the
    product as well, two more [B*T, F] arrays per layer (the largest
    activations of a layer): 190 MB over 4 layers of 16 x 1056 rows at F=704.
    The recomputation is one elementwise pass.
    """
    return jax.nn.silu(gate) * up


def _layer(cfg: ModelConfig, inv_freq, x_BTD, p, positions_BT, allowed_BTS, cache_kv, cache_index,
           layer=0):
    """One decoder layer. Returns the new residual stream and (k, v).

    Without a cache (k, v) are this layer's keys and values. With one,
    `cache_kv` is the whole stacked cache [L, B, K, S, H]: only the T new slots
    of `layer` are written, so a decode step updates the cache in place instead
    of copying every layer's slots, and (k, v) is the updated stack. With
    `layer=None`, `cache_kv` is this layer's own cache [B, K, S, H] (the
    unstacked form, see `unstack_layers`) and (k, v) is that cache updated.
    """
    cdt = dtype_of(cfg.compute_dtype)
    w = {k: v.astype(cdt) for k, v in p.items()}
    B, T, D = x_BTD.shape
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h = rms_norm(x_BTD, w["attn_norm_LD"], cfg.norm_eps).reshape(B * T, D)
    q = _dot(h, w["q_LDNH"].reshape(D, N * H)).reshape(B, T, N, H)
    k = _dot(h, w["k_LDKH"].reshape(D, K * H)).reshape(B, T, K, H)
    v = _dot(h, w["v_LDKH"].reshape(D, K * H)).reshape(B, T, K, H)
    if cfg.qkv_bias:
        q, k, v = q + w["q_bias_LNH"], k + w["k_bias_LKH"], v + w["v_bias_LKH"]
    if cfg.qk_norm:
        q = rms_norm(q, w["q_norm_LH"], cfg.norm_eps)
        k = rms_norm(k, w["k_norm_LH"], cfg.norm_eps)
    q = apply_rope(q, positions_BT, inv_freq)
    k = apply_rope(k, positions_BT, inv_freq).transpose(0, 2, 1, 3)  # B K T H
    v = v.transpose(0, 2, 1, 3)
    if cache_kv is not None and layer is None:  # this layer's own cache [B, K, S, H]
        ck, cv = cache_kv
        start = (0, 0, cache_index, 0)
        k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
        v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
        attn = _attention(q, k, v, allowed_BTS, cfg)
    elif cache_kv is not None:
        ck, cv = cache_kv
        start = (layer, 0, 0, cache_index, 0)
        k = ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), start)
        v = cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), start)
        k, v = (jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False) for c in (ck, cv))
        attn = _attention(q, k, v, allowed_BTS, cfg)
        k, v = ck, cv
    elif isinstance(cache_index, int) and cache_index == 0:  # query t at key slot t
        attn = _causal_attention(q, k, v, allowed_BTS, cfg)
    else:
        attn = _attention(q, k, v, allowed_BTS, cfg)
    out = _dot(attn.reshape(B * T, N * H), w["o_LNHD"].reshape(N * H, D)).reshape(B, T, D)
    if cfg.o_bias:
        out = out + w["o_bias_LD"]
    x_BTD = x_BTD + out
    h = rms_norm(x_BTD, w["mlp_norm_LD"], cfg.norm_eps).reshape(B * T, D)
    hidden = _swiglu(_dot(h, w["gate_LDF"]), _dot(h, w["up_LDF"]))
    x_BTD = x_BTD + _dot(hidden, w["down_LFD"]).reshape(B, T, D)
    return x_BTD, (k, v)


def hidden_states(
    params: Params,
    cfg: ModelConfig,
    tokens: Int[Array, "B T"],
    positions: Int[Array, "B T"] | None = None,
    kv_mask: Bool[Array, "B S"] | None = None,
    cache: KVCache | None = None,
    cache_index: Int[Array, ""] | int = 0,
) -> tuple[Float[Array, "B T D"], KVCache | None]:
    """Final-norm hidden states of a causal decoder, optionally with a KV cache.

    Without a cache the keys are the T input tokens; `kv_mask` [B, T] marks the
    real (non-pad) ones. With a cache of S slots, the T new tokens are written
    at slots [cache_index, cache_index + T), query t sits at slot cache_index + t,
    and `kv_mask` [B, S] marks which slots hold real tokens (including the new
    ones). A query attends to real keys at or before its own slot.

    Args:
      positions: rotary positions [B, T]; default 0..T-1 (cache_index offset).
    Returns:
      hidden [B, T, D] in the compute dtype, and the updated cache (or None).
    """
    B, T = tokens.shape
    unstacked = isinstance(params["layers"], tuple)
    if cache is not None and unstacked != isinstance(cache.k, tuple):
        raise ValueError("hidden_states: params['layers'] and the cache must be both stacked or both "
                         "unstacked (see unstack_layers / unstack_cache)")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T)[None] + cache_index, (B, T))
    S = T if cache is None else (cache.k[0].shape[2] if unstacked else cache.k.shape[3])
    if kv_mask is None:
        kv_mask = jnp.ones((B, S), bool)
    q_slot = jnp.arange(T) + cache_index
    allowed = (jnp.arange(S)[None, :] <= q_slot[:, None])[None] & kv_mask[:, None, :]
    cdt = dtype_of(cfg.compute_dtype)
    x = params["embed_VD"].astype(cdt)[tokens]
    inv_freq = rope_inv_freq(cfg)

    if unstacked:  # one program piece per layer, each reading its own weights and cache
        new_k, new_v = [], []
        for i, p in enumerate(params["layers"]):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, (k, v) = _layer(cfg, inv_freq, x, p, positions, allowed, kv, cache_index, None)
            new_k.append(k)
            new_v.append(v)
        x = rms_norm(x, params["final_norm_D"], cfg.norm_eps)
        return x, (None if cache is None else KVCache(tuple(new_k), tuple(new_v)))

    # The cache rides in the scan carry (not in xs/ys) so that each layer writes only
    # its new slots in place; as a scanned output it would be copied whole every call.
    def body(carry, layer_in):
        x, kv = carry
        p, layer = layer_in
        x, new_kv = _layer(cfg, inv_freq, x, p, positions, allowed, kv, cache_index, layer)
        return (x, (new_kv if cache is not None else None)), None

    if cfg.remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    kv = None if cache is None else (cache.k, cache.v)
    layers = jnp.arange(cfg.n_layers)
    (x, new_kv), _ = jax.lax.scan(body, (x, kv), (params["layers"], layers))
    x = rms_norm(x, params["final_norm_D"], cfg.norm_eps)
    new_cache = None if cache is None else KVCache(*new_kv)
    return x, new_cache


def unstack_layers(params: Params, cfg: ModelConfig) -> Params:
    """The params with "layers" as a tuple of one dict per layer (slices of the stacked arrays).

    `hidden_states` given such params runs the layers as an unrolled loop
    instead of a `lax.scan`: a longer program, but each layer reads its own
    weights (and, with an unstacked cache, its own cache arrays) as they lie.
    Under a scan, XLA's CPU backend copies every layer's weight and cache
    slices out of the stacked arrays before using them, which in a decode
    step costs more than the step's own reads. Do the split once, outside
    a loop, so the slices are taken once. Meant for inference: the unrolled
    loop does not apply `cfg.remat`.
    """
    layers = params["layers"]
    per_layer = tuple({k: v[i] for k, v in layers.items()} for i in range(cfg.n_layers))
    return {**params, "layers": per_layer}


def unstack_cache(cache: KVCache) -> KVCache:
    """A stacked cache [L, B, K, S, H] as L per-layer arrays [B, K, S, H] (for unstacked params)."""
    L = cache.k.shape[0]
    return KVCache(tuple(cache.k[i] for i in range(L)), tuple(cache.v[i] for i in range(L)))


def lm_head(params: Params, cfg: ModelConfig) -> Float[Array, "D V"]:
    """The output projection: the tied embedding transposed, or the separate head."""
    if "lm_head_DV" in params:
        return params["lm_head_DV"]
    return params["embed_VD"].T


def logits_from_hidden(
    params: Params, cfg: ModelConfig, hidden: Float[Array, "B T D"]
) -> Float[Array, "B T V"]:
    """Logits in float32 from hidden states."""
    if hidden.shape[1] == 1 and "lm_head_DV" not in params:
        # A decode step with a tied head: [V, D] x [D, B] streams the embedding as it
        # lies (twice the throughput of [B, D] x [D, V] on XLA's CPU matmul, which
        # repacks its right operand); the [V, B] result is small to transpose.
        w_VD = params["embed_VD"].astype(hidden.dtype)
        logits_VB = jnp.einsum("VD,BD->VB", w_VD, hidden[:, 0], preferred_element_type=jnp.float32)
        return jax.lax.optimization_barrier(logits_VB).T[:, None]
    w = lm_head(params, cfg).astype(hidden.dtype)
    return jnp.einsum("BTD,DV->BTV", hidden, w, preferred_element_type=jnp.float32)


def forward(params: Params, model_config: ModelConfig, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
    """Causal LM logits [B, T, V] (float32) for unpadded tokens [B, T]."""
    hidden, _ = hidden_states(params, model_config, tokens)
    return logits_from_hidden(params, model_config, hidden)


def positions_from_mask(mask: Bool[Array, "B T"]) -> Int[Array, "B T"]:
    """Rotary positions that count only real tokens, so padding never shifts a row."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


def forward_padded(
    params: Params, cfg: ModelConfig, tokens: Int[Array, "B T"], mask: Bool[Array, "B T"]
) -> Float[Array, "B T V"]:
    """Logits for padded rows: pad tokens are invisible and positions skip them."""
    hidden, _ = hidden_states(params, cfg, tokens, positions_from_mask(mask), mask)
    return logits_from_hidden(params, cfg, hidden)
