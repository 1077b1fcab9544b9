"""Learned reward models as reward sources: one model or an ensemble, scored by one compiled program.

A reward model is the decoder backbone with a scalar head (`models.reward`),
read at the last real token of prompt + completion. `ModelReward` scores the
sampled rows with one model or an ensemble: the members' mean, with their
standard deviation reported as uncertainty and optionally subtracted,
``mean - penalty * std`` (Coste et al. 2023, "Reward Model Ensembles Help
Mitigate Overoptimization", arXiv 2310.02743). Training reward models is
`selfplay.reward_model` (Bradley-Terry pairs through the one update step).

Dimension legend (docs/dimensions.md): E ensemble members, R rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Float

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models.reward import reward_scores
from ouroboros_jax.models.transformer import Params, param_shardings
from ouroboros_jax.rewards.base import Completions, Rewards
from ouroboros_jax.sampling import SampleOutput
from ouroboros_jax.sharding import batch_sharding, batch_shards, replicated


def make_reward_scorer(model_config: ModelConfig, mesh: Mesh | None = None):
    """A compiled scoring program: `score(params, tokens [R, T], mask [R, T]) -> numpy [R]`.

    With a mesh, rows are padded up to a multiple of the batch shards and the
    parameters read in their reward-model shardings.
    """
    fn = lambda params, tokens, mask: reward_scores(params, model_config, tokens, mask)
    if mesh is None:
        jitted, shards = jax.jit(fn), 1
    else:
        rows = batch_sharding(mesh)
        jitted = jax.jit(fn, in_shardings=(param_shardings(model_config, mesh, head="score"), rows, rows),
                         out_shardings=replicated(mesh))
        shards = batch_shards(mesh)

    def score(params: Params, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        R = tokens.shape[0]
        pad = -R % shards
        if pad:
            tokens = np.pad(np.asarray(tokens), ((0, pad), (0, 0)))
            mask = np.pad(np.asarray(mask), ((0, pad), (0, 0)))
            mask[R:, -1] = True  # padding rows score one pad token, never an empty row
        return np.asarray(jitted(params, tokens, mask))[:R]

    return score


def ensemble_stats(
    scores_ER: Float[np.ndarray, "E R"],
) -> tuple[Float[np.ndarray, " R"], Float[np.ndarray, " R"]]:
    """Mean and (population, ddof=0) standard deviation over the ensemble axis: [E, R] -> [R], [R]."""
    scores_ER = np.asarray(scores_ER, np.float64)
    return scores_ER.mean(axis=0), scores_ER.std(axis=0)


def ensemble_penalty(scores_ER: Float[np.ndarray, "E R"], penalty: float) -> Float[np.ndarray, " R"]:
    """Uncertainty-penalised ensemble reward ``mean - penalty * std`` per row [R]."""
    mean, std = ensemble_stats(scores_ER)
    return mean - penalty * std


@dataclasses.dataclass
class ModelReward:
    """A learned reward source: one reward model, or an ensemble.

    It scores the sampled rows (prompt and completion tokens) and returns one
    reward per row: the members' mean score, minus ``penalty * std`` over
    members (0: no penalty). The members share the policy's tokenizer. Its
    metrics are the batch means of the ensemble mean, its disagreement (std)
    and the returned reward.

    Attributes:
      members: parameters of each reward model (a one-element list for one model).
      model_config: their architecture (shared).
      penalty: lambda of ``mean - lambda * std``.
      mesh: score on this mesh (parameters in their reward-model shardings).
    """

    members: Sequence[Params]
    model_config: ModelConfig
    penalty: float = 0.0
    mesh: Mesh | None = None

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("ModelReward: members is empty (give at least one reward model)")
        for i, m in enumerate(self.members):
            if "score_D" not in m:
                raise ValueError(f"ModelReward: member {i} has no score head 'score_D'")
        self._score = make_reward_scorer(self.model_config, self.mesh)

    def member_scores(self, sample: SampleOutput) -> np.ndarray:
        """Scores [E, R] of every member on every row."""
        tokens, mask = sample.sequences()
        return np.stack([self._score(p, tokens, mask) for p in self.members])

    def __call__(self, completions: Completions) -> Rewards:
        scores = self.member_scores(completions.sample)
        mean, std = ensemble_stats(scores)
        reward = mean - self.penalty * std
        return Rewards(reward, metrics={"reward_model/mean": float(mean.mean()),
                                        "reward_model/std": float(std.mean()),
                                        "reward_model/reward": float(reward.mean())})
