"""Sampler throughput on CPU, side by side with `transformers` `generate`.

One tiny Qwen2 model (random weights, float32) is built with `transformers`,
saved, and loaded into ours, so both run the same weights on the same CPU in one
process. For each (batch, prompt length, new tokens) the two engines run in
alternation, each sampling at temperature 1 without truncation and without
stop tokens (every row makes all its tokens). Times are the best of the
repeats: on a shared machine interference only ever adds time.

    prefill tok/s = batch * prompt / time(max_new_tokens=1)
    decode tok/s  = batch * (new - 1) / (time(new) - time(1))

Ours runs through the public `generate` (host packing, one compiled program,
results copied back to numpy), compiled before timing.

    python benchmarks/bench_sampler.py            # about 3 minutes on 2 cores
    python benchmarks/bench_sampler.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# torch's OpenMP threads wait passively: spin-waiting on a shared machine makes
# `generate` several times slower (see peers.worker_env). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import interleaved_times, machine, peak_host_memory_mb, print_table  # noqa: E402
from workload import hf_generation_config  # noqa: E402

from ouroboros_jax.models import load_hf_checkpoint  # noqa: E402
from ouroboros_jax.sampling import generate  # noqa: E402

HF_SHAPE = dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rope_theta=1_000_000.0, tie_word_embeddings=True)


def build_models(directory: Path):
    """A random transformers Qwen2 model and the same weights loaded into ours."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**HF_SHAPE)).float().eval()
    model.save_pretrained(directory, safe_serialization=True)
    cfg, params = load_hf_checkpoint(directory)
    return model, cfg, params


def engines(model, cfg, params, prompts: np.ndarray, new_tokens: int):
    """Zero-argument callables: (ours, theirs) x (full, prefill only)."""
    import torch

    full_cfg, one_cfg = hf_generation_config(new_tokens), hf_generation_config(1)
    ids = torch.tensor(prompts, dtype=torch.long)
    attn = torch.ones_like(ids)
    rng = jax.random.key(0)

    def ours(n):
        return lambda: generate(params, cfg, prompts, max_new_tokens=n, temperature=1.0, rng=rng).tokens

    def theirs(gen):
        def call():
            with torch.inference_mode():
                return model.generate(ids, attention_mask=attn, generation_config=gen)
        return call

    return {"ours": ours(new_tokens), "hf": theirs(full_cfg),
            "ours_prefill": ours(1), "hf_prefill": theirs(one_cfg)}


def run_case(model, cfg, params, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    prompts = np.random.RandomState(batch).randint(1, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    t = {k: min(v) for k, v in interleaved_times(engines(model, cfg, params, prompts, new_tokens),
                                                    repeats=repeats).items()}
    decode = {k: batch * (new_tokens - 1) / max(t[k] - t[f"{k}_prefill"], 1e-9) for k in ("ours", "hf")}
    return {"batch": batch, "prompt": prompt_len, "new": new_tokens,
            "prefill ours": batch * prompt_len / t["ours_prefill"],
            "prefill hf": batch * prompt_len / t["hf_prefill"],
            "decode ours": decode["ours"], "decode hf": decode["hf"],
            "decode x": decode["ours"] / decode["hf"],
            "end-to-end x": t["hf"] / t["ours"]}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small cases, one repeat")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        cases, repeats = [(8, 16, 8)], 1
    else:
        cases = [(1, 64, 32), (8, 64, 32), (64, 64, 32), (64, 256, 32)]
        repeats = args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        model, cfg, params = build_models(Path(tmp))
    rows = [run_case(model, cfg, params, *case, repeats=repeats) for case in cases]
    print_table(rows, title=(f"tokens/s, ours vs transformers generate; {cfg.num_params() / 1e6:.1f}M "
                             f"params float32; {machine()}; peak RSS {peak_host_memory_mb():,.0f} MiB"))
    return rows


if __name__ == "__main__":
    main()
