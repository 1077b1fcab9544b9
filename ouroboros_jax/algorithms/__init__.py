"""Pure functions of arrays for RL and preference learning of language models.

Arrays in, ``(loss, metrics)`` out: no flax, no config objects, no ``jax.jit``
(the one update step that calls these is jitted elsewhere).

Dimension legend (docs/dimensions.md): B rows (sequences, or pairs), G group
(completions per prompt), T positions.

- advantages: ``group_advantages`` (GRPO / Dr. GRPO), ``rloo_advantages``,
  ``batch_normalized_advantages`` (REINFORCE++), ``compute_advantages``.
- kl: ``kl_penalty`` (k1, k2, k3 per token).
- aggregation: ``aggregate_loss`` and masked reductions.
- policy losses: ``policy_loss`` dispatching to ``ppo_clip``, ``gspo``,
  ``gspo_token``.
- preferences: ``dpo_loss`` (DPO, IPO), ``spin_loss``, ``bradley_terry_loss``.
"""

from ouroboros_jax.algorithms.advantages import (
    ADVANTAGE_MODES,
    AdvantageMode,
    batch_normalized_advantages,
    compute_advantages,
    group_advantages,
    rloo_advantages,
)
from ouroboros_jax.algorithms.aggregation import (
    AGGREGATIONS,
    Aggregation,
    aggregate_loss,
    masked_max,
    masked_mean,
    masked_min,
    masked_std,
    masked_sum,
)
from ouroboros_jax.algorithms.gspo import gspo_terms, gspo_token_terms, sequence_log_ratio
from ouroboros_jax.algorithms.kl import KL_KINDS, KLKind, kl_penalty
from ouroboros_jax.algorithms.policy_loss import POLICY_VARIANTS, PolicyVariant, policy_loss
from ouroboros_jax.algorithms.ppo_clip import SurrogateTerms, clipped_surrogate, ppo_clip_terms
from ouroboros_jax.algorithms.preference import DPO_VARIANTS, DPOVariant, dpo_loss, spin_loss
from ouroboros_jax.algorithms.reward_model import bradley_terry_loss

__all__ = [
    "ADVANTAGE_MODES",
    "AGGREGATIONS",
    "AdvantageMode",
    "Aggregation",
    "DPOVariant",
    "DPO_VARIANTS",
    "KLKind",
    "KL_KINDS",
    "POLICY_VARIANTS",
    "PolicyVariant",
    "SurrogateTerms",
    "aggregate_loss",
    "batch_normalized_advantages",
    "bradley_terry_loss",
    "clipped_surrogate",
    "compute_advantages",
    "dpo_loss",
    "group_advantages",
    "gspo_terms",
    "gspo_token_terms",
    "kl_penalty",
    "masked_max",
    "masked_mean",
    "masked_min",
    "masked_std",
    "masked_sum",
    "policy_loss",
    "ppo_clip_terms",
    "rloo_advantages",
    "sequence_log_ratio",
    "spin_loss",
]
