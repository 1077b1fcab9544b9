"""Objectives: what the one update step (`ouroboros_jax.step`) minimises.

An `Objective` is a small pure pair, `normalizer(batch)` (full-batch counts)
and `loss(params, ref_params, batch, counts) -> (loss, metrics)`, plus how
micro-batch metrics combine (`combine_metrics`). Each binds a model forward to
a pure loss of `ouroboros_jax.algorithms`:

- `policy_gradient`: the GRPO family on token rows (`batch.Batch`), `sft` its
  likelihood variant;
- `preference`: DPO / IPO and SPIN on pairs (`batch.PairBatch`);
- `bradley_terry`: a reward model on pairs;
- `binary_classification`: a classifier on soft labels (`LabelBatch`), with the
  weak-to-strong confidence loss as an option;
- `ppo_actor` and `objectives.value.value`: PPO's actor and critic (a shared
  backbone or a separate critic); `distill`: on-policy distillation to a teacher.
"""

from ouroboros_jax.objectives.base import SUMMED, Metrics, Objective, combine_metrics
from ouroboros_jax.objectives.classification import LabelBatch, binary_classification, label_batch
from ouroboros_jax.objectives.distill import distill
from ouroboros_jax.objectives.policy import loss_tokens, policy_gradient, sft
from ouroboros_jax.objectives.preference import (
    PREFERENCE_KINDS,
    PreferenceKind,
    pair_count,
    preference,
    sequence_logps,
)
from ouroboros_jax.objectives.reward_model import bradley_terry
from ouroboros_jax.objectives.value import PPOBatch, ppo_actor

__all__ = [
    "LabelBatch", "PPOBatch", "PREFERENCE_KINDS", "SUMMED", "Metrics", "Objective", "PreferenceKind",
    "binary_classification", "bradley_terry", "combine_metrics", "distill", "label_batch", "loss_tokens",
    "pair_count", "policy_gradient", "ppo_actor", "preference", "sequence_logps", "sft",
]
