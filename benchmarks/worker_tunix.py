"""Benchmark worker: Tunix's GRPO learner (JAX, CPU) runs the shared GRPO workload (see workload.py).

Started by `common.Worker` with one argument, the `workload.Settings` as JSON,
usually under another interpreter (a virtual environment holding Tunix; see
run_cpu.py `--tunix-python`). It imports Tunix, JAX, numpy and transformers
(for the tokenizer), never ouroboros_jax.

The model is Tunix's own Qwen2 (`tunix.models.qwen2`), loaded from the shared
checkpoint with Tunix's safetensors loader; one CPU device, a (fsdp, tp) mesh
of 1 x 1, the actor and rollout colocated (they share weights, so no sync).

- step: one global step of `GRPOLearner.train`, Tunix's own loop: the vanilla
  rollout (Tunix's KV-cache sampler) on the prompts repeated `group` times,
  the shared reward, group advantages, then the actor's update. The loop runs
  in a thread and pulls its prompts from an iterator that hands it one batch
  per request; a step counts as done when the learner asks for the next batch
  and the actor's parameters are computed.
- update: `rl_cluster.update_actor` on the stored batch as a `TrainExample`
  (old log-probs given, no reference model), the GRPO loss Tunix registers.
- generate: Tunix's `Sampler` alone on the repeated prompts.
"""

from __future__ import annotations

import queue
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from common import serve  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.generate import sampler as sampler_lib  # noqa: E402
from tunix.models.qwen2 import model as qwen2_model  # noqa: E402
from tunix.models.qwen2 import params as qwen2_params  # noqa: E402
from tunix.rl import common as rl_common  # noqa: E402
from tunix.rl import rl_cluster as rl_cluster_lib  # noqa: E402
from tunix.rl.grpo import grpo_learner  # noqa: E402
from tunix.rl.rollout import base_rollout  # noqa: E402
from tunix.utils import mesh as mesh_lib  # noqa: E402
from workload import Settings, hf_tokenizer, load_batch, prompt_texts, read_hf_config, reward  # noqa: E402

SEEN: dict[str, list] = {"rewards": [], "completions": []}


def reward_fn(prompts, completions, **_) -> list[float]:
    SEEN["rewards"], SEEN["completions"] = [reward(c) for c in completions], list(completions)
    return list(SEEN["rewards"])


def model_config(directory: str, remat: bool) -> qwen2_model.ModelConfig:
    hf = read_hf_config(directory)
    return qwen2_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf["rope_theta"]), norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=hf["tie_word_embeddings"],
        remat_config=qwen2_model.RematConfig.BLOCK if remat else qwen2_model.RematConfig.NONE)


def make_learner(s: Settings, model, tokenizer, mesh, eos_id: int) -> grpo_learner.GRPOLearner:
    w = s.work
    roles = rl_cluster_lib.Role
    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.chain(optax.clip_by_global_norm(s.max_grad_norm),
                                    optax.adamw(s.learning_rate, weight_decay=0.0)),
        eval_every_n_steps=10**9, max_steps=10**9, mini_batch_size=w.prompts,
        train_micro_batch_size=max(1, s.micro // w.group), metrics_logging_options=None,
    )
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=w.completion_len, max_prompt_length=w.prompt_len,
        kv_cache_size=w.prompt_len + w.completion_len, temperature=1.0, top_p=1.0, top_k=None,
        eos_tokens=[eos_id])
    cluster = rl_cluster_lib.RLCluster(
        actor=model, reference=None, tokenizer=tokenizer,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
            rollout_engine="vanilla", offload_to_cpu=False, training_config=training, rollout_config=rollout))
    algo = grpo_learner.GRPOConfig(num_generations=w.group, num_iterations=1, beta=0.0, epsilon=s.clip,
                                   loss_agg_mode="sequence-mean-token-mean")
    return grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=reward_fn)


def wait_for(model) -> None:
    jax.block_until_ready(nnx.state(model))


class StepFeeder:
    """Runs `learner.train` in a thread, handing it one prompt batch per `step()` call."""

    def __init__(self, learner: grpo_learner.GRPOLearner, prompts: list[str]):
        self.learner, self.prompts = learner, prompts
        self.todo: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.started = False

    def _batches(self):
        first = True
        while True:
            if not first:  # the learner wants the next batch: the previous step has been dispatched
                wait_for(self.learner.rl_cluster.actor_trainer.model)
                self.done.put(None)
            first = False
            if self.todo.get() is None:
                return
            yield {"prompts": np.array(self.prompts)}  # as a grain data set yields them

    def _train(self) -> None:
        try:
            self.learner.train(self._batches())
        except BaseException as e:  # hand it to the request that waits
            self.done.put(e)

    def step(self) -> dict:
        if not self.started:
            self.thread.start()
            self.started = True
        self.todo.put(True)
        error = self.done.get()
        if error is not None:
            raise error
        return {"reward": float(np.mean(SEEN["rewards"])),
                "new_tokens": sum(len(c.split()) for c in SEEN["completions"])}


def train_example(s: Settings) -> rl_common.TrainExample:
    b = load_batch(s.directory)
    P = s.work.prompt_len
    return rl_common.TrainExample(
        prompt_ids=jnp.asarray(b["tokens"][:, :P]), prompt_mask=jnp.asarray(b["attention"][:, :P]),
        completion_ids=jnp.asarray(b["tokens"][:, P:]), completion_mask=jnp.asarray(b["loss_mask"][:, P:]),
        advantages=jnp.asarray(b["advantages"]), ref_per_token_logps=None,
        old_per_token_logps=jnp.asarray(b["old_logp"][:, P:]))


def main() -> None:
    s = Settings.from_json(sys.argv[1])
    w = s.work
    cfg = model_config(s.directory, s.remat)
    mesh = mesh_lib.create_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])
    model = qwen2_params.create_model_from_safe_tensors(s.directory, cfg, mesh)
    tokenizer = hf_tokenizer(s.directory)
    eos_id = tokenizer.eos_token_id  # one past the model's vocabulary: never sampled
    prompts = prompt_texts(w, cfg.vocab_size, s.seed)
    counter = {"n": 0}

    if s.mode == "generate":
        sampler = sampler_lib.Sampler(model, tokenizer, sampler_lib.CacheConfig(
            cache_size=w.prompt_len + w.completion_len, num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim))
        repeated = [p for p in prompts for _ in range(w.group)]

        def run():
            counter["n"] += 1
            out = sampler(input_strings=repeated, max_generation_steps=w.completion_len,
                          max_prompt_length=w.prompt_len, temperature=1.0, top_p=1.0, eos_tokens=[eos_id],
                          seed=counter["n"])
            return {"new_tokens": sum(len(t) for t in out.tokens)}

    elif s.mode == "update":
        learner = make_learner(s, model, tokenizer, mesh, eos_id)
        cluster = learner.rl_cluster
        example = train_example(s)

        logger = cluster.actor_trainer.metrics_logger

        def run():
            cluster.update_actor([example], None)
            wait_for(cluster.actor_trainer.model)
            # Tunix writes a step's metrics one step late: the first update's show up after the second.
            if logger.metric_exists("actor", "loss", "train"):
                return {"loss_1": float(logger.get_metric_history("actor", "loss", "train")[0]),
                        "grad_norm_1": float(logger.get_metric_history("actor", "grad_norm", "train")[0])}
            return {}

    else:
        feeder = StepFeeder(make_learner(s, model, tokenizer, mesh, eos_id), prompts)
        run = feeder.step

    serve({"step": run}, ready={"params": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))})


if __name__ == "__main__":
    main()
