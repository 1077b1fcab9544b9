"""Truncated importance weights in the GRPO-family objective (`objectives.policy_gradient`), set by
`loss.importance_*`: hand-computed TIS, IcePop and sequence-level losses, and weights of exactly 1
(sampler log-probs equal to the old ones) give exactly the unweighted loss."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax import algorithms, config
from ouroboros_jax.batch import Batch
from ouroboros_jax.config import ConfigError, LossConfig, ModelConfig, parse_cli
from ouroboros_jax.models import init_params
from ouroboros_jax.trainer import policy_objective

CFG = ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=32,
                  max_seq_len=16)
LOG_V = math.log(CFG.vocab_size)
# Row 0 has completion tokens at t = 2..5, row 1 at t = 2..4 (t = 5 is padding).
MASK = np.array([[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]], bool)
# log pi_old - log pi_rollout per token: weights exp(delta) = 1, 1.5, 3, 0.5 | 0.8, 1.25, 2.5.
RATIOS = np.array([[1, 1, 1.0, 1.5, 3.0, 0.5], [1, 1, 0.8, 1.25, 2.5, 1]])
ADV = np.array([1.0, -2.0])


def _objective(**importance):
    loss = LossConfig(kl_coef=0.0, **importance)  # GRPO: token ratios, mean per row then over rows
    return policy_objective(CFG, loss, max_completion_len=4)


def _batch(rollout_logp) -> Batch:
    tokens = jnp.asarray(np.arange(12).reshape(2, 6) % CFG.vocab_size, jnp.int32)
    old = jnp.full((2, 6), -LOG_V)  # zero parameters: every token has log-prob -log V (ratio 1)
    return Batch(tokens=tokens, attention_mask=jnp.ones((2, 6), bool), loss_mask=jnp.asarray(MASK),
                 old_logp=old, advantages=jnp.asarray(ADV, jnp.float32), rollout_logp=rollout_logp)


OBJECTIVES = {"tis": _objective(importance_upper=2.0),
              "icepop": _objective(importance_upper=2.0, importance_lower=0.6),
              "sequence": _objective(importance_level="sequence", importance_upper=4.0),
              "off": _objective()}


@jax.jit
def _losses(params, batch: Batch):
    """Every objective's loss and metrics on the batch, in one program."""
    return {name: o.loss(params, None, batch, o.normalizer(batch)) for name, o in OBJECTIVES.items()}


def _hand_loss(w: np.ndarray) -> float:
    # Ratio 1: the clipped surrogate per token is -A * w; mean over each row's tokens, then over rows.
    per_token = -ADV[:, None] * w
    return float(np.mean([per_token[b][MASK[b]].mean() for b in range(2)]))


def _params(scale: float):
    """Parameters of CFG's shapes: zeros (scale 0), else normal draws times `scale`."""
    shapes = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), shapes)


def test_importance_weighted_grpo_loss_by_hand():
    zero = _params(0.0)
    batch = _batch(jnp.asarray(-LOG_V - np.log(RATIOS), jnp.float32))
    out = _losses(zero, batch)

    tis = np.minimum(RATIOS, 2.0)  # TIS: min(w, 2)
    loss, metrics = out["tis"]
    np.testing.assert_allclose(loss, _hand_loss(tis), rtol=1e-6)
    np.testing.assert_allclose(metrics["is_truncated_frac"], 2 / 7, rtol=1e-6)  # 3.0 and 2.5
    np.testing.assert_allclose(metrics["is_weight_max"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["is_weight_mean"], tis[MASK].mean(), rtol=1e-6)
    gap = np.abs(np.log(RATIOS))[MASK].mean()
    np.testing.assert_allclose(metrics["mismatch_logp_abs_diff"], gap, rtol=1e-5)

    icepop = np.where((RATIOS >= 0.6) & (RATIOS <= 2.0), RATIOS, 0.0)  # outside [0.6, 2]: no gradient
    np.testing.assert_allclose(out["icepop"][0], _hand_loss(icepop), rtol=1e-6)
    np.testing.assert_allclose(out["icepop"][1]["is_truncated_frac"], 3 / 7, rtol=1e-6)

    # Sequence level: each row's product of ratios (2.25, then 2.5), truncated at 4, on its tokens.
    seq = np.where(MASK, np.array([[2.25], [2.5]]), 0.0)
    np.testing.assert_allclose(out["sequence"][0], _hand_loss(seq), rtol=1e-5)

    np.testing.assert_allclose(out["off"][0], _hand_loss(np.ones_like(RATIOS)), rtol=1e-6)
    assert "is_weight_mean" not in out["off"][1]


def test_unit_weights_give_exactly_the_unweighted_loss():
    params = _params(0.5)
    # The sampler's log-probs are the old ones.
    batch = _batch(jnp.asarray(np.full((2, 6), -LOG_V), jnp.float32))
    out = _losses(params, batch)
    assert float(out["tis"][0]) != 0
    np.testing.assert_array_equal(out["tis"][0], out["off"][0])
    np.testing.assert_array_equal(out["sequence"][0], out["off"][0])
    assert float(out["tis"][1]["is_weight_mean"]) == 1.0 and float(out["tis"][1]["is_ess"]) == 1.0


def test_importance_config():
    assert config.IMPORTANCE_LEVELS == algorithms.IMPORTANCE_LEVELS
    cfg = parse_cli(args=["--preset", "ppo", "--loss.importance_upper", "2", "--loss.importance_lower", "0.5",
                          "--loss.importance_level", "sequence"])
    assert (cfg.loss.importance_level, cfg.loss.importance_upper, cfg.loss.importance_lower) == (
        "sequence", 2.0, 0.5)
    assert LossConfig().importance_upper is None
    with pytest.raises(ConfigError, match="loss.importance_upper"):
        LossConfig(importance_upper=0.0)
    with pytest.raises(ConfigError, match="loss.importance_lower"):
        LossConfig(importance_upper=2.0, importance_lower=3.0)
    with pytest.raises(ConfigError, match="loss.importance_lower"):
        LossConfig(importance_lower=0.5)
    with pytest.raises(ConfigError, match="loss.importance_level"):
        LossConfig(importance_level="row")
