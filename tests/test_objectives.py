"""Every objective through the one update step: micro-batched equals full batch, jit equals eager,
the metric combination rules by hand, and reference log-probs from the batch equal those from the state."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ouroboros_jax.batch import Batch, EncodedPairs, pack_pairs
from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.models import init_params, param_specs
from ouroboros_jax.objectives import (
    bradley_terry,
    combine_metrics,
    policy_gradient,
    preference,
    sequence_logps,
    sft,
)
from ouroboros_jax.selfplay.reward_model import init_reward_model
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.step import init_train_state, make_train_step, train_step

CFG = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64,
                  max_seq_len=64)
B, P, C = 8, 4, 6
FAST = {"xla_backend_optimization_level": 0}
SGD = optax.sgd(1.0)  # the parameter change is the gradient itself: a wrong normalisation shows


def _token_batch(seed: int = 0) -> Batch:
    """Rows of very different lengths in the split layout; rows 3 and 7 carry no loss token."""
    rs = np.random.RandomState(seed)
    completion = np.array([6, 1, 4, 0, 3, 5, 2, 0])
    prompt = rs.randint(1, P + 1, B)
    pos = np.arange(P + C)
    attention = (pos >= P - prompt[:, None]) & (pos < P + completion[:, None])
    tokens = np.where(attention, rs.randint(1, CFG.vocab_size, (B, P + C)), 0).astype(np.int32)
    loss_mask = attention & (pos >= P)
    old_logp = (-3.0 + 0.3 * rs.randn(B, P + C)).astype(np.float32)
    return Batch(tokens, attention, loss_mask, old_logp, rs.randn(B).astype(np.float32), loss_start=P)


def _pair_batch(seed: int = 0):
    """6 pairs and 2 padding pairs, so micro-batches hold different numbers of real pairs."""
    rs = np.random.RandomState(seed)
    ids = lambda n: [int(t) for t in rs.randint(1, CFG.vocab_size, n)]
    pairs = EncodedPairs([ids(rs.randint(1, P + 1)) for _ in range(6)],
                         [ids(rs.randint(1, C + 1)) for _ in range(6)],
                         [ids(rs.randint(1, C + 1)) for _ in range(6)])
    return pack_pairs(pairs, prompt_width=P, completion_width=C, num_rows=B)


def _policy():
    return init_params(CFG, jax.random.key(0))


def _perturbed(params):
    return jax.tree.map(lambda x: x + 0.01 * jnp.sign(x), params)


CASES = {
    "ppo_clip_kl": lambda: (policy_gradient(CFG, variant="ppo_clip", clip_low=0.2, clip_high=0.28,
                                            aggregation="token_mean", kl_coef=0.1, entropy_coef=0.01),
                            _policy(), _token_batch(1)),
    "gspo": lambda: (policy_gradient(CFG, variant="gspo", clip_low=3e-4, clip_high=4e-4,
                                     aggregation="seq_mean_token_mean"), _policy(), _token_batch(2)),
    "sft": lambda: (sft(CFG), _policy(), _token_batch(3)),
    "dpo": lambda: (preference(CFG, beta=0.5, label_smoothing=0.1), _policy(), _pair_batch(4)),
    "spin_ipo": lambda: (preference(CFG, beta=0.5, kind="spin", variant="ipo", average_logps=True), _policy(),
                         _pair_batch(5)),
    "bradley_terry": lambda: (bradley_terry(CFG, center_coef=0.01),
                              init_reward_model(_policy(), jax.random.key(7)), _pair_batch(6)),
}


def _state(objective, params):
    state = init_train_state(params, SGD, jax.random.key(0))
    # A reference away from the policy, so KL terms and log-ratios are not trivially zero.
    return state._replace(ref_params=_perturbed(params)) if objective.uses_reference else state


# The costliest cases (8-17 s each on 2 cores) run in the slow set, which CI runs too.
SLOW_CASES = ("ppo_clip_kl", "spin_ipo", "gspo", "bradley_terry")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n
                                  for n in CASES])
def test_micro_batches_equal_the_full_batch_and_jit_equals_eager(name):
    objective, params, batch = CASES[name]()
    state = _state(objective, params)
    full_state, full = train_step(state, batch, objective=objective, optimizer=SGD)
    micro_state, micro = train_step(state, batch, objective=objective, optimizer=SGD, micro_batch_size=2)
    chex.assert_trees_all_close(micro_state.params, full_state.params, atol=2e-6, rtol=2e-4)
    assert micro.keys() == full.keys()
    for key in full:
        np.testing.assert_allclose(micro[key], full[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert full["finite"] == 1.0 and int(full_state.step) == 1
    assert float(full["grad_norm"]) > 0
    # The same update, compiled once with explicit shardings (the state donated: give it a copy).
    head = "score" if "score_D" in params else "lm"
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    step_fn, shardings = make_train_step(objective, SGD, mesh, param_specs(CFG, head=head),
                                         micro_batch_size=2, compiler_options=FAST)
    jit_state, jitted = step_fn(jax.device_put(_state(objective, jax.tree.map(jnp.copy, params)), shardings),
                                batch)
    chex.assert_trees_all_close(jit_state.params, micro_state.params, atol=2e-6, rtol=2e-4)
    chex.assert_trees_all_close(jitted, micro, atol=1e-6, rtol=1e-4)


def test_precomputed_reference_logps_equal_the_reference_parameters():
    objective = preference(CFG, beta=0.5)
    params = _policy()
    batch = _pair_batch(8)
    state = _state(objective, params)
    from_params = train_step(state, batch, objective=objective, optimizer=SGD)
    logps = lambda tokens, mask: sequence_logps(state.ref_params, CFG, tokens, mask, start=P)
    with_logps = batch.replace(ref_chosen_logp=logps(batch.chosen_tokens, batch.chosen_mask),
                               ref_rejected_logp=logps(batch.rejected_tokens, batch.rejected_mask))
    from_batch = train_step(state._replace(ref_params=None), with_logps, objective=objective, optimizer=SGD)
    chex.assert_trees_all_close(from_batch[0].params, from_params[0].params, atol=1e-6)
    margin = lambda out: out[1]["log_ratio_margin"]
    np.testing.assert_allclose(margin(from_batch), margin(from_params), atol=2e-6)
    assert abs(float(from_params[1]["log_ratio_margin"])) > 1e-4  # the reference really differs
    with pytest.raises(ValueError, match="no reference log-probs"):
        train_step(state._replace(ref_params=None), batch, objective=objective, optimizer=SGD)


def test_combine_metrics_rules_by_hand():
    metrics_M = {
        "loss": jnp.array([0.5, 0.25, 0.0]),  # already divided by the full-batch count: summed
        "num_tokens": jnp.array([2.0, 6.0, 0.0]),
        "ratio_mean": jnp.array([1.0, 2.0, 0.0]),  # a token mean: weighted 2 : 6
        "ratio_min": jnp.array([0.5, 0.8, 0.0]),  # the third micro-batch is empty: its 0 is a placeholder
        "ratio_max": jnp.array([1.5, 1.2, 0.0]),
        "advantage_mean": jnp.array([1.0, 3.0, 0.0]),
        "advantage_std": jnp.array([0.0, 1.0, 0.0]),
    }
    out = combine_metrics(metrics_M, lambda name: "num_tokens")
    assert float(out["loss"]) == 0.75 and float(out["num_tokens"]) == 8.0
    assert float(out["ratio_mean"]) == pytest.approx((2 * 1 + 6 * 2) / 8)
    assert float(out["ratio_min"]) == 0.5 and float(out["ratio_max"]) == 1.5
    # pooled: values 1 (x2) and a spread of 1 around 3 (x6): mean 2.5, E[x^2] = (2 * 1 + 6 * 10) / 8
    assert float(out["advantage_std"]) == pytest.approx(np.sqrt((2 + 60) / 8 - 2.5**2))
    empty = combine_metrics({"num_tokens": jnp.zeros(2), "ratio_min": jnp.zeros(2)}, lambda n: "num_tokens")
    assert float(empty["ratio_min"]) == 0.0
