"""Training learned reward models, and watching a policy trained on one.

A reward model is the decoder backbone with a scalar head (`models.reward`),
scored at the last real token of prompt + response. On batches of pairs
(`batch.pack_pairs`) the one update step (`step.make_train_step`) minimises
the `objectives.bradley_terry` objective; parameters and optimizer moments are
sharded like the policy's under the one rules table
(`models.param_specs(..., head="score")`), and held-out pairs give the
pairwise accuracy. Checkpoints are Hugging Face ...ForSequenceClassification
directories (`save_reward_model` / `load_reward_model`).

In RL a trained model is a reward source (`rewards.ModelReward`, ensembles,
`rewards.PARReward`). `RewardHackingTracker` flags the pattern a user watches
for: the proxy reward rising while verified accuracy on an anchor set falls.

Dimension legend (docs/dimensions.md): B pairs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ouroboros_jax.algorithms import bradley_terry_loss
from ouroboros_jax.batch import EncodedPairs, pack_pairs, pair_widths
from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.models.hf import export_hf_checkpoint, load_hf_checkpoint
from ouroboros_jax.models.safetensors_io import CheckpointError
from ouroboros_jax.models.transformer import Params, param_specs
from ouroboros_jax.objectives import bradley_terry
from ouroboros_jax.rewards.model import make_reward_scorer
from ouroboros_jax.selfplay.preference import epoch_batches
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step

# ---------------------------------------------------------------------------
# Parameters and checkpoints


def init_reward_model(backbone: Params, rng: jax.Array, *, scale: float = 0.02) -> Params:
    """A reward model from a policy's backbone: its output head dropped, a new scalar head `score_D`."""
    params = {k: v for k, v in backbone.items() if k not in ("lm_head_DV", "score_D")}
    D = backbone["embed_VD"].shape[1]
    params["score_D"] = (scale * jax.random.normal(rng, (D,), jnp.float32)).astype(backbone["embed_VD"].dtype)
    return jax.tree.map(jnp.copy, params)


def save_reward_model(params: Params, model_config: ModelConfig, path: str | os.PathLike[str], *,
                      pad_token_id: int = 0, dtype: str | None = None) -> Path:
    """Write a Hugging Face ...ForSequenceClassification checkpoint (num_labels=1)."""
    if "score_D" not in params:
        raise CheckpointError("save_reward_model: params have no score head 'score_D' (not a reward model)")
    return export_hf_checkpoint(params, model_config, path, dtype=dtype,
                                extra_config={"pad_token_id": pad_token_id})


def load_reward_model(path: str | os.PathLike[str], *, dtype: str = "float32",
                      mesh: Mesh | None = None) -> tuple[ModelConfig, Params]:
    """Load a reward-model checkpoint (sharded straight onto `mesh` when given)."""
    cfg, params = load_hf_checkpoint(path, dtype=dtype, mesh=mesh)
    if "score_D" not in params:
        raise CheckpointError(f"{path}: a causal-LM checkpoint, not a reward model (no score head)")
    return cfg, params


# ---------------------------------------------------------------------------
# The training step


@dataclasses.dataclass
class RewardModelResult:
    params: Params
    history: list[dict[str, float]]
    evals: list[dict[str, float]]


def evaluate_reward_model(
    params: Params, model_config: ModelConfig, pairs: EncodedPairs, *, widths: tuple[int, int] | None = None,
    batch_size: int = 64, scorer: Callable | None = None, mesh: Mesh | None = None,
) -> dict[str, float]:
    """Pairwise accuracy (chosen scored strictly above rejected), loss and mean margin on `pairs`."""
    scorer = scorer or make_reward_scorer(model_config, mesh)
    P, C = widths or pair_widths(pairs)
    chosen, rejected = [], []
    for start in range(0, pairs.size, batch_size):
        rows = range(start, min(start + batch_size, pairs.size))
        b = pack_pairs(pairs.take(rows), prompt_width=P, completion_width=C, num_rows=batch_size)
        n = len(rows)
        chosen.append(scorer(params, b.chosen_tokens, b.chosen_mask)[:n])
        rejected.append(scorer(params, b.rejected_tokens, b.rejected_mask)[:n])
    scores = [jnp.asarray(np.concatenate(side)) for side in (chosen, rejected)]
    _, metrics = bradley_terry_loss(*scores)
    return {k: float(v) for k, v in metrics.items()}


def train_reward_model(
    params: Params, model_config: ModelConfig, train_pairs: EncodedPairs,
    heldout_pairs: EncodedPairs | None = None, *, steps: int, batch_size: int, learning_rate: float,
    center_coef: float = 0.0, mesh: Mesh | None = None, seed: int = 0, eval_every: int = 0,
    optimizer: optax.GradientTransformation | None = None, log_every: int = 0,
) -> RewardModelResult:
    """Bradley-Terry training for `steps` updates of `batch_size` pairs, with held-out accuracy.

    Args:
      params: initial reward-model parameters (with `score_D`; see `init_reward_model`).
      train_pairs, heldout_pairs: encoded pairs (`preference.encode_pairs`).
      eval_every: evaluate on the held-out pairs every this many steps (0: at the end only).
      mesh: default: every device on the fsdp axis; `batch_size` must divide over data * fsdp.
      optimizer: default AdamW at `learning_rate` (b2 = 0.99).

    Returns:
      The trained parameters, per-step metrics, and held-out evaluations
      (`step`, `accuracy`, `loss`, `score_margin`, ...).
    """
    if "score_D" not in params:
        raise ValueError("train_reward_model: params have no score head 'score_D' (use init_reward_model)")
    mesh = mesh if mesh is not None else make_mesh(MeshConfig())
    optimizer = optimizer or make_optimizer(learning_rate, b2=0.99)
    objective = bradley_terry(model_config, center_coef=center_coef)
    step_fn, shardings = make_train_step(objective, optimizer, mesh, param_specs(model_config, head="score"))
    state = init_train_state(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(seed),
                             shardings=shardings)
    everything = train_pairs if heldout_pairs is None else EncodedPairs(
        *[a + b for a, b in zip(train_pairs, heldout_pairs, strict=True)])
    P, C = pair_widths(everything)
    rows_of = epoch_batches(train_pairs.size, batch_size, seed)
    scorer = make_reward_scorer(model_config, mesh) if heldout_pairs is not None else None
    collected, evals = [], []
    for i in range(steps):
        batch = pack_pairs(train_pairs.take(rows_of(i)), prompt_width=P, completion_width=C,
                           num_rows=batch_size)
        state, metrics = step_fn(state, batch)
        collected.append(metrics)
        done = i + 1
        if log_every and done % log_every == 0:
            print(f"reward model step {done}: loss {float(metrics['loss']):.4f} "
                  f"accuracy {float(metrics['accuracy']):.3f}", flush=True)
        if heldout_pairs is not None and ((eval_every and done % eval_every == 0) or done == steps):
            evals.append({"step": done} | evaluate_reward_model(
                state.params, model_config, heldout_pairs, widths=(P, C), batch_size=batch_size,
                scorer=scorer))
    history = [{k: float(v) for k, v in m.items()} for m in jax.device_get(collected)]
    return RewardModelResult(state.params, history, evals)


# ---------------------------------------------------------------------------
# Reward-hacking signals


def hacking_deltas(rewards: Sequence[float], accuracies: Sequence[float], window: int) -> tuple[float, float]:
    """Change of the mean proxy reward and of the mean verified accuracy between the
    last `window` points and the `window` points before them (NaN until 2 * window points)."""
    if len(rewards) != len(accuracies):
        raise ValueError(f"hacking_deltas: {len(rewards)} rewards but {len(accuracies)} accuracies")
    if window < 1:
        raise ValueError(f"hacking_deltas: window must be >= 1 (got {window})")
    if len(rewards) < 2 * window:
        return math.nan, math.nan
    r, a = np.asarray(rewards, np.float64), np.asarray(accuracies, np.float64)
    last, prev = slice(-window, None), slice(-2 * window, -window)
    return float(r[last].mean() - r[prev].mean()), float(a[last].mean() - a[prev].mean())


@dataclasses.dataclass
class RewardHackingTracker:
    """Flags reward hacking: the proxy reward going up while verified anchor accuracy goes down.

    Feed it `(step, proxy reward, verified accuracy on the anchor set)` as they
    come. A point is flagged when, between the last `window` points and the
    `window` before, the mean reward rose by more than `reward_rise` and the
    mean accuracy fell by more than `accuracy_drop`. `flagged_at` is the step of
    the first flag.
    """

    window: int = 3
    reward_rise: float = 0.0
    accuracy_drop: float = 0.05
    steps: list[int] = dataclasses.field(default_factory=list)
    rewards: list[float] = dataclasses.field(default_factory=list)
    accuracies: list[float] = dataclasses.field(default_factory=list)
    flagged_at: int | None = None

    def update(self, step: int, reward: float, accuracy: float) -> dict[str, float]:
        """Record one point; returns `hacking/reward_delta`, `hacking/accuracy_delta`, `hacking/flag`."""
        self.steps.append(int(step))
        self.rewards.append(float(reward))
        self.accuracies.append(float(accuracy))
        d_reward, d_accuracy = hacking_deltas(self.rewards, self.accuracies, self.window)
        flag = d_reward > self.reward_rise and d_accuracy < -self.accuracy_drop
        if flag and self.flagged_at is None:
            self.flagged_at = int(step)
        return {"hacking/reward_delta": d_reward, "hacking/accuracy_delta": d_accuracy,
                "hacking/flag": float(flag)}
