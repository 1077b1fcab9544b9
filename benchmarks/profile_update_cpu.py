"""Where the CPU update step's time goes: per-operation profile, page faults and temp memory.

Builds the side-by-side benchmark's model shape (random weights; see
workload.py) and our update program exactly as `worker_ours.py` runs it
(PPO-clip, per-sequence token mean, no KL, AdamW, head on completion
positions only), then prints

- a summary: median step time, minor page faults, user and system CPU time
  per step, and the program's preallocated temp buffer (XLA's own
  `memory_analysis`);
- a table of the operations that took the most time over a few profiled
  steps (XLA's thunk names, with each one's shape and the JAX op it came
  from), and the same time summed by kind of operation.

Operation times add up to more than the step: XLA's CPU runtime runs
independent operations at the same time, each on fewer threads.

    python benchmarks/profile_update_cpu.py              # the run_cpu.py update shape, ~1 minute
    python benchmarks/profile_update_cpu.py --tiny       # a smoke run
"""

from __future__ import annotations

import os

# Per-operation trace events must be switched on before JAX starts its CPU client.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import format_table, machine  # noqa: E402
from workload import ModelShape, Settings, Workload, model_config  # noqa: E402

from ouroboros_jax.batch import Batch  # noqa: E402
from ouroboros_jax.config import MeshConfig  # noqa: E402
from ouroboros_jax.models import init_params, param_specs  # noqa: E402
from ouroboros_jax.objectives import policy_gradient  # noqa: E402
from ouroboros_jax.sharding import make_mesh  # noqa: E402
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step  # noqa: E402

# Trace events that are not one XLA operation: runtime scopes, Python frames, and
# loops (a while event spans its body's operations, which have events of their own).
_NOT_OPS = ("ThunkExecutor", "$", "np.asarray", "Slinky", "PjitFunction", "ParseArguments", "while")


def _is_op(name: str) -> bool:
    return "::" not in name and not name.startswith(_NOT_OPS)


def parse_args(argv=None) -> argparse.Namespace:
    shape, work = ModelShape(), Workload()  # the side-by-side benchmark's defaults
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("vocab", "d_model", "layers", "heads", "kv_heads", "d_ff"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(shape, name))
    for name in ("prompts", "group", "prompt_len", "completion_len"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(work, name))
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one untimed)")
    p.add_argument("--profiled-steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25, help="operations listed")
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch (smoke run)")
    args = p.parse_args(argv)
    if args.tiny:
        args.vocab, args.d_model, args.layers, args.heads, args.kv_heads, args.d_ff = 128, 32, 2, 2, 1, 64
        args.prompts, args.group, args.prompt_len, args.completion_len = 2, 2, 4, 8
        args.steps, args.profiled_steps = 2, 1
    args.shape = ModelShape(args.vocab, args.d_model, args.layers, args.heads, args.kv_heads, args.d_ff)
    args.work = Workload(args.prompts, args.group, args.prompt_len, args.completion_len)
    return args


def build(shape: ModelShape, work: Workload):
    """The update program as worker_ours.py builds it, its state, and one batch of the benchmark's layout."""
    cfg = model_config(shape, work.seq_len)
    settings = Settings(directory="", mode="update", work=work)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    tx = make_optimizer(settings.learning_rate, max_grad_norm=settings.max_grad_norm)
    objective = policy_gradient(cfg, variant="ppo_clip", clip_low=settings.clip, clip_high=settings.clip,
                                aggregation="seq_mean_token_mean")
    step, shardings = make_train_step(objective, tx, mesh, param_specs(cfg))
    state = init_train_state(init_params(cfg, jax.random.key(0)), tx, jax.random.key(0), shardings=shardings)
    B, P, T = work.rows, work.prompt_len, work.seq_len
    rng = np.random.default_rng(0)
    loss_mask = np.zeros((B, T), bool)
    loss_mask[:, P:] = True
    batch = Batch(jnp.asarray(rng.integers(1, shape.vocab, (B, T)), jnp.int32), jnp.ones((B, T), bool),
                  jnp.asarray(loss_mask), jnp.asarray(rng.normal(size=(B, T)) - 9.0, jnp.float32),
                  jnp.asarray(rng.normal(size=B), jnp.float32), loss_start=P)
    return step, state, batch


def temp_bytes(compiled) -> int | None:
    """Size of the program's preallocated temp buffer, from XLA's memory analysis."""
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def timed_steps(step, state, batch, n: int):
    """Run n steps; returns the state, per-step times and per-step faults / CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        float(metrics["loss"])
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    per = {"minor faults": (after.ru_minflt - before.ru_minflt) / n,
           "user s": (after.ru_utime - before.ru_utime) / n,
           "system s": (after.ru_stime - before.ru_stime) / n}
    return state, times, per


def op_times(trace_dir: str, steps: int) -> dict[str, float]:
    """Milliseconds per step of each XLA operation in a perfetto trace."""
    path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    total: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and _is_op(e["name"]):
            total[e["name"]] += e["dur"] / 1000.0 / steps
    return dict(total)


def op_descriptions(compiled) -> dict[str, tuple[str, str]]:
    """Shape and originating JAX op of every instruction in the optimised HLO, by name."""
    text = compiled.as_text()
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if m:
            op = re.search(r'op_name="([^"]+)"', line)
            out[m.group(1)] = (m.group(2).split("{")[0], op.group(1).split("/")[-1] if op else "")
    return out


def kind(name: str) -> str:
    """An operation name without its number: 'ynn_fusion.27' -> 'ynn_fusion'."""
    return re.sub(r"\.\d+$", "", name)


def main(argv=None) -> dict:
    args = parse_args(argv)
    step, state, batch = build(args.shape, args.work)
    state, first, _ = timed_steps(step, state, batch, 1)
    state, times, per = timed_steps(step, state, batch, args.steps)
    compiled = step.jitted.lower(state, batch).compile()  # the same program, compiled ahead of time
    temp = temp_bytes(compiled)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            state, _, _ = timed_steps(step, state, batch, args.profiled_steps)
        ops = op_times(trace_dir, args.profiled_steps)
    described = op_descriptions(compiled)

    tokens = args.work.tokens
    summary = {"step s": statistics.median(times), "tokens/s": tokens / statistics.median(times),
               "first step s": first[0], **per, "temp MiB": None if temp is None else temp / 2**20}
    print(f"machine: {machine()}")
    print(f"model: {args.shape.describe()}")
    print(f"workload: {args.work.describe()}")
    print(format_table([summary], floatfmt={"step s": ",.3f", "tokens/s": ",.1f", "first step s": ",.1f",
                                            "minor faults": ",.0f", "user s": ",.3f", "system s": ",.3f",
                                            "temp MiB": ",.1f"}))
    total = sum(ops.values()) or 1.0
    rows = [{"op": n, "ms/step": t, "share": t / total, "shape": described.get(n, ("", ""))[0],
             "from": described.get(n, ("", ""))[1]} for n, t in sorted(ops.items(), key=lambda x: -x[1])]
    print(f"\noperations (top {args.top}; op times sum to {total:,.1f} ms/step)")
    print(format_table(rows[:args.top], floatfmt={"ms/step": ",.1f", "share": ".3f"}))
    by_kind: collections.Counter = collections.Counter()
    for n, t in ops.items():
        by_kind[kind(n)] += t
    print("\nby kind of operation")
    print(format_table([{"kind": k, "ms/step": t, "share": t / total} for k, t in by_kind.most_common(12)],
                       floatfmt={"ms/step": ",.1f", "share": ".3f"}))
    return {"summary": summary, "ops": rows, "by_kind": dict(by_kind)}


if __name__ == "__main__":
    main()
