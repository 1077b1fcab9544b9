"""Per-token KL estimators (Schulman's k1, k2, k3).

Sign convention. For a token sampled from the policy ``pi`` (log-prob ``logp``)
and the reference ``pi_ref`` (log-prob ``ref_logp``) of the same token, let

    r = ref_logp - logp = log(pi_ref / pi).

The estimators of ``KL(pi || pi_ref) = E_{x ~ pi}[log pi(x) - log pi_ref(x)]`` are

- ``k1 = -r = logp - ref_logp``: unbiased, high variance, can be negative;
- ``k2 = r**2 / 2``: biased (exact to second order), always >= 0;
- ``k3 = exp(r) - r - 1``: unbiased (``E_pi[exp(r)] = 1``), always >= 0,
  low variance; the default wherever a KL term is on (GRPO, eq. 4).

The estimate is of ``KL(sampler || other)``: the first argument must be the
log-prob under the distribution the token was sampled from. For the
"approximate KL to the old policy" of PPO, tokens come from the old policy, so
``kl_penalty(old_logp, logp, kind)`` estimates ``KL(pi_old || pi)``.

Reference: J. Schulman, "Approximating KL divergence" (2020),
http://joschu.net/blog/kl-approx.html; Shao et al. 2024, arXiv 2402.03300.

Dimension legend: B batch, T time.
"""

from __future__ import annotations

import typing
from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Float

KLKind = Literal["k1", "k2", "k3"]
KL_KINDS: tuple[str, ...] = typing.get_args(KLKind)


def kl_penalty(
    logp: Float[Array, "*dims"], ref_logp: Float[Array, "*dims"], kind: KLKind = "k3"
) -> Float[Array, "*dims"]:
    """Per-token estimate of ``KL(pi || pi_ref)`` for tokens sampled from ``pi``.

    Args:
      logp: log-prob of each sampled token under the sampling policy ``pi``.
      ref_logp: log-prob of the same tokens under the reference policy.
      kind: ``k1`` (``logp - ref_logp``), ``k2`` (``(ref_logp - logp)**2 / 2``)
        or ``k3`` (``exp(r) - r - 1`` with ``r = ref_logp - logp``).

    Returns:
      The per-token estimate, same shape as the inputs (not masked: callers
      reduce it with the completion mask).

    Raises:
      ValueError: for an unknown kind.
    """
    log_ratio = ref_logp - logp
    match kind:
        case "k1":
            return -log_ratio
        case "k2":
            return 0.5 * jnp.square(log_ratio)
        case "k3":
            # expm1 keeps precision near r = 0, where the KL is tiny.
            return jnp.expm1(log_ratio) - log_ratio
        case _:
            raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")
