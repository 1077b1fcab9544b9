"""Decode throughput of the sampler against the memory-bandwidth bound.

A Qwen2.5-0.5B-shaped model (random weights, bfloat16) decodes at batch 64 and
256. A decode step must read every weight once (the tied embedding as the
output head) and the keys and values of every real context token, so

    bound tokens/s = batch / ((weight bytes + KV bytes per step) / bandwidth)

with the KV bytes at the mean context of the run (prompt + half the new tokens).
Decode time is time(new tokens) - time(1 new token), best of the repeats.
Bandwidth is the device's specification where known (H100, H200, A100), or
a measured large-array copy otherwise (CPU), or --bandwidth-gbs.

    python benchmarks/bench_decode_gpu.py             # on a GPU
    python benchmarks/bench_decode_gpu.py --tiny      # a small model on CPU (tested)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import interleaved_times, machine, peak_device_memory_mb, print_table  # noqa: E402

from ouroboros_jax.config import ModelConfig  # noqa: E402
from ouroboros_jax.models import param_shapes  # noqa: E402
from ouroboros_jax.models.transformer import dtype_of  # noqa: E402
from ouroboros_jax.sampling import generate  # noqa: E402

QWEN25_05B = ModelConfig(family="qwen2", vocab_size=151_936, d_model=896, n_layers=24, n_heads=14,
                         n_kv_heads=2, head_dim=64, d_ff=4864, rope_theta=1_000_000.0, qkv_bias=True,
                         tie_embeddings=True, max_seq_len=32_768, dtype="bfloat16", compute_dtype="bfloat16")
TINY = ModelConfig(family="qwen2", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=16, d_ff=128, dtype="bfloat16", compute_dtype="bfloat16")
# HBM bandwidth from the vendors' specification sheets (SXM parts), GB/s.
SPEC_BANDWIDTH_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "GH200": 4000.0}


def random_params(cfg: ModelConfig, seed: int = 0):
    """Random weights drawn on the host: normal(0, 0.02) matrices, unit norms, zero biases.

    Host numpy draws skip compiling a random-number program per weight shape,
    which on a small CPU takes longer than the benchmark itself.
    """
    rng = np.random.default_rng(seed)

    def one(path, shape):
        name = path[-1].key
        if "norm" in name:
            x = np.ones(shape, np.float32)
        elif "bias" in name:
            x = np.zeros(shape, np.float32)
        else:
            x = 0.02 * rng.standard_normal(shape, np.float32)
        return jnp.asarray(x, dtype_of(cfg.dtype))

    return jax.tree_util.tree_map_with_path(one, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def measured_copy_bandwidth_gbs(mbytes: int = 256) -> float:
    """Read+write rate of a large elementwise op: a practical bandwidth on any device."""
    x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * x.nbytes / best / 1e9


def bandwidth_gbs(override: float | None, mbytes: int = 256) -> tuple[float, str]:
    if override:
        return override, "given"
    kind = jax.devices()[0].device_kind
    for name, gbs in sorted(SPEC_BANDWIDTH_GBS.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return gbs, f"{kind} spec"
    return measured_copy_bandwidth_gbs(mbytes), "measured copy"


def bytes_per_step(cfg: ModelConfig, batch: int, context: float) -> tuple[float, float]:
    """Weight bytes and KV-cache bytes one decode step must read."""
    item = jnp.dtype(cfg.compute_dtype).itemsize
    weights = cfg.num_params() * jnp.dtype(cfg.dtype).itemsize
    kv = 2 * cfg.n_layers * batch * context * cfg.n_kv_heads * cfg.head_dim * item
    return weights, kv


def run_batch(params, cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, repeats: int,
              bandwidth: float, layer_loop: str = "auto") -> dict:
    """Time one batch size: prefill alone, and prefill + decode; the difference is decode."""
    prompts = np.random.RandomState(batch).randint(1, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    kw = dict(temperature=1.0, rng=jax.random.key(0), prompt_len_buckets=(prompt_len,),
              batch_buckets=(batch,), layer_loop=layer_loop)
    times = interleaved_times({
        "full": lambda: generate(params, cfg, prompts, max_new_tokens=new_tokens, **kw).tokens,
        "prefill": lambda: generate(params, cfg, prompts, max_new_tokens=1, **kw).tokens,
    }, repeats=repeats)
    full, prefill = min(times["full"]), min(times["prefill"])
    step_s = max(full - prefill, 1e-9) / (new_tokens - 1)
    weights, kv = bytes_per_step(cfg, batch, prompt_len + new_tokens / 2)
    bound = batch * bandwidth * 1e9 / (weights + kv)
    return {"layer loop": layer_loop, "batch": batch, "prompt": prompt_len, "new": new_tokens,
            "prefill tok/s": batch * prompt_len / prefill, "step ms": step_s * 1e3,
            "decode tok/s": batch / step_s, "weights MB": weights / 1e6, "KV MB/step": kv / 1e6,
            "bound tok/s": bound, "of bound": batch / step_s / bound,
            "peak dev MiB": peak_device_memory_mb()}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a small model and batches, for CPU")
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="override the bandwidth")
    p.add_argument("--layer-loop", nargs="+", default=["scan", "unroll"], choices=["auto", "scan", "unroll"],
                   help="the sampler's layer loops to compare")
    args = p.parse_args(argv)
    cfg = TINY if args.tiny else QWEN25_05B
    batches = args.batch or ([4, 8] if args.tiny else [64, 256])
    prompt_len = args.prompt_len or (16 if args.tiny else 128)
    new_tokens = args.new_tokens or (16 if args.tiny else 512)
    repeats = 1 if args.tiny and args.repeats == 3 else args.repeats
    params = random_params(cfg)
    bandwidth, source = bandwidth_gbs(args.bandwidth_gbs, 16 if args.tiny else 256)
    rows = []
    for b in batches:
        for loop in args.layer_loop:
            rows.append(run_batch(params, cfg, b, prompt_len, new_tokens, repeats, bandwidth, loop))
            r = rows[-1]
            print(f"batch {b} {loop}: {r['decode tok/s']:,.0f} tok/s, {r['step ms']:.3f} ms/step, "
                  f"{r['of bound']:.2f} of the bound {r['bound tok/s']:,.0f}", flush=True)
    print_table(rows, title=(f"decode vs bandwidth bound: {cfg.num_params() / 1e6:.2f}M params "
                             f"{cfg.dtype}, bandwidth {bandwidth:,.0f} GB/s ({source}); {machine()}"),
                floatfmt={"step ms": ".3f", "weights MB": ",.2f", "KV MB/step": ",.2f", "of bound": ".2f"})
    return rows


if __name__ == "__main__":
    main()
