"""PPO with a critic beside GRPO: the full step's tokens/s on the CPU workload of `run_cpu.py`.

Both run in one process on the same Hugging Face checkpoint, prompts and
batch shape (`workload.py`), alternating one step at a time so machine load
hits both alike:

  grpo  sample + reward + group advantages + one update of the policy
        (the `worker_ours.py` step: PPO-clip 0.2, per-sequence token mean)
  ppo   sample + reward + reference log-probs + critic values + KL-shaped
        token rewards + GAE + one actor update + one critic update
        (`ouroboros_jax.ppo`, separate critic initialised from the policy)

One PPO epoch over one mini-batch and one GRPO update over the same 16 rows
(no micro-batches in either), so the difference is the critic's cost (its
forward for the values, its update) and the reference forward. tokens/s
counts every row's prompt + completion tokens per step; "update tokens/s" the
same tokens over the update phase alone.

Every phase is timed to the end of its work: the clock stops when the whole
new state is ready (`jax.block_until_ready`), not when one metric is. (Waiting
on the actor's loss alone, as an earlier version did, left the critic update,
dispatched asynchronously, running into the GRPO arm's next step, which made
PPO look faster than GRPO.) The two arms alternate and their order flips
every step; the first step of each compiles and is not timed.

    python benchmarks/bench_ppo_cpu.py                # about 3 minutes on 2 shared cores
    python benchmarks/bench_ppo_cpu.py --steps 10 --completion-len 256
    python benchmarks/bench_ppo_cpu.py --trl-python VENV/bin/python   # and TRL's PPOTrainer (trl==1.12.0)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from workload import ModelShape, Workload, ids_to_text, make_checkpoint, prompt_ids, reward  # noqa: E402

from ouroboros_jax.config import MeshConfig, PPOConfig  # noqa: E402
from ouroboros_jax.models import load_hf_checkpoint, param_specs  # noqa: E402
from ouroboros_jax.objectives import policy_gradient, ppo_actor  # noqa: E402
from ouroboros_jax.objectives.value import init_critic, value  # noqa: E402
from ouroboros_jax.ppo import PPOState, PPOSteps, build_batch, ppo_epochs  # noqa: E402
from ouroboros_jax.rewards import VerifierReward  # noqa: E402
from ouroboros_jax.rollout import RolloutSettings, sample_and_score  # noqa: E402
from ouroboros_jax.sharding import make_mesh  # noqa: E402
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step  # noqa: E402
from verifiers import Verdict  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each (after one warm-up step)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--trl-python", default="",
                        help="an interpreter with trl==1.12.0 (the last release with a PPOTrainer): also run "
                             "TRL's PPO on the same checkpoint and workload (worker_trl_ppo.py), after ours")
    args = parser.parse_args(argv)
    work = Workload(prompts=args.prompts, group=args.group, prompt_len=32, completion_len=args.completion_len)
    shape = ModelShape()
    tmp = tempfile.TemporaryDirectory()
    directory = make_checkpoint(Path(tmp.name), shape, max_seq_len=work.seq_len)
    cfg, params = load_hf_checkpoint(directory)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    prompts = prompt_ids(work, cfg.vocab_size, 0)
    examples = [SimpleNamespace(gold=None) for _ in range(work.prompts)]
    settings = RolloutSettings(group_size=work.group, max_new_tokens=work.completion_len, temperature=1.0,
                               prompt_len_buckets=(work.prompt_len,))
    score = VerifierReward(lambda texts, golds: [Verdict(reward(t), False) for t in texts])
    tx = make_optimizer(1e-6, max_grad_norm=1.0)
    copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)

    grpo_obj = policy_gradient(cfg, variant="ppo_clip", clip_low=0.2, clip_high=0.2,
                               aggregation="seq_mean_token_mean")
    grpo_fn, grpo_sh = make_train_step(grpo_obj, tx, mesh, param_specs(cfg))
    grpo_state = init_train_state(copy(params), tx, jax.random.key(0), shardings=grpo_sh)

    actor_fn, actor_sh = make_train_step(ppo_actor(cfg, aggregation="seq_mean_token_mean"), tx, mesh,
                                         param_specs(cfg), with_reference=True)
    critic_fn, critic_sh = make_train_step(value(cfg), tx, mesh, param_specs(cfg, head="score"))
    ppo_state = PPOState(
        init_train_state(copy(params), tx, jax.random.key(0), with_reference=True, shardings=actor_sh),
        init_train_state(init_critic(params), tx, jax.random.key(1), shardings=critic_sh))
    ppo_steps, ppo_cfg = PPOSteps(actor_fn, critic_fn, cfg), PPOConfig(enabled=True)
    holder = {"grpo": grpo_state, "ppo": ppo_state}

    def rollout(state_params, n):
        r = sample_and_score(state_params, cfg, examples, prompts, settings=settings, decode=ids_to_text,
                             reward=score, mesh=mesh, rng=jax.random.fold_in(jax.random.key(0), n))
        return jax.block_until_ready(r)

    # Each arm: (sample + reward, the batch for the update, the update), every phase waited for in
    # full (the whole new state, not one metric), so no work of one arm spills into the other's time.
    def grpo(n, clock):
        r = rollout(holder["grpo"].params, n)
        clock("sample")
        batch = r.to_batch()
        clock("prepare")
        holder["grpo"], _ = jax.block_until_ready(grpo_fn(holder["grpo"], batch))
        clock("update")

    def ppo(n, clock):
        r = rollout(holder["ppo"].params, n)
        clock("sample")
        batch, _ = build_batch(r.to_batch(), np.asarray(r.rewards).reshape(-1), holder["ppo"], cfg, ppo_cfg)
        batch = jax.block_until_ready(batch)
        clock("prepare")
        holder["ppo"], _ = jax.block_until_ready(ppo_epochs(
            ppo_steps, holder["ppo"], batch, epochs=1, mini_batch_size=work.rows,
            rng=np.random.default_rng(n)))
        clock("update")

    phases = ("sample", "prepare", "update")
    times = {a: {p: [] for p in (*phases, "step")} for a in ("grpo", "ppo")}
    arms = {"grpo": grpo, "ppo": ppo}
    for n in range(args.steps + 1):
        # The order flips every step: neither arm always runs right after the other.
        for name in ("grpo", "ppo") if n % 2 else ("ppo", "grpo"):
            marks = [time.perf_counter()]
            seen: dict[str, float] = {}

            def clock(phase, marks=marks, seen=seen):
                marks.append(time.perf_counter())
                seen[phase] = marks[-1] - marks[-2]

            arms[name](n, clock)
            if n:  # step 0 compiles every program of both arms
                for phase in phases:
                    times[name][phase].append(seen[phase])
                times[name]["step"].append(marks[-1] - marks[0])
    print(f"workload: {work.describe()}; model: {shape.describe()}; "
          f"{args.steps} timed steps each after 1 compile step, alternating, order flipped every step")
    med = {a: {p: float(np.median(v)) for p, v in t.items()} for a, t in times.items()}
    print("arm   step s  sample s  prepare s  update s  tokens/s  update tokens/s")
    for name in ("grpo", "ppo"):
        m = med[name]
        print(f"{name:5s} {m['step']:6.2f}  {m['sample']:8.2f}  {m['prepare']:9.3f}  {m['update']:8.2f}  "
              f"{work.tokens / m['step']:8.0f}  {work.tokens / m['update']:15.0f}")
    rate = {a: work.tokens / med[a]["step"] for a in med}
    update = {a: work.tokens / med[a]["update"] for a in med}
    print(f"benchmark ppo_step: grpo={rate['grpo']:.0f} ppo={rate['ppo']:.0f} "
          f"ppo/grpo={rate['ppo'] / rate['grpo']:.2f} update ppo/grpo={update['ppo'] / update['grpo']:.2f}")
    if args.trl_python:
        trl = run_trl_ppo(args.trl_python, directory, work, args.steps)
        step = float(np.median(trl["times"][1:]))  # the first PPO batch is not counted, as our compile step
        print(f"trl   {step:6.2f}  (PPOTrainer.train, {args.steps} timed batches after 1, not alternated; "
              f"trl {trl['trl']}, torch {trl['torch']}, transformers {trl['transformers']})  "
              f"tokens/s {work.tokens / step:.0f}")
        print(f"benchmark ppo_step_trl: ours={rate['ppo']:.0f} trl={work.tokens / step:.0f} "
              f"ours/trl={rate['ppo'] * step / work.tokens:.2f}")
    tmp.cleanup()


def run_trl_ppo(python: str, directory: Path, work: Workload, steps: int) -> dict:
    """TRL's PPOTrainer on the checkpoint in its own process (worker_trl_ppo.py); its JSON line."""
    worker = Path(__file__).resolve().parent / "worker_trl_ppo.py"
    argv = [python, str(worker), str(directory), "--steps", str(steps), "--prompts", str(work.prompts),
            "--group", str(work.group), "--prompt-len", str(work.prompt_len),
            "--completion-len", str(work.completion_len)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{\"times\"")]
    if done.returncode or not lines:
        raise SystemExit(f"worker_trl_ppo.py failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


if __name__ == "__main__":
    main()
