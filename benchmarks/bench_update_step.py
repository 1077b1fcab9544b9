"""Update-step throughput and peak memory on CPU, side by side with TRL's GRPOTrainer (and Tunix).

One tiny Qwen2-shaped model (random weights, float32) is saved once as a
Hugging Face checkpoint; ours, TRL's `GRPOTrainer` and, when asked, Tunix's
GRPO learner load it and run the same GRPO update on the same stored batch:
prompt + completion tokens, completion mask, old log-probs, group-normalised
advantages, PPO-clip 0.2, per-sequence token-mean loss (TRL `loss_type="grpo"`,
Tunix `sequence-mean-token-mean`), no KL term, AdamW, global gradient-norm clip
1.0, one optimizer step per batch. See workload.py for the files and
worker_*.py for how each library runs its update (TRL: its own training_step
with generation bypassed, then the Hugging Face Trainer's optimizer step;
Tunix: `rl_cluster.update_actor`; ours: the public `make_train_step` program).

Each library runs in its own worker process so that each one's peak resident
memory is its own; the parent times them in alternation, one update at a time,
so a busy phase of a shared machine hits all of them (peers.py).

    tokens/s = batch * (prompt + completion) / median update time

The first update of each library starts from the same weights on the same
batch, so their losses and gradient norms should agree (columns `loss 1`, `|g| 1`).

    python benchmarks/bench_update_step.py             # a few minutes on 2 cores
    python benchmarks/bench_update_step.py --quick     # a smoke run
    python benchmarks/bench_update_step.py --libraries ours,trl,tunix --tunix-python /path/to/python
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, print_table  # noqa: E402
from peers import COLUMNS, FLOATFMT, add_library_args, find_libraries, measure  # noqa: E402
from workload import ModelShape, Settings, Workload, make_checkpoint, make_update_batch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    p.add_argument("--group", type=int, default=4, help="completions per prompt")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=192)
    p.add_argument("--micro", type=int, default=0, help="micro-batch size (0: the whole batch)")
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=704)
    p.add_argument("--remat", action="store_true",
                   help="activation checkpointing everywhere (TRL's default is on; ours is off)")
    p.add_argument("--repeats", type=int, default=5, help="timed updates per library")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates per library after the first")
    p.add_argument("--quick", action="store_true", help="a small model and batch, 2 repeats")
    add_library_args(p, default="ours,trl")
    a = p.parse_args(argv)
    if a.quick:
        a.prompts, a.group, a.prompt_len, a.completion_len = 2, 4, 16, 48
        a.vocab, a.d_model, a.layers, a.d_ff, a.repeats = 2048, 128, 2, 384, 2
    try:
        a.shape = ModelShape(vocab=a.vocab, d_model=a.d_model, layers=a.layers, heads=a.heads,
                             kv_heads=a.kv_heads, d_ff=a.d_ff)
        a.work = Workload(a.prompts, a.group, a.prompt_len, a.completion_len)
        Settings(directory="", mode="update", work=a.work, micro_batch=a.micro)
    except ValueError as e:
        p.error(str(e))
    return a


def first_update(row: dict, key: str) -> float | None:
    """The first update's loss or gradient norm (Tunix reports its metrics one step late)."""
    for info, name in ((row["_first"], key), (row["_last"], f"{key}_1")):
        if info and name in info:
            return float(info[name])
    return None


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    libraries, notes = find_libraries(a.libraries, a.tunix_python)
    print(f"machine: {machine()}")
    for note in notes:
        print(note)
    print(f"model: {a.shape.describe()}; remat {'on' if a.remat else 'off'}")
    print(f"batch: {a.work.describe()} (T={a.work.seq_len}), micro-batch {a.micro or a.work.rows}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        make_checkpoint(directory, a.shape, max_seq_len=a.work.seq_len)
        make_update_batch(directory, a.work)
        settings = Settings(directory=str(directory), mode="update", work=a.work, micro_batch=a.micro,
                            remat=a.remat)
        rows = measure(libraries, settings, repeats=a.repeats, warmup=a.warmup, log_dir=Path(tmp))
    for r in rows:
        r["loss 1"], r["|g| 1"] = first_update(r, "loss"), first_update(r, "grad_norm")
    print_table(rows, [*COLUMNS, "loss 1", "|g| 1"], floatfmt=FLOATFMT | {"loss 1": ".5f", "|g| 1": ".4f"},
                title=f"update step, median of {a.repeats}; load {rows[0]['load']:.1f}")
    return rows


if __name__ == "__main__":
    main()
