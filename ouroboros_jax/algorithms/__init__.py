"""Pure functions of arrays for RL and preference learning of language models.

Arrays in, ``(loss, metrics)`` out: no flax, no config objects, no ``jax.jit``
(the one update step that calls these is jitted elsewhere).

Dimension legend (docs/dimensions.md): B rows (sequences, or pairs), G group
(completions per prompt), T positions.

- advantages: ``group_advantages`` (GRPO / Dr. GRPO), ``rloo_advantages``,
  ``batch_normalized_advantages`` (REINFORCE++), ``compute_advantages``.
- PPO with a critic: ``outcome_token_rewards`` (score + KL per token),
  ``gae_advantages``, ``masked_whiten``, ``value_loss``.
- kl: ``kl_penalty`` (k1, k2, k3 per token).
- aggregation: ``aggregate_loss`` and masked reductions.
- policy losses: ``policy_loss`` dispatching to ``ppo_clip``, ``gspo``,
  ``gspo_token``, ``cispo``, ``sapo``, ``sft``.
- off-policy correction: ``importance_weights`` (TIS, IcePop).
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
from ouroboros_jax.algorithms.cispo import cispo_terms
from ouroboros_jax.algorithms.gae import gae_advantages, last_token_mask, masked_whiten, outcome_token_rewards
from ouroboros_jax.algorithms.gspo import gspo_terms, gspo_token_terms, sequence_log_ratio
from ouroboros_jax.algorithms.importance import IMPORTANCE_LEVELS, importance_weights
from ouroboros_jax.algorithms.kl import KL_KINDS, KLKind, kl_penalty
from ouroboros_jax.algorithms.policy_loss import POLICY_VARIANTS, PolicyVariant, policy_loss
from ouroboros_jax.algorithms.ppo_clip import SurrogateTerms, clipped_surrogate, ppo_clip_terms
from ouroboros_jax.algorithms.preference import DPO_VARIANTS, DPOVariant, dpo_loss, spin_loss
from ouroboros_jax.algorithms.reward_model import bradley_terry_loss
from ouroboros_jax.algorithms.sapo import sapo_terms
from ouroboros_jax.algorithms.value_loss import value_loss

__all__ = [
    "ADVANTAGE_MODES",
    "AGGREGATIONS",
    "AdvantageMode",
    "Aggregation",
    "DPOVariant",
    "DPO_VARIANTS",
    "IMPORTANCE_LEVELS",
    "KLKind",
    "KL_KINDS",
    "POLICY_VARIANTS",
    "PolicyVariant",
    "SurrogateTerms",
    "aggregate_loss",
    "batch_normalized_advantages",
    "bradley_terry_loss",
    "cispo_terms",
    "clipped_surrogate",
    "compute_advantages",
    "dpo_loss",
    "gae_advantages",
    "group_advantages",
    "gspo_terms",
    "gspo_token_terms",
    "importance_weights",
    "kl_penalty",
    "last_token_mask",
    "masked_max",
    "masked_mean",
    "masked_min",
    "masked_std",
    "masked_sum",
    "masked_whiten",
    "outcome_token_rewards",
    "policy_loss",
    "ppo_clip_terms",
    "rloo_advantages",
    "sapo_terms",
    "sequence_log_ratio",
    "spin_loss",
    "value_loss",
]
