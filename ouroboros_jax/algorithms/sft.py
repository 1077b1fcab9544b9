"""Advantage-weighted log-likelihood: supervised fine-tuning and REINFORCE.

Per token, ``l = -A * logp``. With ``A = 1`` on the answer tokens this is the
negative log-likelihood (a supervised warm-start); with ``A`` the verified
reward it is rejection-sampling fine-tuning / expert iteration (Anthony et al.
2017, arXiv 1705.08439; Zelikman et al. 2022, STaR, arXiv 2203.14465); with a
baselined advantage it is the on-policy REINFORCE estimator (Williams 1992).
There is no importance ratio: ``old_logp`` is not used, and the reported ratio
is 1.

Dimension legend: B batch, T time.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from ouroboros_jax.algorithms.ppo_clip import SurrogateTerms


def sft_terms(
    logp: Float[Array, "B T"],
    old_logp: Float[Array, "B T"],
    advantages: Float[Array, "B T"],
    mask: Shaped[Array, "B T"],
    **unused_clip: object,
) -> SurrogateTerms:
    """Per-token ``-A * logp`` (clip settings are accepted and ignored: nothing is clipped)."""
    del old_logp, mask, unused_clip
    never = jnp.zeros(logp.shape, bool)
    return SurrogateTerms(loss=-advantages * logp, ratio=jnp.ones_like(logp), clipped_low=never,
                          clipped_high=never, clipped_dual=never)
