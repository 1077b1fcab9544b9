"""Weight transfer and rollout/update overlap with the devices split between sampler and update.

    python benchmarks/bench_disaggregated.py [--d_model 256] [--n_layers 4] [--steps 4]

On CPU it runs on 8 simulated devices (split 4 + 4); on a GPU or TPU host on
the local devices (half and half). It prints the time of one transfer of the
policy from the training sub-mesh to the sampling sub-mesh (`jax.device_put`
to the sampler's shardings) and the time per step of the colocated loop, the
split synchronous loop and the split one-step off-policy loop (`run_loop`).
The "rollout" is a log-prob forward over the batch on the sampler's devices.
"""

from __future__ import annotations

import argparse
import os
import time

if "XLA_FLAGS" not in os.environ and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ouroboros_jax.batch import Batch  # noqa: E402
from ouroboros_jax.config import LOSS_PRESETS, MeshConfig, ModelConfig  # noqa: E402
from ouroboros_jax.disaggregated import DisaggregationConfig, run_loop, split_meshes, transfer_weights  # noqa: E402
from ouroboros_jax.models import init_params, param_shardings, param_specs, policy_logprobs  # noqa: E402
from ouroboros_jax.objectives import policy_gradient  # noqa: E402
from ouroboros_jax.sharding import batch_sharding  # noqa: E402
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step  # noqa: E402
from ouroboros_jax.trainer import policy_loss_settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    cfg = ModelConfig(vocab_size=512, d_model=args.d_model, n_layers=args.n_layers, n_heads=8, n_kv_heads=4,
                      head_dim=args.d_model // 8, d_ff=4 * args.d_model)
    n = len(jax.devices())
    print(f"{jax.devices()[0].platform}: {n} devices, {cfg.num_params():,} parameters, "
          f"batch {args.batch} x {args.length}")
    logp = jax.jit(lambda p, t, m: policy_logprobs(p, cfg, t, m, with_entropy=False)[0])
    rs = np.random.RandomState(0)
    tokens = rs.randint(1, cfg.vocab_size, (args.batch, args.length)).astype(np.int32)
    attention = np.ones_like(tokens, bool)
    loss_mask = np.arange(args.length) >= args.length // 2
    loss_mask = np.broadcast_to(loss_mask, tokens.shape)
    advantages = rs.randn(args.batch).astype(np.float32)

    for name, split in (("colocated", DisaggregationConfig()),
                        ("split sync", DisaggregationConfig(sampler_devices=n // 2)),
                        ("split off-policy", DisaggregationConfig(sampler_devices=n // 2, off_policy=True))):
        train_mesh, sampler_mesh = split_meshes(split, MeshConfig(), MeshConfig())
        loss = policy_loss_settings(LOSS_PRESETS["dr_grpo"], max_completion_len=args.length)
        tx = make_optimizer(1e-4)
        step, shardings = make_train_step(policy_gradient(cfg, **loss), tx, train_mesh, param_specs(cfg))
        state = init_train_state(init_params(cfg, jax.random.key(0)), tx, jax.random.key(0),
                                 shardings=shardings)
        sharding = batch_sharding(sampler_mesh)

        def produce(params, t, sharding=sharding):
            put = lambda x: jax.device_put(x, sharding)
            old = logp(params, put(tokens), put(attention))
            return Batch(put(tokens), put(attention), put(loss_mask), old, put(advantages))

        to_train = lambda b, m=train_mesh: jax.device_put(b, batch_sharding(m))
        train_logp = lambda p, b: logp(p, b.tokens, b.attention_mask)
        sampler_shardings = param_shardings(cfg, sampler_mesh)
        # Compile everything once.
        state, _ = run_loop(state, step, produce, sampler_shardings, 2, split, train_logp=train_logp,
                            to_train=to_train)
        if name == "split sync":
            times = [transfer_weights(state.params, sampler_shardings)[1] for _ in range(5)]
            print(f"  weight transfer {args.n_layers} layers, {cfg.num_params() * 4 / 2**20:.1f} MiB: "
                  f"median {1e3 * float(np.median(times)):.2f} ms")
        start = time.perf_counter()
        state, history = run_loop(state, step, produce, sampler_shardings, args.steps, split,
                                  train_logp=train_logp, to_train=to_train)
        jax.block_until_ready(state)
        per_step = (time.perf_counter() - start) / args.steps
        transfer = np.mean([h["time/transfer"] for h in history])
        print(f"  {name:17s} {1e3 * per_step:8.1f} ms/step (transfer in the loop {1e3 * transfer:.2f} ms)")


if __name__ == "__main__":
    main()
