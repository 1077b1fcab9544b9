"""PPO with a critic (InstructGPT-style RLHF) on the trainer's rollouts.

One PPO round on a rollout:

1. the sequence scores (reward model, verifier, or both: the rollout's rewards)
   become per-token rewards with the k1 KL to the reference on every
   completion token (`algorithms.outcome_token_rewards`);
2. the critic's values of the rollout give GAE advantages and returns
   (`algorithms.gae_advantages`, gamma 1 and lambda 0.95 by default);
3. several epochs over shuffled mini-batches: the actor update
   (`objectives.value.ppo_actor`; with `ppo.ptx_coef` > 0 plus that times the
   likelihood loss of as many demonstration rows of `ppo.ptx_data`, PPO-ptx),
   then the critic update (`objectives.value.value`, its own optimizer) on the
   same mini-batch; with a shared backbone the value loss is part of the
   actor's loss and there is no critic state.

Every update runs through the one update step (`step.make_train_step`).
The trainer dispatches here when `cfg.ppo.enabled` (the `ppo` preset):
`compile_ppo` replaces its step compilation and `update` its update phase.

Dimension legend (docs/dimensions.md): B rows, T positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from ouroboros_jax.algorithms import gae_advantages, outcome_token_rewards
from ouroboros_jax.batch import Batch, pack_rows
from ouroboros_jax.config import ConfigError, ExperimentConfig, ModelConfig, PPOConfig
from ouroboros_jax.models import param_specs, policy_logprobs
from ouroboros_jax.models.transformer import Params
from ouroboros_jax.objectives import sft
from ouroboros_jax.objectives.base import Metrics, Objective
from ouroboros_jax.objectives.value import (
    PPOBatch,
    critic_values,
    init_critic,
    policy_and_values,
    ppo_actor,
    shared_param_specs,
    value,
    with_value_head,
)
from ouroboros_jax.step import TrainState, init_train_state, make_train_step


class PPOSteps(NamedTuple):
    """The compiled actor step, the critic step (None with a shared backbone), the policy's architecture,
    and for PPO-ptx the demonstration rows (host arrays) each actor update draws a mini-batch from."""

    actor: Any
    critic: Any
    model_config: ModelConfig
    ptx: Batch | None = None


class PPOState(NamedTuple):
    """The actor's training state (its reference inside) and the critic's (None with a shared backbone)."""

    actor: TrainState
    critic: TrainState | None

    @property
    def params(self) -> Params:
        """The policy's parameters (what the sampler and the evaluation read)."""
        return self.actor.params

    @property
    def step(self) -> Array:
        return self.actor.step


@flax.struct.dataclass
class PtxBatch:
    """A PPO mini-batch and a supervised mini-batch of as many rows, for PPO-ptx."""

    ppo: PPOBatch
    sft: Batch


def with_ptx(actor: Objective, supervised: Objective, coef: float) -> Objective:
    """PPO-ptx: `actor loss + coef * supervised loss` on a `PtxBatch` (InstructGPT's pretraining mix).

    Both terms run on the same parameters in one update; their metrics are
    kept side by side, the supervised ones prefixed `ptx_`.
    """
    if coef < 0:
        raise ValueError(f"ptx coefficient must be >= 0: {coef}")

    def normalizer(batch: PtxBatch) -> Any:
        return actor.normalizer(batch.ppo), supervised.normalizer(batch.sft)

    def loss(params, ref_params, batch: PtxBatch, counts) -> tuple[Float[Array, ""], Metrics]:
        a_loss, a_metrics = actor.loss(params, ref_params, batch.ppo, counts[0])
        s_loss, s_metrics = supervised.loss(params, None, batch.sft, counts[1])
        total = a_loss + coef * s_loss
        return total, a_metrics | {f"ptx_{k}": v for k, v in s_metrics.items()} | {"loss": total}

    def combine(metrics_M: Metrics, batch: PtxBatch) -> Metrics:
        ptx = {k: v for k, v in metrics_M.items() if k.startswith("ptx_")}
        rest = {k: v for k, v in metrics_M.items() if not k.startswith("ptx_")}
        out = actor.combine(rest, batch.ppo)
        ptx_out = supervised.combine({k[4:]: v for k, v in ptx.items()}, batch.sft)
        out |= {f"ptx_{k}": v for k, v in ptx_out.items()}
        return out

    return Objective(normalizer, loss, combine, uses_reference=actor.uses_reference)


def token_targets(
    scores: Float[Array, " B"],
    mask: Bool[Array, "B T"],
    old_logp: Float[Array, "B T"],
    ref_logp: Float[Array, "B T"],
    values: Float[Array, "B T"],
    *,
    kl_coef: float,
    gamma: float,
    lam: float,
    whiten: bool = True,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"], Float[Array, "B T"]]:
    """Scores -> per-token rewards with the KL penalty -> GAE: `(token_rewards, advantages, returns)`."""
    rewards = outcome_token_rewards(scores, mask, old_logp, ref_logp, kl_coef=kl_coef)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten)
    return rewards, advantages, returns


def build_batch(
    batch: Batch, scores: np.ndarray, state: PPOState, model_config: ModelConfig, ppo: PPOConfig, *,
    temperature: float = 1.0,
) -> tuple[PPOBatch, dict[str, float]]:
    """The PPO batch of a rollout's `Batch` (sampler log-probs as old) and its sequence scores.

    Reference log-probs come from the actor state's reference (the policy
    itself when it holds none: zero KL), values from the critic, or from the
    shared backbone's head.
    """
    start = batch.loss_start
    tokens, attention = jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)
    mask = jnp.asarray(batch.loss_mask) & (jnp.arange(tokens.shape[1]) >= start)
    ref = state.actor.ref_params if state.actor.ref_params is not None else state.actor.params
    ref_logp, _ = _logprobs(ref, model_config, tokens, attention, start, temperature)
    if state.critic is not None:
        values = _values(state.critic.params, model_config, tokens, attention, start)
    else:
        _, values = _shared(state.actor.params, model_config, tokens, attention, start, temperature)
    old_logp = jnp.asarray(batch.old_logp)
    scores_B = jnp.asarray(scores, jnp.float32)
    rewards, advantages, returns = _targets(scores_B, mask, old_logp, ref_logp, values, ppo.kl_coef,
                                            ppo.gamma,
                                            ppo.lam, ppo.whiten_advantages)
    out = PPOBatch(tokens=tokens, attention_mask=attention, loss_mask=mask, old_logp=old_logp,
                   advantages=advantages, returns=returns, old_values=values, loss_start=start)
    m = np.asarray(mask)
    kl = np.asarray(old_logp - ref_logp)[m]
    stats = {"ppo/kl_ref_k1": float(kl.mean()) if kl.size else 0.0,
             "ppo/token_reward_sum": float(np.asarray(rewards)[m].sum() / max(len(scores), 1)),
             "ppo/value_mean": float(np.asarray(values)[m].mean()) if m.any() else 0.0,
             "ppo/return_mean": float(np.asarray(returns)[m].mean()) if m.any() else 0.0}
    return out, stats


_logprobs = jax.jit(lambda p, cfg, tokens, attention, start, temperature: policy_logprobs(
    p, cfg, tokens, attention, start=start, temperature=temperature, with_entropy=False),
    static_argnums=(1, 4, 5))
_values = jax.jit(lambda p, cfg, tokens, attention, start: critic_values(
    p, cfg, tokens, attention, start=start), static_argnums=(1, 4))
_shared = jax.jit(lambda p, cfg, tokens, attention, start, temperature: policy_and_values(
    p, cfg, tokens, attention, start=start, temperature=temperature), static_argnums=(1, 4, 5))
_targets = jax.jit(lambda s, m, o, r, v, kl, g, lam, w: token_targets(
    s, m, o, r, v, kl_coef=kl, gamma=g, lam=lam, whiten=w), static_argnums=(8,))


def ptx_demonstrations(path: str, task: Any, *, completion_field: str = "response",
                       max_len: int | None = None) -> Batch:
    """The demonstration rows of PPO-ptx: a JSONL file of `{"prompt", completion_field}` lines, packed.

    Prompts are rendered by `task.encode` (as the rollout's prompts are),
    completions tokenised by `task.encode_completion`; the loss is on the
    completion tokens (advantage 1: their likelihood).

    Raises:
      ConfigError: naming `ppo.ptx_data` and the file (and line), for a missing
        file, a bad line, an empty completion, a row longer than `max_len`, or a
        task without `encode_completion`.
    """
    from ouroboros_jax.data import DataError, read_jsonl

    if task is None or getattr(task, "encode_completion", None) is None:
        raise ConfigError(f"ppo.ptx_data: {path} needs a task that tokenises completions "
                          "(Task.encode_completion: text -> token ids)")
    try:
        examples = read_jsonl(path, prompt_field="prompt", answer_field=completion_field)
    except DataError as e:
        raise ConfigError(f"ppo.ptx_data: {e}") from None
    completions = []
    for ex in examples:
        text = ex.gold["answer"]
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"ppo.ptx_data: {path} line {ex.id.rsplit(':', 1)[1]}: field "
                              f"{completion_field!r} must be a non-empty string (got {text!r:.80})")
        completions.append(list(task.encode_completion(text)))
    prompts = [list(p) for p in task.encode(examples)]
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    if max_len is not None and longest > max_len:
        row = max(range(len(prompts)), key=lambda i: len(prompts[i]) + len(completions[i]))
        raise ConfigError(f"ppo.ptx_data: {path} line {examples[row].id.rsplit(':', 1)[1]}: "
                          f"{longest} tokens, longer than model.max_seq_len={max_len}")
    width = -(-longest // 16) * 16
    return pack_rows(prompts, completions, width=width if max_len is None else min(width, max_len))


def actor_objective(cfg: ExperimentConfig, model_config: ModelConfig) -> Objective:
    """The actor's objective from the config (an edge): PPO clip on per-token advantages, plus
    `ppo.ptx_coef` times the demonstrations' likelihood loss (`with_ptx`) when it is > 0."""
    actor = _clipped_actor(cfg, model_config)
    if cfg.ppo.ptx_coef > 0:
        return with_ptx(actor, sft(model_config), cfg.ppo.ptx_coef)
    return actor


def _clipped_actor(cfg: ExperimentConfig, model_config: ModelConfig) -> Objective:
    loss, ppo = cfg.loss, cfg.ppo
    return ppo_actor(model_config, variant=loss.variant, clip_low=loss.clip_low, clip_high=loss.clip_high,
                     aggregation=loss.aggregation, dual_clip=loss.dual_clip, entropy_coef=loss.entropy_coef,
                     temperature=cfg.sampling.temperature or 1.0,
                     value_coef=ppo.value_coef if ppo.critic == "shared" else 0.0, value_clip=ppo.value_clip,
                     importance_level=loss.importance_level, importance_upper=loss.importance_upper,
                     importance_lower=loss.importance_lower)


def compile_ppo(cfg: ExperimentConfig, model_config: ModelConfig, params: Params, mesh: Any, *,
                task: Any = None):
    """The actor and critic steps and the initial `PPOState` (the trainer's `_compile_step` for PPO).

    With `ppo.ptx_coef` > 0, `task` (the trainer's `Task`) renders and
    tokenises the demonstrations of `ppo.ptx_data` (`ptx_demonstrations`).
    """
    from ouroboros_jax.trainer import optimizer_from_config

    ppo = cfg.ppo
    if cfg.train.ref_update_every:
        raise ConfigError("train.ref_update_every: not supported with PPO (ppo.enabled); the reference "
                          "stays the initial policy, as InstructGPT's KL anchor")
    ptx = None
    if ppo.ptx_coef > 0:
        ptx = ptx_demonstrations(ppo.ptx_data, task, completion_field=ppo.ptx_completion_field,
                                 max_len=model_config.max_seq_len)
    per_step = cfg.train.inner_epochs * (cfg.rollout_batch_size // cfg.train.mini_batch_size)
    total = cfg.train.steps * per_step
    optimizer = optimizer_from_config(cfg.optimizer, total_steps=total)
    shared = ppo.critic == "shared"
    actor_params = with_value_head(params) if shared else params
    specs = shared_param_specs(model_config) if shared else param_specs(model_config)
    actor_fn, actor_sh = make_train_step(actor_objective(cfg, model_config), optimizer, mesh, specs,
                                         micro_batch_size=cfg.train.micro_batch_size, with_reference=True)
    actor = init_train_state(actor_params, optimizer, jax.random.key(cfg.seed), with_reference=True,
                             shardings=actor_sh)
    if shared:
        return PPOSteps(actor_fn, None, model_config, ptx), PPOState(actor, None)
    critic_opt = optimizer_from_config(
        dataclasses.replace(cfg.optimizer, learning_rate=ppo.critic_learning_rate), total_steps=total)
    critic_fn, critic_sh = make_train_step(value(model_config, clip_range=ppo.value_clip), critic_opt, mesh,
                                           param_specs(model_config, head="score"),
                                           micro_batch_size=cfg.train.micro_batch_size)
    critic = init_train_state(init_critic(params), critic_opt, jax.random.key(cfg.seed + 1),
                              shardings=critic_sh)
    return PPOSteps(actor_fn, critic_fn, model_config, ptx), PPOState(actor, critic)


def ppo_epochs(
    step_fns: PPOSteps, state: PPOState, batch: PPOBatch, *, epochs: int, mini_batch_size: int,
    rng: np.random.Generator,
) -> tuple[PPOState, list[Metrics]]:
    """`epochs` passes over the batch in shuffled mini-batches: actor update, then critic update.

    With PPO-ptx (`step_fns.ptx`), each actor update also gets as many
    demonstration rows, drawn at random (`PtxBatch`); the critic sees the PPO rows only.
    """
    actor_fn, critic_fn, ptx = step_fns.actor, step_fns.critic, step_fns.ptx
    rows = batch.tokens.shape[0]
    # Host arrays, cut per mini-batch: the step places each in its batch sharding.
    batch = jax.device_get(batch)
    collected = []
    for _ in range(epochs):
        order = rng.permutation(rows)
        for start in range(0, rows, mini_batch_size):
            idx = order[start:start + mini_batch_size]
            mb = jax.tree.map(lambda a, idx=idx: np.asarray(a)[idx], batch)
            if ptx is None:
                actor, metrics = actor_fn(state.actor, mb)
            else:
                n = ptx.tokens.shape[0]
                demo = rng.choice(n, size=len(idx), replace=n < len(idx))
                sft_mb = jax.tree.map(lambda a, demo=demo: np.asarray(a)[demo], ptx)
                actor, metrics = actor_fn(state.actor, PtxBatch(mb, sft_mb))
            critic = state.critic
            if critic_fn is not None:
                critic, c_metrics = critic_fn(critic, mb)
                metrics = metrics | {f"critic_{k}": v for k, v in c_metrics.items()}
            state = PPOState(actor, critic)
            collected.append(metrics)
    return state, collected


def update(step_fns: PPOSteps, state: PPOState, rollout: Any, cfg: ExperimentConfig, step: int):
    """The trainer's update phase for PPO: one PPO round on the rollout (`_update`'s contract)."""
    batch = rollout.to_batch()
    scores = np.asarray(rollout.rewards, np.float32).reshape(-1)
    model_config = step_fns.model_config
    ppo_batch, stats = build_batch(batch, scores, state, model_config, cfg.ppo,
                                   temperature=cfg.sampling.temperature or 1.0)
    rng = np.random.default_rng([cfg.seed, step])
    state, collected = ppo_epochs(step_fns, state, ppo_batch, epochs=cfg.train.inner_epochs,
                                  mini_batch_size=cfg.train.mini_batch_size, rng=rng)
    host = jax.device_get(collected)
    out = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}
    out["train/finite"] = float(min(min(m["finite"], m.get("critic_finite", 1.0)) for m in host))
    out |= stats
    return state, out, int(np.asarray(batch.attention_mask).sum())
