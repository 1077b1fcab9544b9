"""Attention paths against the plain softmax attention: the blockwise causal form with its
hand-written gradient, the one-query decode form, the transposed tied head, and the
unrolled (unstacked) layer loop against the scanned one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models import transformer as tr

CFG = ModelConfig(vocab_size=96, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96,
                  max_seq_len=1024, qkv_bias=True)


def qkv(B: int, T: int, S: int, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, CFG.n_heads, CFG.head_dim), dtype)
    k = jax.random.normal(ks[1], (B, CFG.n_kv_heads, S, CFG.head_dim), dtype)
    v = jax.random.normal(ks[2], (B, CFG.n_kv_heads, S, CFG.head_dim), dtype)
    return q, k, v


def causal_allowed(mask):
    T = mask.shape[1]
    return (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])[None] & mask[:, None, :]


@pytest.mark.parametrize("T", [200])
def test_blockwise_causal_attention_equals_plain_values_and_gradients(T):
    assert len(tr._query_blocks(T)) > 1  # the blockwise path, not the one-block fallback
    B = 2
    q, k, v = qkv(B, T, T)
    left_pad = jnp.array([7, 100])
    mask = jnp.arange(T)[None] >= left_pad[:, None]
    allowed = causal_allowed(mask)
    weight = jax.random.normal(jax.random.key(1), q.shape) * mask[:, :, None, None]

    def loss(attention, q, k, v):
        return jnp.sum(attention(q, k, v, allowed, CFG) * weight)

    ref_val, ref_grads = jax.jit(jax.value_and_grad(lambda *a: loss(tr._attention, *a),
                                                    argnums=(0, 1, 2)))(q, k, v)
    val, grads = jax.jit(jax.value_and_grad(lambda *a: loss(tr._causal_attention, *a),
                                            argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for name, g, ref in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=2e-5, err_msg=f"d{name}")
    out = tr._causal_attention(q, k, v, allowed, CFG)
    ref_out = tr._attention(q, k, v, allowed, CFG)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref_out)[real], atol=1e-5)


def test_blockwise_causal_attention_bfloat16_close_to_float32():
    T = 260
    q, k, v = qkv(2, T, T)
    allowed = causal_allowed(jnp.ones((2, T), bool))

    def grads(dtype):
        f = lambda q, k, v: jnp.sum(tr._causal_attention(q, k, v, allowed, CFG).astype(jnp.float32) ** 2)
        args = tuple(x.astype(dtype) for x in (q, k, v))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*args)

    for g16, g32 in zip(grads(jnp.bfloat16), grads(jnp.float32), strict=True):
        assert g16.dtype == jnp.bfloat16
        rel = jnp.linalg.norm(g16.astype(jnp.float32) - g32) / jnp.linalg.norm(g32)
        assert float(rel) < 0.03


def test_decode_attention_equals_plain_einsum():
    B, S = 4, 40
    q, k, v = qkv(B, 1, S)
    allowed = (jnp.arange(S)[None, None, :] < jnp.array([40, 3, 17, 1])[:, None, None])
    out = jax.jit(tr._attention, static_argnums=4)(q, k, v, allowed, CFG)
    qg = q.reshape(B, 1, CFG.n_kv_heads, CFG.q_per_kv, CFG.head_dim)
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k) / np.sqrt(CFG.head_dim)
    probs = jax.nn.softmax(jnp.where(allowed[:, None, None], scores, -jnp.inf), axis=-1)
    ref = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v).reshape(out.shape)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_tied_head_decode_logits_equal_the_full_head():
    params = tr.init_params(CFG, jax.random.key(2))
    hidden = jax.random.normal(jax.random.key(3), (5, 1, CFG.d_model))
    ref = np.asarray(hidden[:, 0] @ params["embed_VD"].T)
    logits = jax.jit(tr.logits_from_hidden, static_argnums=1)(params, CFG, hidden)
    np.testing.assert_allclose(logits[:, 0], ref, rtol=1e-5, atol=1e-5)


def test_unstacked_layers_and_cache_equal_the_scan():
    hidden_states = jax.jit(tr.hidden_states, static_argnums=1)
    params = tr.init_params(CFG, jax.random.key(4))
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, CFG.vocab_size)
    kv_mask = jnp.arange(16)[None, :].repeat(2, 0) < 12
    flat = tr.unstack_layers(params, CFG)
    assert len(flat["layers"]) == CFG.n_layers
    scan_cache, flat_cache = tr.init_cache(CFG, 2, 16), tr.unstack_cache(tr.init_cache(CFG, 2, 16))
    h1, scan_cache = hidden_states(params, CFG, tokens[:, :9], kv_mask=kv_mask, cache=scan_cache)
    h2, flat_cache = hidden_states(flat, CFG, tokens[:, :9], kv_mask=kv_mask, cache=flat_cache)
    np.testing.assert_allclose(h2, h1, atol=1e-5)
    for t in range(9, 12):
        h1, scan_cache = hidden_states(params, CFG, tokens[:, t:t + 1], kv_mask=kv_mask,
                                          cache=scan_cache, cache_index=t)
        h2, flat_cache = hidden_states(flat, CFG, tokens[:, t:t + 1], kv_mask=kv_mask,
                                          cache=flat_cache, cache_index=t)
        np.testing.assert_allclose(h2, h1, atol=1e-5)
    restacked = tr.KVCache(jnp.stack(flat_cache.k), jnp.stack(flat_cache.v))
    np.testing.assert_allclose(restacked.k, scan_cache.k, atol=1e-5)
    np.testing.assert_allclose(restacked.v, scan_cache.v, atol=1e-5)
    no_cache, _ = hidden_states(flat, CFG, tokens)  # unstacked params also run without a cache
    np.testing.assert_allclose(no_cache, hidden_states(params, CFG, tokens)[0], atol=1e-5)
    with pytest.raises(ValueError, match="both stacked or both unstacked"):
        hidden_states(flat, CFG, tokens[:, :1], kv_mask=kv_mask, cache=tr.init_cache(CFG, 2, 16))
