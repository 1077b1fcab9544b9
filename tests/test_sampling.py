"""The rollout sampler: exactness against the cache-free forward and `transformers`,
log-probs against the training forward, sampling statistics, stop tokens, compile
counts and sharding."""

from __future__ import annotations

import functools
import importlib.util
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax import sampling
from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.models import forward, forward_padded, load_hf_checkpoint, param_shapes, param_shardings
from ouroboros_jax.sampling import bucket_size, choose_tokens, draw_inverse_cdf, generate, pack_prompts
from ouroboros_jax.sharding import make_mesh

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                  max_seq_len=256)
PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 12, 40, 41, 2], [11], [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 3]]
N_NEW = 10


@functools.cache
def model_params():
    """Random weights scaled up so the next-token distributions are far from uniform."""
    rng = np.random.default_rng(0)

    def one(path, shape):
        name = path[-1].key
        if "norm" in name or "bias" in name:
            return jnp.asarray(float("norm" in name) + 0.1 * rng.standard_normal(shape, np.float32))
        return jnp.asarray(0.25 * rng.standard_normal(shape, np.float32))

    return jax.tree_util.tree_map_with_path(one, param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))


fwd = jax.jit(forward, static_argnums=1)
fwd_padded = jax.jit(forward_padded, static_argnums=1)


def reference_greedy(params, cfg, prompts, n_new):
    """Step-by-step argmax of the cache-free forward. Rows are right-padded to one
    width; causal attention keeps trailing junk out of every real position."""
    seqs = [list(p) for p in prompts]
    width = max(len(s) for s in seqs) + n_new
    for _ in range(n_new):
        buf = np.zeros((len(seqs), width), np.int32)
        for i, s in enumerate(seqs):
            buf[i, :len(s)] = s
        logits = np.asarray(fwd(params, cfg, jnp.asarray(buf)))
        for i, s in enumerate(seqs):
            s.append(int(np.argmax(logits[i, len(s) - 1])))
    return np.array([s[len(p):] for s, p in zip(seqs, prompts, strict=True)])


def training_logits(params, cfg, out):
    """Float32 logits at the columns that predicted each completion token: [R, N, V]."""
    tokens, mask = out.sequences()
    P = out.prompt_tokens.shape[1]
    return np.asarray(fwd_padded(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))[:, P - 1:-1]


def truncated_logprobs(scaled, top_k, top_p):
    """Log-probs over the vocabulary after top-k then top-p (dropped tokens: -inf)."""
    order = np.argsort(-scaled, axis=-1, kind="stable")
    vals = np.take_along_axis(scaled, order, -1)
    keep = np.arange(vals.shape[-1]) < (top_k or vals.shape[-1])
    probs = np.exp(np.where(keep, vals - vals.max(-1, keepdims=True), -np.inf))
    probs /= probs.sum(-1, keepdims=True)
    keep = keep & (np.cumsum(probs, -1) - probs < top_p)
    kept = np.where(keep, vals, -np.inf)
    kept = kept - np.log(np.exp(kept - kept.max(-1, keepdims=True)).sum(-1, keepdims=True)) - kept.max(
        -1, keepdims=True)
    out = np.empty_like(kept)
    np.put_along_axis(out, order, kept, -1)
    return out


def log_softmax(x):
    return np.asarray(jax.nn.log_softmax(jnp.asarray(x), axis=-1))


# ---------------------------------------------------------------------------
# Exactness


def test_greedy_equals_cache_free_argmax_for_mixed_lengths():
    params = model_params()
    out = generate(params, CFG, PROMPTS, max_new_tokens=N_NEW, num_samples=2, temperature=0.0,
                   rng=jax.random.key(0))
    ref = reference_greedy(params, CFG, PROMPTS, N_NEW)
    assert out.tokens.shape == (8, N_NEW)
    np.testing.assert_array_equal(out.tokens[0::2], ref)
    np.testing.assert_array_equal(out.tokens[1::2], ref)  # greedy copies of a group agree
    assert out.mask.all() and out.truncated.all() and (out.lengths == N_NEW).all()
    assert out.steps == N_NEW
    np.testing.assert_array_equal(out.logprobs, 0.0)  # a point mass
    assert out.prompt_tokens.shape == (8, 32)  # the first length bucket
    assert len(set(map(tuple, ref))) == len(PROMPTS)  # the prompts really lead different ways


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_unrolled_layer_loop_equals_scan(temperature):
    params = model_params()
    kw = dict(max_new_tokens=N_NEW, num_samples=2, temperature=temperature, rng=jax.random.key(7))
    scan = generate(params, CFG, PROMPTS, layer_loop="scan", **kw)
    unroll = generate(params, CFG, PROMPTS, layer_loop="unroll", **kw)
    np.testing.assert_array_equal(unroll.tokens, scan.tokens)
    np.testing.assert_allclose(unroll.policy_logprobs, scan.policy_logprobs, atol=1e-5)
    if temperature == 0.0:
        np.testing.assert_array_equal(unroll.tokens[0::2], reference_greedy(params, CFG, PROMPTS, N_NEW))


def test_auto_layer_loop_unrolls_long_caches_on_cpu():
    assert not sampling._unroll_layers("auto", None, sampling.UNROLL_MIN_CACHE_SLOTS - 1)
    assert sampling._unroll_layers("auto", None, sampling.UNROLL_MIN_CACHE_SLOTS)
    assert sampling._unroll_layers("unroll", None, 8) and not sampling._unroll_layers("scan", None, 4096)


def _mesh_on(platform: str):
    device = types.SimpleNamespace(platform=platform)
    return types.SimpleNamespace(devices=np.array([device], dtype=object))


def test_auto_layer_loop_unrolls_on_gpu_at_any_length_and_scans_on_tpu():
    assert sampling._unroll_layers("auto", _mesh_on("gpu"), 8)
    assert not sampling._unroll_layers("auto", _mesh_on("tpu"), 4096)
    assert not sampling._unroll_layers("auto", _mesh_on("cpu"), 8)
    assert not sampling._unroll_layers("scan", _mesh_on("gpu"), 4096)


def test_prompt_as_padded_array_with_mask_equals_lists():
    params = model_params()
    width = 20
    tokens = np.full((len(PROMPTS), width), 63, np.int32)  # junk under the mask must not matter
    mask = np.zeros((len(PROMPTS), width), bool)
    for i, p in enumerate(PROMPTS):  # right-padded, one row with a hole in the middle
        tokens[i, :len(p)] = p
        mask[i, :len(p)] = True
    tokens[2, :4], mask[2, :4] = 63, False
    tokens[2, 4], mask[2, 4] = PROMPTS[2][0], True
    kw = dict(max_new_tokens=N_NEW, num_samples=2, temperature=0.0, rng=jax.random.key(0))
    a = generate(params, CFG, PROMPTS, **kw)
    b = generate(params, CFG, tokens, prompt_mask=mask, **kw)
    for field in ("tokens", "mask", "policy_logprobs", "prompt_tokens", "prompt_mask"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(a.prompt_mask.sum(1), np.repeat([len(p) for p in PROMPTS], 2))
    assert a.prompt_mask[:, -1].all()  # left-padded: every prompt ends at the last column


@pytest.mark.parametrize("family", ["qwen2", pytest.param("llama", marks=pytest.mark.slow),
                                    pytest.param("qwen3", marks=pytest.mark.slow)])
def test_greedy_equals_transformers_generate(family, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from hf_fixtures import make_checkpoint

    model = make_checkpoint(family, tmp_path)
    cfg, params = load_hf_checkpoint(tmp_path)
    prompts = [[(7 * i + 3 * j) % 97 for j in range(n)] for i, n in enumerate([5, 17, 2, 11])]
    n_new = 12
    ours = generate(params, cfg, prompts, max_new_tokens=n_new, temperature=0.0, rng=jax.random.key(0))
    gen = transformers.GenerationConfig(max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)
    for i, p in enumerate(prompts):  # each prompt alone and unpadded in transformers
        with torch.no_grad():
            hf = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                generation_config=gen)
        np.testing.assert_array_equal(ours.tokens[i], hf[0, len(p):].numpy(), err_msg=f"prompt {i}")


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 6, 0.8)])
def test_logprobs_equal_training_forward(temperature, top_k, top_p):
    params = model_params()
    out = generate(params, CFG, PROMPTS, max_new_tokens=N_NEW, num_samples=3, temperature=temperature,
                   top_k=top_k, top_p=top_p, rng=jax.random.key(3))
    logits = training_logits(params, CFG, out) / temperature
    policy = np.take_along_axis(log_softmax(logits), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.policy_logprobs, np.where(out.mask, policy, 0.0), atol=1e-5, rtol=0)
    sampled = np.take_along_axis(truncated_logprobs(logits, top_k, top_p), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, np.where(out.mask, sampled, 0.0), atol=1e-5, rtol=0)
    if top_k == 0 and top_p == 1.0:
        np.testing.assert_array_equal(out.logprobs, out.policy_logprobs)
    else:
        assert (out.logprobs > out.policy_logprobs + 1e-3).mean() > 0.9  # renormalised over fewer tokens


# ---------------------------------------------------------------------------
# Sampling statistics and randomness

PROBS = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
CHI2_LIMIT = 25.0  # above the 0.999 quantile of chi-square with up to 7 degrees of freedom


def chi_square(counts, probs):
    kept = probs > 0
    expected = probs[kept] * counts.sum()
    return float(((counts[kept] - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, 1.0), (1.0, 0, 0.6), (0.5, 5, 0.9),
                                                     (2.0, 0, 1.0)])
def test_choose_tokens_frequencies_match_truncated_distribution(temperature, top_k, top_p):
    n = 20_000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS, jnp.float32)), (n, len(PROBS)))
    keys = jax.random.split(jax.random.key(7), n)
    choose = jax.jit(functools.partial(choose_tokens, greedy=False, top_k=top_k, use_top_p=top_p < 1))
    tokens, lp, policy_lp = choose(logits, keys, jnp.float32(temperature), jnp.float32(top_p))
    want = np.exp(truncated_logprobs(np.log(PROBS)[None] / temperature, top_k, top_p)[0])
    counts = np.bincount(np.asarray(tokens), minlength=len(PROBS))
    assert counts[want == 0].sum() == 0, "drew a token the truncation removed"
    assert chi_square(counts, want) < CHI2_LIMIT
    untruncated = np.exp(log_softmax(np.log(PROBS) / temperature))
    if top_k or top_p < 1:  # the test can tell the truncated law from the plain one
        assert chi_square(counts, untruncated) > 100
    np.testing.assert_allclose(lp, np.log(want[np.asarray(tokens)]), atol=1e-5)
    np.testing.assert_allclose(policy_lp, np.log(untruncated[np.asarray(tokens)]), atol=1e-5)


def test_inverse_cdf_draw_never_lands_on_a_dropped_token():
    logits = np.full((3, 600), -np.inf, np.float32)  # 600 entries: three blocks of 256, one partial
    logits[0, [5, 300]] = 0.0
    logits[1, 599] = 3.0
    logits[2, :256] = np.linspace(-1, 1, 256)
    below_one = np.nextafter(np.float32(1), np.float32(0))
    want = {0.0: [5, 599, 0], 0.5: [300, 599, None], float(below_one): [300, 599, 255]}
    for u, expect in want.items():
        tokens = np.asarray(draw_inverse_cdf(jnp.asarray(logits), jnp.full((3,), u, jnp.float32)))
        assert np.isfinite(logits[np.arange(3), tokens]).all()
        for got, e in zip(tokens, expect, strict=True):
            assert e is None or got == e, (u, tokens)


def test_generate_first_token_frequencies_match_truncated_model_distribution():
    params = model_params()
    prompt, n, temperature, top_k, top_p = PROMPTS[1], 4096, 0.8, 5, 0.9
    out = generate(params, CFG, [prompt], max_new_tokens=1, num_samples=n, temperature=temperature,
                   top_k=top_k, top_p=top_p, rng=jax.random.key(11))
    logits = np.asarray(fwd(params, CFG, jnp.asarray([prompt])))[0, -1] / temperature
    want = np.exp(truncated_logprobs(logits[None], top_k, top_p)[0])
    counts = np.bincount(out.tokens[:, 0], minlength=CFG.vocab_size)
    assert 2 <= (want > 0).sum() <= top_k
    assert counts[want == 0].sum() == 0
    assert chi_square(counts, want) < CHI2_LIMIT


def test_same_rng_same_samples_different_rng_different_samples():
    params = model_params()
    kw = dict(max_new_tokens=N_NEW, num_samples=3, temperature=1.0, top_k=0, top_p=1.0)
    a = generate(params, CFG, PROMPTS, rng=jax.random.key(3), **kw)
    b = generate(params, CFG, PROMPTS, rng=jax.random.key(3), **kw)
    c = generate(params, CFG, PROMPTS, rng=jax.random.key(4), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).any(axis=1).mean() > 0.9
    group = a.tokens.reshape(len(PROMPTS), 3, N_NEW)
    assert all(len({tuple(r) for r in g}) > 1 for g in group)  # samples of one group differ
    raw = generate(params, CFG, PROMPTS, rng=jax.random.PRNGKey(3), **kw)  # legacy uint32 keys work
    np.testing.assert_array_equal(raw.tokens, a.tokens)


def test_sampled_completion_does_not_depend_on_batch_or_padding():
    params = model_params()
    kw = dict(max_new_tokens=N_NEW, num_samples=3, temperature=1.0, rng=jax.random.key(3))
    alone = generate(params, CFG, PROMPTS[:1], batch_buckets=(4,), **kw)  # 3 dummy rows beside it
    long_prompt = list(range(1, 41))  # forces the 64 bucket: more left padding for prompt 0
    batched = generate(params, CFG, [PROMPTS[0], long_prompt, PROMPTS[2]], **kw)
    assert batched.prompt_tokens.shape[1] == 64
    np.testing.assert_array_equal(batched.tokens[:3], alone.tokens)
    np.testing.assert_allclose(batched.logprobs[:3], alone.logprobs, atol=1e-5)


# ---------------------------------------------------------------------------
# Stop tokens, buckets, compile counts


def test_stop_tokens_end_rows():
    params = model_params()
    kw = dict(max_new_tokens=N_NEW, num_samples=2, temperature=0.0, rng=jax.random.key(0))
    ref = reference_greedy(params, CFG, PROMPTS, N_NEW)
    stop = int(ref[1, 4])
    out = generate(params, CFG, PROMPTS, stop_token_ids=(stop,), **kw)
    for i, row in enumerate(ref):
        hits = np.flatnonzero(row == stop)
        length = hits[0] + 1 if len(hits) else N_NEW
        for r in (2 * i, 2 * i + 1):
            assert out.lengths[r] == length and out.truncated[r] == (len(hits) == 0)
            np.testing.assert_array_equal(out.tokens[r, :length], row[:length])
            np.testing.assert_array_equal(out.tokens[r, length:], sampling.PAD_ID)
            np.testing.assert_array_equal(out.mask[r], np.arange(N_NEW) < length)
            assert (out.policy_logprobs[r, length:] == 0).all()
    assert out.truncated.any() and not out.truncated.all()
    # Every row stops: the loop exits early.
    stops = tuple(int(r[2]) for r in ref)
    early = generate(params, CFG, PROMPTS, stop_token_ids=stops, **kw)
    assert not early.truncated.any() and early.lengths.max() <= 3
    assert early.steps == early.lengths.max() < N_NEW


def test_bucket_size():
    assert [bucket_size(n, (32, 64)) for n in (1, 32, 33, 64, 65, 130)] == [32, 32, 64, 64, 128, 192]
    assert [bucket_size(n, None) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    assert bucket_size(3, None, multiple=8) == 8 and bucket_size(9, None, multiple=8) == 16


def test_compile_count_constant_within_a_bucket():
    params = model_params()
    keys = [jax.random.key(i) for i in range(4)]
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    kw = dict(max_new_tokens=N_NEW, num_samples=2, temperature=0.9, top_k=4, top_p=0.9)
    generate(params, CFG, PROMPTS, rng=keys[0], **kw)  # warm: batch bucket 4, length bucket 32
    programs = sampling.compiled_programs()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        generate(params, CFG, PROMPTS[:3], rng=keys[1], **kw)  # 3 prompts: same batch bucket
        generate(params, CFG, [p[:2] for p in PROMPTS], rng=keys[2], **{**kw, "top_p": 0.95})
        generate(params, CFG, [list(range(1, 30))] * 4, rng=keys[3], **{**kw, "temperature": 1.5})
        assert compiles == [] and sampling.compiled_programs() == programs
        generate(params, CFG, [list(range(1, 40))], rng=keys[0], **kw)  # a new bucket compiles once
        assert sampling.compiled_programs() == programs + 1 and len(compiles) >= 1
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_bad_input_is_named():
    params = model_params()
    kw = dict(max_new_tokens=4, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(params, CFG, [[1, 2], []], **kw)
    with pytest.raises(ValueError, match="temperature"):
        generate(params, CFG, PROMPTS, temperature=-1.0, **kw)
    with pytest.raises(ValueError, match="top_p"):
        generate(params, CFG, PROMPTS, top_p=0.0, **kw)
    with pytest.raises(ValueError, match="stop_token_ids"):
        generate(params, CFG, PROMPTS, stop_token_ids=(64,), **kw)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(params, CFG, PROMPTS, max_new_tokens=250, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="layer_loop"):
        generate(params, CFG, PROMPTS, layer_loop="unrolled", **kw)
    with pytest.raises(ValueError, match="equal 2-D shapes"):
        pack_prompts(np.ones((2, 3), np.int32), np.ones((2, 4), bool))


# ---------------------------------------------------------------------------
# Sharding


def test_eight_devices_equal_one_device():
    assert len(jax.devices()) == 8
    params = model_params()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = jax.device_put(params, param_shardings(CFG, mesh))
    kw = dict(max_new_tokens=N_NEW, num_samples=2, temperature=1.0, top_k=4, top_p=0.9, rng=jax.random.key(5))
    one = generate(params, CFG, PROMPTS[:3], **kw)
    eight = generate(sharded, CFG, PROMPTS[:3], mesh=mesh, **kw)
    np.testing.assert_array_equal(eight.tokens, one.tokens)
    unrolled = generate(sharded, CFG, PROMPTS[:3], mesh=mesh, layer_loop="unroll", **kw)
    np.testing.assert_array_equal(unrolled.tokens, one.tokens)
    np.testing.assert_array_equal(eight.lengths, one.lengths)
    np.testing.assert_allclose(eight.logprobs, one.logprobs, atol=1e-5)
    np.testing.assert_allclose(eight.policy_logprobs, one.policy_logprobs, atol=1e-5)


def test_mesh_that_does_not_divide_the_kv_heads_is_an_error():
    from ouroboros_jax.config import ConfigError

    cfg = ModelConfig(**{**CFG.__dict__, "n_kv_heads": 1})
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    with pytest.raises(ConfigError, match=r"kv_cache: dimension 2 \(act_kv_heads\) of size 1"):
        generate(model_params(), cfg, PROMPTS, max_new_tokens=2, mesh=mesh, rng=jax.random.key(0))


# ---------------------------------------------------------------------------
# The decode benchmark runs on CPU with --tiny


@pytest.mark.slow  # end to end, 10-35 s on 2 cores: in the slow set, which CI runs too
def test_decode_benchmark_runs_tiny(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_decode_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--tiny", "--batch", "4"])
    assert len(rows) == 2 and all(r["decode tok/s"] > 0 for r in rows)
    assert [r["layer loop"] for r in rows] == ["scan", "unroll"]
    assert "of bound" in capsys.readouterr().out
