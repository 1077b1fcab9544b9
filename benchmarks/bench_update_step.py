"""Update-step throughput and peak memory on CPU, side by side with TRL's GRPOTrainer.

One tiny Qwen2-shaped model (random weights, float32) is saved once as a
Hugging Face checkpoint; ours and TRL's `GRPOTrainer` both load it and run the
same GRPO update on the same batch: prompt + completion tokens, completion
mask, stored old log-probs, group-normalised advantages, PPO-clip 0.2, per
sequence token-mean loss (TRL `loss_type="grpo"`), no KL term, AdamW, global
gradient-norm clip 1.0, one optimizer step per batch.

TRL's update is driven through its own code path without generation:
`trainer.training_step(model, inputs)` (its `compute_loss`, fused chunked
log-prob head and backward) with `_prepare_inputs` replaced by the identity,
then the optimizer step the Hugging Face Trainer loop takes (gradient clip,
`optimizer.step`, scheduler step, `zero_grad`). Ours is the public
`make_train_step` program, compiled before timing.

Each framework runs in its own worker process so that each one's peak
resident memory is its own; the parent times them in alternation, one update
at a time, so a busy phase of a shared machine hits both.

    tokens/s = batch * (prompt + completion) / median update time

The first update of each side starts from the same weights on the same batch,
so their losses and gradient norms should agree (columns `loss 1`, `|g| 1`).

    python benchmarks/bench_update_step.py             # a few minutes on 2 cores
    python benchmarks/bench_update_step.py --quick     # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import interleaved_times, machine, median, peak_host_memory_mb, print_table  # noqa: E402

CLIP = 0.2


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
                   help="activation checkpointing on both sides (TRL's default is on; ours is off)")
    p.add_argument("--repeats", type=int, default=5, help="timed updates per framework")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates per framework after setup")
    p.add_argument("--quick", action="store_true", help="a small model and batch, 2 repeats")
    a = p.parse_args(argv)
    if a.quick:
        a.prompts, a.group, a.prompt_len, a.completion_len = 2, 4, 16, 48
        a.vocab, a.d_model, a.layers, a.d_ff, a.repeats = 2048, 128, 2, 384, 2
    a.batch = a.prompts * a.group
    a.micro = a.micro or a.batch
    if a.batch % a.micro:
        p.error(f"--micro {a.micro} must divide the batch {a.batch}")
    return a


# ---------------------------------------------------------------------------
# The shared model and batch (parent process)


def make_inputs(a: argparse.Namespace, directory: Path) -> None:
    """Save the checkpoint and the batch both workers read."""
    import jax

    from ouroboros_jax.config import ModelConfig
    from ouroboros_jax.models import export_hf_checkpoint, init_params, policy_logprobs

    cfg = ModelConfig(family="qwen2", vocab_size=a.vocab, d_model=a.d_model, n_layers=a.layers,
                      n_heads=a.heads, n_kv_heads=a.kv_heads, head_dim=a.d_model // a.heads, d_ff=a.d_ff,
                      rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=True,
                      max_seq_len=a.prompt_len + a.completion_len)
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    export_hf_checkpoint(params, cfg, directory / "model")

    rs = np.random.RandomState(0)
    B, P, C = a.batch, a.prompt_len, a.completion_len
    # Full-length prompts: Hugging Face models number positions 0..T-1 through
    # left padding while ours skip pads, so padding-free prompts keep the two
    # first-update losses comparable. Completions end at varying lengths.
    tokens = rs.randint(1, a.vocab, (B, P + C)).astype(np.int32)
    lengths = rs.randint(C // 4, C + 1, B)
    completion_mask = np.arange(C)[None] < lengths[:, None]
    tokens[:, P:] = np.where(completion_mask, tokens[:, P:], 0)
    attention = np.concatenate([np.ones((B, P), bool), completion_mask], axis=1)
    loss_mask = np.concatenate([np.zeros((B, P), bool), completion_mask], axis=1)
    rewards = rs.randint(0, 2, (a.prompts, a.group)).astype(np.float32)
    centred = rewards - rewards.mean(1, keepdims=True)
    advantages = (centred / (rewards.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    logp, _ = jax.jit(lambda p: policy_logprobs(p, cfg, tokens, attention, with_entropy=False))(params)
    # The sampler's log-probs: the policy's own, slightly off (as after an
    # earlier update), so some ratios leave the clip range.
    old_logp = np.where(loss_mask, np.asarray(logp) + 0.1 * rs.randn(B, P + C), 0.0).astype(np.float32)
    np.savez(directory / "batch.npz", tokens=tokens, attention=attention, loss_mask=loss_mask,
             advantages=advantages.astype(np.float32), old_logp=old_logp)


def load_batch(directory: Path) -> dict[str, np.ndarray]:
    with np.load(directory / "batch.npz") as f:
        return dict(f)


# ---------------------------------------------------------------------------
# Workers: set up, then run one update per "step" message


def _serve(conn, update, first) -> None:
    """Answer 'step' with one finished update, 'stats' with peak memory, 'stop' to end."""
    rss_ready = peak_host_memory_mb()
    conn.send(("ready", first))
    while True:
        msg = conn.recv()
        if msg == "step":
            update()
            conn.send("done")
        elif msg == "stats":
            conn.send({"peak": peak_host_memory_mb(), "ready": rss_ready})
        else:
            return


def jax_worker(conn, a: argparse.Namespace, directory: Path) -> None:
    import jax

    from ouroboros_jax.config import MeshConfig
    from ouroboros_jax.models import load_hf_checkpoint
    from ouroboros_jax.sharding import make_mesh
    from ouroboros_jax.train_step import Batch, init_train_state, make_optimizer, make_train_step

    cfg, params = load_hf_checkpoint(directory / "model")
    cfg = dataclasses.replace(cfg, remat=a.remat)
    b = load_batch(directory)
    batch = Batch(b["tokens"], b["attention"], b["loss_mask"], b["old_logp"], b["advantages"])
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    tx = make_optimizer(1e-6, max_grad_norm=1.0)
    step, shardings = make_train_step(cfg, tx, mesh, micro_batch_size=a.micro, variant="ppo_clip",
                                      clip_low=CLIP, clip_high=CLIP, aggregation="seq_mean_token_mean")
    state = init_train_state(params, tx, jax.random.key(0), shardings=shardings)
    batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    holder = {"state": state}

    def update():
        # The head runs on completion positions only, as TRL's logits_to_keep does.
        holder["state"], metrics = step(holder["state"], batch, loss_start=a.prompt_len)
        return jax.block_until_ready(metrics)

    metrics = update()  # compiles
    _serve(conn, update, {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])})


def trl_worker(conn, a: argparse.Namespace, directory: Path) -> None:
    import datasets
    import tokenizers
    import torch
    import transformers
    import trl

    transformers.utils.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory / "model", dtype=torch.float32)
    # GRPOTrainer wants a tokenizer; the update never uses it.
    words = {f"t{i}": i for i in range(a.vocab)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="t1")),
        pad_token="t0", eos_token="t1")
    args = trl.GRPOConfig(
        output_dir=str(directory / "trl"), per_device_train_batch_size=a.micro,
        gradient_accumulation_steps=a.batch // a.micro, num_generations=a.group,
        max_completion_length=a.completion_len, loss_type="grpo", beta=0.0, epsilon=CLIP,
        learning_rate=1e-6, max_grad_norm=1.0, use_cpu=True, bf16=False, report_to=[],
        logging_steps=10**9, save_strategy="no", disable_dropout=True,
        gradient_checkpointing=a.remat,
    )
    trainer = trl.GRPOTrainer(model=model, args=args, processing_class=tokenizer,
                              reward_funcs=lambda completions, **_: [0.0] * len(completions),
                              train_dataset=datasets.Dataset.from_dict({"prompt": ["x"] * a.batch}))
    trainer._prepare_inputs = lambda inputs: inputs  # the batch is given: no generation
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = a.batch // a.micro  # set by Trainer's own loop
    model = trainer.model
    b = {k: torch.from_numpy(v) for k, v in load_batch(directory).items()}
    P = a.prompt_len
    inputs = {
        "prompt_ids": b["tokens"][:, :P].long(), "prompt_mask": b["attention"][:, :P].long(),
        "completion_ids": b["tokens"][:, P:].long(), "completion_mask": b["loss_mask"][:, P:].long(),
        "advantages": b["advantages"], "old_per_token_logps": b["old_logp"][:, P:],
    }
    micro_batches = [{k: v[i::a.batch // a.micro] for k, v in inputs.items()}
                     for i in range(a.batch // a.micro)]

    # What the Trainer loop passes: completion tokens in the accumulation window
    # (only the token-sum losses read it).
    num_items = inputs["completion_mask"].sum()

    def update():
        loss = sum(float(trainer.training_step(model, mb, num_items)) for mb in micro_batches)
        grad_norm = trainer.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return loss, float(grad_norm)

    loss, grad_norm = update()
    _serve(conn, update, {"loss": loss, "grad_norm": grad_norm})


# ---------------------------------------------------------------------------


def start(target, a, directory) -> tuple[mp.Process, object, dict, float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    t0 = time.perf_counter()
    proc = ctx.Process(target=target, args=(child, a, directory), daemon=True)
    proc.start()
    child.close()  # so that a worker that dies reads as EOF here instead of a hang
    try:
        tag, first = parent.recv()
    except EOFError:
        proc.join()
        raise SystemExit(f"{target.__name__} died during setup (exit code {proc.exitcode})") from None
    return proc, parent, first, time.perf_counter() - t0


def main(argv=None) -> None:
    a = parse_args(argv)
    # Workers see one CPU device whatever the caller's XLA_FLAGS (tests set 8).
    os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                       if "device_count" not in f)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    T = a.prompt_len + a.completion_len
    print(f"machine: {machine()}")
    print(f"model: qwen2-shaped, vocab {a.vocab}, d_model {a.d_model}, {a.layers} layers, "
          f"{a.heads}/{a.kv_heads} heads, d_ff {a.d_ff}; float32; remat {'on' if a.remat else 'off'}")
    print(f"batch: {a.prompts} prompts x {a.group} completions, prompt {a.prompt_len} + completion "
          f"<= {a.completion_len} tokens (T={T}), micro-batch {a.micro}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        make_inputs(a, directory)
        workers = {"ouroboros-jax": start(jax_worker, a, directory),
                   "trl GRPOTrainer": start(trl_worker, a, directory)}
        ask = lambda conn: (conn.send("step"), conn.recv())
        times = interleaved_times({name: (lambda c=w[1]: ask(c)) for name, w in workers.items()},
                                  repeats=a.repeats, warmup=a.warmup)
        rows = []
        for name, (proc, conn, first, setup_s) in workers.items():
            conn.send("stats")
            mem = conn.recv()
            conn.send("stop")
            proc.join(timeout=30)
            step_s = median(times[name])
            rows.append({"framework": name, "update s": step_s, "tokens/s": a.batch * T / step_s,
                         "peak RSS MiB": mem["peak"], "RSS after setup MiB": mem["ready"],
                         "setup s": setup_s, "loss 1": first["loss"], "|g| 1": first["grad_norm"]})
    ratio = rows[0]["tokens/s"] / rows[1]["tokens/s"]
    print_table(rows, floatfmt=",.3f", title=f"update step, median of {a.repeats} (ours / TRL: {ratio:.2f}x)")


if __name__ == "__main__":
    main()
