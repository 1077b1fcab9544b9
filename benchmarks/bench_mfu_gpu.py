"""Model FLOPs utilisation of the update step for Qwen2.5-0.5B- and 1.5B-shaped models.

Random weights, float32 master weights with bfloat16 compute, the public
`make_train_step` program (GRPO loss, PPO-clip, chunked log-probs, AdamW) on a
mesh over every local device (fsdp), sequences of 1k to 4k tokens.

Model FLOPs per token of one update (forward + backward = 3 x forward; the
recomputation of rematerialised layers is not counted, as usual for MFU):

    6 * N_layers_matmul  +  6 * D * V * (completion share)  +  6 * L * N_heads * H * T

with N_layers_matmul the parameters of the layer projections (not the
embedding lookup, norms or biases), the output head counted on the completion
positions only (the step runs it there alone, `loss_start`: a quarter of each
row is prompt here), and the last term the causal attention products (QK^T and
PV over on average T / 2 keys). MFU = model FLOPs per second / peak dense bfloat16 FLOPs of the
devices (H100 / H200 SXM: 989 TFLOP/s each; --peak-tflops overrides; on CPU a
measured large matmul stands in for the peak).

    python benchmarks/bench_mfu_gpu.py                  # on a GPU
    python benchmarks/bench_mfu_gpu.py --tiny           # a tiny model on CPU in seconds (tested)
    python benchmarks/bench_mfu_gpu.py --profile DIR    # also trace one step of the first configuration

With --profile, one more step of the first configuration runs under
`jax.profiler.trace`; the device ops of its trace are summed by name (and by
kind: matmuls, attention, elementwise fusions, copies, collectives) and printed
as a table, so what limits the MFU is read from where the step's time goes.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import machine, median, peak_device_memory_mb, print_table  # noqa: E402

from ouroboros_jax.batch import Batch  # noqa: E402
from ouroboros_jax.config import MeshConfig, ModelConfig  # noqa: E402
from ouroboros_jax.models import init_sharded, param_specs  # noqa: E402
from ouroboros_jax.objectives import policy_gradient  # noqa: E402
from ouroboros_jax.sharding import batch_sharding, make_mesh  # noqa: E402
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step  # noqa: E402

BF16 = dict(dtype="float32", compute_dtype="bfloat16", family="qwen2", qkv_bias=True, tie_embeddings=True,
            rope_theta=1_000_000.0, max_seq_len=32_768)
MODELS = {
    "qwen2.5-0.5b": ModelConfig(vocab_size=151_936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                                head_dim=64, d_ff=4864, **BF16),
    "qwen2.5-1.5b": ModelConfig(vocab_size=151_936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                                head_dim=128, d_ff=8960, **BF16),
}
TINY = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                   **BF16)
# Dense bfloat16 peak per device, TFLOP/s, from the vendors' specification sheets (SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096], help="sequence lengths T")
    p.add_argument("--tokens", type=int, default=32_768, help="tokens per update (batch = tokens / T)")
    p.add_argument("--micro-tokens", type=int, default=16_384,
                   help="tokens per micro-batch (0: no micro-batching)")
    p.add_argument("--no-remat", action="store_true", help="keep every layer's activations")
    p.add_argument("--logprob-chunk", type=int, default=1024, help="positions per chunk of the output head")
    p.add_argument("--steps", type=int, default=5, help="timed updates per configuration")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device")
    p.add_argument("--tiny", action="store_true", help="a tiny model on CPU: a smoke run in seconds")
    p.add_argument("--profile", default="", help="trace one step of the first configuration into this folder")
    p.add_argument("--top", type=int, default=25, help="rows of the profile's table of ops")
    a = p.parse_args(argv)
    if a.tiny:
        a.seqs, a.tokens, a.micro_tokens, a.steps, a.logprob_chunk = [64], 1024, 512, 2, 32
    return a


def model_flops(cfg: ModelConfig, seq_len: int, head_positions: int) -> float:
    """Training FLOPs of one sequence (see the module docstring).

    The layers run on all `seq_len` positions; the output head only on the
    `head_positions` whose log-probs the loss needs (the completion).
    """
    d, h = cfg.d_model, cfg.head_dim
    per_layer = d * h * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.d_ff
    layers = 6 * cfg.n_layers * per_layer * seq_len
    head = 6 * d * cfg.vocab_size * head_positions
    attention = 6 * cfg.n_layers * cfg.n_heads * h * seq_len * seq_len
    return layers + head + attention


def peak_flops(override_tflops: float | None) -> tuple[float, str]:
    """Peak FLOP/s of all local devices and where the number comes from."""
    devices = jax.local_devices()
    if override_tflops:
        return override_tflops * 1e12 * len(devices), "given"
    kind = devices[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12 * len(devices), f"{name} spec"
    n = 1024
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = min(_timed(lambda: f(x)) for _ in range(5))
    return 2 * n**3 / best * len(devices), "measured matmul"


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def random_batch(cfg: ModelConfig, batch: int, seq_len: int, seed: int = 0) -> Batch:
    """Full rows: a quarter prompt (`loss_start`), the rest completion, old log-probs near uniform."""
    rs = np.random.RandomState(seed)
    tokens = rs.randint(1, cfg.vocab_size, (batch, seq_len)).astype(np.int32)
    loss_mask = np.zeros((batch, seq_len), bool)
    loss_mask[:, seq_len // 4:] = True  # the prompt is the first quarter
    old_logp = np.full((batch, seq_len), -np.log(cfg.vocab_size), np.float32)
    advantages = rs.choice([-1.0, 1.0], batch).astype(np.float32)
    return Batch(tokens, np.ones((batch, seq_len), bool), loss_mask, old_logp, advantages,
                 loss_start=seq_len // 4)


def run_one(cfg: ModelConfig, seq_len: int, a: argparse.Namespace, mesh) -> dict:
    """Compile, warm up and time the update step for one model and sequence length."""
    batch_size = max(a.tokens // seq_len, 1)
    micro = max(a.micro_tokens // seq_len, 1) if a.micro_tokens else batch_size
    cfg = dataclasses.replace(cfg, remat=not a.no_remat, max_seq_len=max(cfg.max_seq_len, seq_len))
    tx = make_optimizer(1e-6, max_grad_norm=1.0)
    objective = policy_gradient(cfg, variant="ppo_clip", clip_low=0.2, clip_high=0.28,
                                aggregation="token_mean", logprob_chunk=a.logprob_chunk)
    step, shardings = make_train_step(objective, tx, mesh, param_specs(cfg), micro_batch_size=micro)
    params = init_sharded(cfg, jax.random.key(0), mesh)
    state = init_train_state(params, tx, jax.random.key(1), shardings=shardings)
    batch = jax.device_put(random_batch(cfg, batch_size, seq_len), batch_sharding(mesh))
    prompt = batch.loss_start
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(a.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = median(times)
    if a.profile and not getattr(a, "_profiled", False):
        a._profiled = True
        try:
            with jax.profiler.trace(a.profile, create_perfetto_trace=True):
                state, metrics = step(state, batch)
                jax.block_until_ready(metrics)
            print_profile(a.profile, a.top, step_s)
        except (OSError, RuntimeError, ValueError, KeyError) as e:  # the timings stand without a profile
            print(f"profile failed: {type(e).__name__}: {e}", flush=True)
    tokens = batch_size * seq_len
    flops = model_flops(cfg, seq_len, seq_len - prompt) * batch_size
    return {"T": seq_len, "batch": batch_size, "micro": micro, "step s": step_s, "tokens/s": tokens / step_s,
            "TFLOP/s": flops / step_s / 1e12, "first step s": compile_s,
            "loss finite": bool(metrics["finite"]), "peak mem MiB": peak_device_memory_mb()}


# Kinds of op, matched in order against the lower-cased op name of the trace.
OP_KINDS = (("matmul", ("gemm", "cublas", "nvjet", "cutlass", "dot", "matmul", "wgmma", "sm90_xmma")),
            ("attention", ("flash", "fmha", "attention", "cudnn")),
            ("collective", ("all-reduce", "all-gather", "reduce-scatter", "nccl", "all_reduce")),
            ("copy/transpose", ("copy", "transpose", "memcpy", "memset", "dynamic-update-slice",
                                "dynamic_update_slice")),
            ("reduction", ("reduce",)),
            ("fusion (elementwise)", ("fusion", "loop_", "input_", "triton")))


def op_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in OP_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def trace_events(trace_dir: str) -> tuple[list[dict], dict[int, str]]:
    """The complete events of the newest perfetto trace under `trace_dir`, and process id -> name."""
    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"--profile: no *.trace.json.gz under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    complete = [e | {"thread": threads.get((e["pid"], e.get("tid")), "")} for e in events
                if e.get("ph") == "X" and "dur" in e]
    return complete, names


def device_op_table(trace_dir: str) -> tuple[list[dict], list[dict], float, str]:
    """Device time by op name and by op kind (ms), their total, and which processes were counted.

    On a GPU the device processes are those named like "/device:GPU:0"; their
    stream threads hold the kernels (the lines derived from them, such as
    "XLA Ops", are left out so that no time counts twice). Without one (CPU) the XLA ops of the host
    threads stand in, named by the op (events whose name starts with a
    framework prefix such as "$" or "Thunk" are left out).
    """
    events, names = trace_events(trace_dir)
    gpu = {pid for pid, n in names.items() if "/device:GPU" in n or "/device:TPU" in n}
    if gpu:
        ops = [e for e in events if e["pid"] in gpu]
        streams = [e for e in ops if e["thread"].startswith("Stream")]
        ops = streams or ops
        source = ", ".join(sorted(names[p] for p in gpu)) + (" streams" if streams else "")
    else:
        ops = [e for e in events if not e["name"].startswith(("$", "Thunk", "Py", "<"))]
        source = "host threads (no device processes in the trace)"
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in ops:
        by_name[e["name"]][0] += e["dur"] / 1e3
        by_name[e["name"]][1] += 1
    total = sum(v[0] for v in by_name.values()) or 1.0
    rows = sorted(({"op": n[:90], "kind": op_kind(n), "ms": v[0], "%": 100 * v[0] / total, "calls": v[1]}
                   for n, v in by_name.items()), key=lambda r: -r["ms"])
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for r in rows:
        kinds[r["kind"]][0] += r["ms"]
        kinds[r["kind"]][1] += r["calls"]
    kind_rows = sorted(({"kind": k, "ms": v[0], "%": 100 * v[0] / total, "calls": v[1]}
                        for k, v in kinds.items()), key=lambda r: -r["ms"])
    return rows, kind_rows, total, source


def print_profile(trace_dir: str, top: int, step_s: float) -> None:
    rows, kinds, total, source = device_op_table(trace_dir)
    print(f"profile of one step ({source}): {total:,.1f} ms of op time summed over streams "
          f"against a {step_s * 1e3:,.1f} ms step (median of the timed steps)")
    print_table(kinds, floatfmt=",.2f", title="device time by kind of op")
    print_table(rows[:top], floatfmt=",.2f", title=f"top {top} ops by device time")


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    mesh = make_mesh(MeshConfig(fsdp=-1))
    peak, source = peak_flops(a.peak_tflops)
    print(f"machine: {machine()}")
    print(f"peak: {peak / 1e12:,.1f} TFLOP/s over {len(jax.local_devices())} device(s) ({source}); "
          f"mesh {dict(mesh.shape)}; remat {'off' if a.no_remat else 'on'}", flush=True)
    models = {"tiny": TINY} if a.tiny else {name: MODELS[name] for name in a.models}
    rows = []
    for name, cfg in models.items():
        for seq_len in a.seqs:
            row = {"model": name} | run_one(cfg, seq_len, a, mesh)
            row["MFU %"] = 100 * row["TFLOP/s"] * 1e12 / peak
            rows.append(row)
            print(f"{name} T={seq_len}: {row['tokens/s']:,.0f} tokens/s, MFU {row['MFU %']:.1f}%", flush=True)
    print_table(rows, floatfmt=",.2f", title="update step, bf16 compute, float32 master weights")
    return rows


if __name__ == "__main__":
    main()
