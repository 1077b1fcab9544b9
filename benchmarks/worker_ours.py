"""Benchmark worker: ouroboros-jax runs the shared GRPO workload (see workload.py).

Started by `common.Worker` with one argument, the `workload.Settings` as JSON.
Each "step" request runs one unit of the chosen mode and answers a small dict:

- step: sample `group` completions per prompt (the jitted KV-cache sampler),
  score them with the shared reward, group advantages, one update;
- update: one update on the stored batch (batch.npz), the head on completion
  positions only (`loss_start`), as TRL's `logits_to_keep` does;
- generate: the sampler alone.

The update is the public `make_train_step` program: PPO-clip, per-sequence
token mean, no KL, AdamW with a global gradient-norm clip.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import serve  # noqa: E402
from workload import Settings, ids_to_text, load_batch, prompt_ids, reward  # noqa: E402

from ouroboros_jax.batch import Batch  # noqa: E402
from ouroboros_jax.config import MeshConfig  # noqa: E402
from ouroboros_jax.models import load_hf_checkpoint, param_specs  # noqa: E402
from ouroboros_jax.objectives import policy_gradient  # noqa: E402
from ouroboros_jax.rewards import VerifierReward  # noqa: E402
from ouroboros_jax.rollout import RolloutSettings, sample_and_score  # noqa: E402
from ouroboros_jax.sampling import generate  # noqa: E402
from ouroboros_jax.sharding import batch_sharding, make_mesh  # noqa: E402
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step  # noqa: E402
from verifiers import Verdict  # noqa: E402


def _update_program(s: Settings, cfg, params, mesh):
    tx = make_optimizer(s.learning_rate, max_grad_norm=s.max_grad_norm)
    objective = policy_gradient(cfg, variant="ppo_clip", clip_low=s.clip, clip_high=s.clip,
                                aggregation="seq_mean_token_mean")
    step, shardings = make_train_step(objective, tx, mesh, param_specs(cfg), micro_batch_size=s.micro)
    return step, init_train_state(params, tx, jax.random.key(s.seed), shardings=shardings)


def score(texts, golds) -> list[Verdict]:
    """The shared reward as verdicts (in this process, as TRL and Tunix call their reward functions)."""
    return [Verdict(reward(t), False) for t in texts]


def main() -> None:
    s = Settings.from_json(sys.argv[1])
    w = s.work
    cfg, params = load_hf_checkpoint(s.directory)
    cfg = dataclasses.replace(cfg, remat=s.remat)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    prompts = prompt_ids(w, cfg.vocab_size, s.seed)
    holder: dict = {"n": 0}

    if s.mode == "generate":
        def run():
            holder["n"] += 1
            out = generate(params, cfg, prompts, max_new_tokens=w.completion_len, num_samples=w.group,
                           temperature=1.0, rng=jax.random.key(holder["n"]), mesh=mesh,
                           prompt_len_buckets=(w.prompt_len,))
            return {"new_tokens": int(out.lengths.sum())}

    elif s.mode == "update":
        step, holder["state"] = _update_program(s, cfg, params, mesh)
        b = load_batch(s.directory)
        batch = Batch(b["tokens"], b["attention"], b["loss_mask"], b["old_logp"], b["advantages"],
                      loss_start=w.prompt_len)
        batch = jax.device_put(batch, batch_sharding(mesh))

        def run():
            holder["state"], metrics = step(holder["state"], batch)
            return {k: float(metrics[k]) for k in ("loss", "grad_norm")}

    else:
        step, holder["state"] = _update_program(s, cfg, params, mesh)
        settings = RolloutSettings(group_size=w.group, max_new_tokens=w.completion_len, temperature=1.0,
                                   prompt_len_buckets=(w.prompt_len,))
        examples = [SimpleNamespace(gold=None) for _ in range(w.prompts)]

        def run():
            holder["n"] += 1
            state = holder["state"]
            rollout = sample_and_score(state.params, cfg, examples, prompts, settings=settings,
                                       decode=ids_to_text, reward=VerifierReward(score), mesh=mesh,
                                       rng=jax.random.fold_in(jax.random.key(s.seed), holder["n"]))
            holder["state"], metrics = step(state, rollout.to_batch())
            return {"loss": float(metrics["loss"]), "reward": float(np.mean(rollout.rewards)),
                    "new_tokens": int(rollout.sample.lengths.sum())}

    serve({"step": run}, ready={"params": cfg.num_params()})


if __name__ == "__main__":
    main()
