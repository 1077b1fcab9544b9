"""The update step with the policy-gradient objective: chunked log-probs, micro-batching, sharding,
inner epochs, NaN handling. (tests/test_objectives.py runs every objective through the same step.)"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ouroboros_jax.algorithms import AGGREGATIONS, group_advantages, policy_loss
from ouroboros_jax.batch import Batch
from ouroboros_jax.config import LOSS_PRESETS, MeshConfig, ModelConfig, OptimizerConfig
from ouroboros_jax.models import forward_padded, init_params, param_specs, policy_logprobs, token_logprobs
from ouroboros_jax.objectives import policy_gradient
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step, train_step
from ouroboros_jax.trainer import optimizer_from_config, policy_loss_settings

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
B, PROMPT, COMPLETION = 8, 8, 16
T = PROMPT + COMPLETION
PPO = dict(variant="ppo_clip", clip_low=0.2, clip_high=0.28, aggregation="token_mean")
# XLA's CPU compile dominates this file's run time; the unoptimised backend
# halves it and leaves every number the same up to float rounding.
FAST = {"xla_backend_optimization_level": 0}
fast_jit = lambda f, **kw: jax.jit(f, compiler_options=FAST, **kw)

# Most tests share one compiled step: Adam, 4 micro-batches of 2, token-mean PPO-clip.
ADAM = make_optimizer(3e-2)
ADAM_STEP_KW = dict(objective=policy_gradient(CFG, logprob_chunk=8, **PPO), optimizer=ADAM,
                    micro_batch_size=2)
ADAM_STEP = fast_jit(lambda s, b: train_step(s, b, **ADAM_STEP_KW))


@pytest.fixture(scope="module")
def params():
    return fast_jit(lambda k: init_params(CFG, k))(jax.random.key(0))


def full_logprobs(params, tokens, attention_mask, temperature=1.0):
    """Full [B, T, V] logits, log-softmax, gather: the reference for the chunked path."""
    logits = forward_padded(params, CFG, tokens, attention_mask) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    taken = jnp.take_along_axis(logp_all[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)[:, :-1]
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))
    return pad(taken), pad(entropy)


naive_logprobs = fast_jit(full_logprobs)


def make_batch(params, seed=0, *, token_advantages=False, noise=0.3):
    """Left-padded prompts and right-padded completions of very different lengths.

    Rows 3 and 7 have no completion token (padding sequences): with 4
    micro-batches (rows j, j + 4) micro-batch 3 is empty, and the token,
    sequence and micro-batch counts all differ.
    """
    rs = np.random.RandomState(seed)
    tokens = rs.randint(1, CFG.vocab_size, (B, T)).astype(np.int32)
    prompt_len = rs.randint(2, PROMPT + 1, B)
    completion_len = np.array([16, 1, 9, 0, 3, 14, 2, 0])
    pos = np.arange(T)
    attention = (pos >= PROMPT - prompt_len[:, None]) & (pos < PROMPT + completion_len[:, None])
    loss_mask = (pos >= PROMPT) & (pos < PROMPT + completion_len[:, None])
    tokens = np.where(attention, tokens, 0)
    logp, _ = naive_logprobs(params, jnp.asarray(tokens), jnp.asarray(attention))
    old_logp = np.asarray(logp) + noise * rs.randn(B, T).astype(np.float32)
    shape = (B, T) if token_advantages else (B,)
    advantages = rs.randn(*shape).astype(np.float32)
    return Batch(jnp.asarray(tokens), jnp.asarray(attention), jnp.asarray(loss_mask),
                 jnp.asarray(old_logp), jnp.asarray(advantages))


def tree_allclose(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


# ---------------------------------------------------------------------------
# Chunked log-probs


def test_chunked_logprobs_equal_full_logits(params):
    batch = make_batch(params)
    weights = jax.random.normal(jax.random.key(1), (2, B, T))
    mask = batch.attention_mask

    def objective(fn):
        def f(p):
            logp, entropy = fn(p)
            return jnp.sum(jnp.where(mask, logp * weights[0] + entropy * weights[1], 0.0)), (logp, entropy)
        return fast_jit(jax.value_and_grad(f, has_aux=True))

    # Chunks of 5 do not divide T = 24: the padded last chunk is covered too.
    chunked = objective(lambda p: policy_logprobs(p, CFG, batch.tokens, mask, temperature=0.7, chunk_size=5))
    full = objective(lambda p: full_logprobs(p, batch.tokens, mask, 0.7))
    (v1, (lp1, h1)), g1 = chunked(params)
    (v2, (lp2, h2)), g2 = full(params)
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(lp1)[m], np.asarray(lp2)[m], atol=1e-5)
    np.testing.assert_allclose(np.asarray(h1)[m], np.asarray(h2)[m], atol=1e-5)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    tree_allclose(g1, g2, atol=1e-5, rtol=1e-4)
    # With a start, the head runs from there only: zeros before, the same values after.
    lp3, h3 = fast_jit(lambda p: policy_logprobs(p, CFG, batch.tokens, mask, temperature=0.7, chunk_size=5,
                                                 start=PROMPT))(params)
    assert not np.any(lp3[:, :PROMPT]) and not np.any(h3[:, :PROMPT])
    np.testing.assert_allclose(lp3[:, PROMPT:], lp1[:, PROMPT:], atol=1e-5)
    np.testing.assert_allclose(h3[:, PROMPT:], h1[:, PROMPT:], atol=1e-5)


def test_token_logprobs_single_chunk_no_entropy_and_bfloat16():
    hidden = jax.random.normal(jax.random.key(0), (2, 7, 16))
    head = jax.random.normal(jax.random.key(1), (16, 33))
    targets = jax.random.randint(jax.random.key(2), (2, 7), 0, 33)
    want = jnp.take_along_axis(jax.nn.log_softmax(hidden @ head), targets[..., None], -1)[..., 0]
    run = fast_jit(lambda h, c: token_logprobs(h, head, targets, chunk_size=c, with_entropy=False)[0],
                   static_argnums=1)
    np.testing.assert_allclose(run(hidden, 64), want, atol=1e-5)  # one chunk
    np.testing.assert_allclose(run(hidden, 3), want, atol=1e-5)
    low = run(hidden.astype(jnp.bfloat16), 3)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, want, atol=0.3)
    assert token_logprobs(hidden, head, targets, with_entropy=False)[1] is None


# ---------------------------------------------------------------------------
# Micro-batching


@pytest.fixture(scope="module")
def reference(params):
    """Full-batch gradients and metrics of every aggregation, through full logits.

    One backward pass of the model (a VJP from the log-probs) serves all four
    aggregations; the loss uses policy_loss's own full-batch denominators.
    """
    batch = make_batch(params, seed=1)

    @fast_jit
    def run(p, batch):
        (logp, entropy), vjp = jax.vjp(lambda p: full_logprobs(p, batch.tokens, batch.attention_mask), p)
        out = {}
        for aggregation in AGGREGATIONS:
            loss = functools.partial(policy_loss, old_logp=batch.old_logp, advantages=batch.advantages,
                                     mask=batch.loss_mask, entropy=entropy, **reference_loss(aggregation))
            dlogp, metrics = jax.grad(loss, has_aux=True)(logp)
            (grads,) = vjp((dlogp, jnp.zeros_like(entropy)))
            out[aggregation] = (grads, metrics)
        return out

    return batch, run(params, batch)


def reference_loss(aggregation):
    return dict(PPO, aggregation=aggregation, dual_clip=3.0, max_len=COMPLETION)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_give_the_full_batch_update(params, reference, aggregation):
    batch, want = reference
    want_grads, want_metrics = want[aggregation]
    # Plain SGD with rate 1: the parameter change is the gradient itself, so
    # any error in the normalisation shows (Adam would hide a global scale).
    sgd = optax.sgd(1.0)
    # Completions start at PROMPT: one case runs the head on completions only.
    start = PROMPT if aggregation == "seq_mean_token_mean" else 0
    objective = policy_gradient(CFG, logprob_chunk=8, **reference_loss(aggregation))
    step = fast_jit(lambda s, b: train_step(s, b, objective=objective, optimizer=sgd, micro_batch_size=2))
    state = init_train_state(params, sgd, jax.random.key(0))
    new, metrics = step(state, batch.replace(loss_start=start))
    got_grads = jax.tree.map(lambda a, b: a - b, state.params, new.params)
    tree_allclose(got_grads, want_grads, atol=2e-6, rtol=2e-4)
    # Every metric of policy_loss, re-combined over 4 micro-batches (one of
    # them empty), equals its full-batch value.
    for name, value in want_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    assert metrics["finite"] == 1.0 and int(new.step) == 1
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(want_grads), rtol=1e-4)


def test_bad_arguments_are_named(params):
    batch = make_batch(params)
    state = init_train_state(params, optax.sgd(1.0), jax.random.key(0))
    def trace(micro_batch_size=None, **kw):
        objective = policy_gradient(CFG, **(PPO | kw))
        return jax.eval_shape(lambda s, b: train_step(s, b, objective=objective, optimizer=optax.sgd(1.0),
                                                      micro_batch_size=micro_batch_size), state, batch)

    with pytest.raises(ValueError, match="micro_batch_size=3"):
        trace(micro_batch_size=3)
    with pytest.raises(ValueError, match="max_len"):
        trace(aggregation="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="ref_logp"):
        trace(kl_coef=0.1)


# ---------------------------------------------------------------------------
# Compilation, sharding, numerics


@pytest.mark.slow  # 20 s on 2 cores: the slow set (CI runs it) keeps the default suite under 10 minutes
def test_jit_equals_eager(params):
    batch = make_batch(params, seed=3)
    eager_state, eager = train_step(init_train_state(params, ADAM, jax.random.key(0)), batch, **ADAM_STEP_KW)
    jit_state, jitted = ADAM_STEP(init_train_state(params, ADAM, jax.random.key(0)), batch)
    # Adam divides by |g|: float reassociation on a near-zero gradient moves that element by up to
    # ~1e-3 of the step (lr 3e-2), so parameters agree to 1e-4; a wrong update is off by ~lr.
    tree_allclose(eager_state.params, jit_state.params, atol=1e-4)
    tree_allclose(eager, jitted, rtol=1e-5, atol=1e-6)


def test_sharded_step_on_8_devices_equals_one_device(params):
    assert len(jax.devices()) == 8, "conftest sets 8 simulated devices"
    batch = make_batch(params, seed=4)
    tx = make_optimizer(1e-2, warmup_steps=1, schedule="cosine", total_steps=10)
    loss = dict(PPO, kl_coef=0.05)
    results = []
    for mesh_cfg, n_devices in ((MeshConfig(fsdp=1), 1), (MeshConfig(data=1, fsdp=4, tensor=2), 8)):
        mesh = make_mesh(mesh_cfg, jax.devices()[:n_devices])
        step, shardings = make_train_step(policy_gradient(CFG, logprob_chunk=8, **loss), tx, mesh,
                                          param_specs(CFG), micro_batch_size=4, compiler_options=FAST)
        # The step donates its state: give it a copy of the shared params.
        state = init_train_state(jax.tree.map(jnp.copy, params), tx, jax.random.key(0), with_reference=True,
                                 shardings=shardings)
        for _ in range(3):  # the first warmup step has rate 0; then the policy leaves the reference
            state, metrics = step(state, batch.replace(loss_start=PROMPT))
        # The state keeps its sharding through the update.
        for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
            assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p1, m1), (p8, m8) = results
    tree_allclose(p1, p8, atol=1e-5)
    tree_allclose(m1, m8, rtol=1e-4, atol=1e-5)
    assert m8["kl_ref"] > 0 and m8["learning_rate"] > 0


@pytest.mark.slow  # 9-12 s: the slow set (CI runs it) keeps the default suite under 10 minutes
def test_remat_and_bfloat16_compute_with_float32_master_weights(params, reference):
    batch, want = reference
    want_grads = want["token_mean"][0]
    sgd = optax.sgd(1.0)
    grads = {}
    for name, cfg in {"remat": dataclasses.replace(CFG, remat=True),
                      "bf16": dataclasses.replace(CFG, compute_dtype="bfloat16")}.items():
        state = init_train_state(params, sgd, jax.random.key(0))
        objective = policy_gradient(cfg, **reference_loss("token_mean"))
        step = fast_jit(lambda s, b, o=objective: train_step(s, b, objective=o, optimizer=sgd))
        new, _ = step(state, batch)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
        grads[name] = jax.tree.map(lambda a, b: a - b, params, new.params)
    tree_allclose(grads["remat"], want_grads, atol=2e-6, rtol=2e-4)
    norms = optax.tree.norm(grads["bf16"]) * optax.tree.norm(want_grads)
    cos = optax.tree.vdot(grads["bf16"], want_grads) / norms
    assert cos > 0.98


def test_reference_params_and_precomputed_ref_logp_agree(params):
    batch = make_batch(params, seed=6)
    sgd = optax.sgd(1.0)
    loss = dict(PPO, kl_coef=0.1, kl_kind="k3")
    ref_params = jax.tree.map(lambda x: x + 0.01 * jnp.sign(x), params)
    state = init_train_state(params, sgd, jax.random.key(0))._replace(ref_params=ref_params)
    step = fast_jit(lambda s, b: train_step(s, b, objective=policy_gradient(CFG, **loss), optimizer=sgd))
    from_params = step(state, batch)
    ref_logp, _ = naive_logprobs(ref_params, batch.tokens, batch.attention_mask)
    from_batch = step(state._replace(ref_params=None), batch.replace(ref_logp=ref_logp))
    tree_allclose(from_params[0].params, from_batch[0].params, atol=1e-6)
    np.testing.assert_allclose(from_params[1]["kl_ref"], from_batch[1]["kl_ref"], rtol=1e-4)
    assert from_params[1]["kl_ref"] > 0


# ---------------------------------------------------------------------------
# Learning behaviour


def test_inner_epochs_move_ratios_away_from_one_and_clip(params):
    batch = make_batch(params, seed=7, noise=0.0)  # old log-probs are the current policy's
    state = init_train_state(params, ADAM, jax.random.key(0))
    history = []
    for _ in range(3):  # mu = 3 passes over one rollout batch with its stored old_logp
        state, metrics = ADAM_STEP(state, batch)
        history.append(jax.device_get(metrics))
    assert abs(history[0]["ratio_mean"] - 1) < 1e-5 and history[0]["clip_frac"] == 0
    assert history[-1]["ratio_max"] > 1.05 and history[-1]["ratio_min"] < 0.95
    assert history[-1]["clip_frac"] > 0
    assert history[-1]["kl_old_k3"] > history[0]["kl_old_k3"]


def test_one_update_moves_logprob_with_the_advantage_sign(params):
    batch = make_batch(params, seed=8, noise=0.0)
    advantages = jnp.where(jnp.arange(B) % 2 == 0, 1.0, -1.0)
    batch = batch.replace(advantages=advantages)
    new, _ = ADAM_STEP(init_train_state(params, ADAM, jax.random.key(0)), batch)

    def sequence_logp(p):
        logp, _ = naive_logprobs(p, batch.tokens, batch.attention_mask)
        return np.asarray(jnp.sum(jnp.where(batch.loss_mask, logp, 0.0), axis=1))

    delta = sequence_logp(new.params) - sequence_logp(params)
    has_tokens = np.asarray(batch.loss_mask.any(axis=1))
    assert np.all(delta[has_tokens & (np.asarray(advantages) > 0)] > 0)
    assert np.all(delta[has_tokens & (np.asarray(advantages) < 0)] < 0)


def test_zero_variance_groups_give_zero_gradient(params):
    rewards = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])  # 2 prompts x 4 completions
    advantages = group_advantages(rewards).reshape(-1)
    batch = make_batch(params, seed=9).replace(advantages=advantages)
    new, metrics = ADAM_STEP(init_train_state(params, ADAM, jax.random.key(0)), batch)
    assert metrics["grad_norm"] == 0.0 and metrics["loss"] == 0.0
    tree_allclose(new.params, params, atol=0)


def test_non_finite_loss_is_flagged_and_the_update_skipped(params):
    batch = make_batch(params, seed=10)
    # NaN outside the loss mask is ignored ...
    padded = batch.replace(old_logp=jnp.where(batch.loss_mask, batch.old_logp, jnp.nan))
    state, metrics = ADAM_STEP(init_train_state(params, ADAM, jax.random.key(0)), padded)
    assert metrics["finite"] == 1.0 and int(state.step) == 1
    # ... NaN on a completion token poisons the loss: flagged, parameters kept.
    bad = batch.replace(old_logp=batch.old_logp.at[0, PROMPT + 2].set(jnp.nan))
    before = jax.device_get(state)
    after, metrics = ADAM_STEP(state, bad)
    assert metrics["finite"] == 0.0 and np.isnan(metrics["loss"])
    assert int(after.step) == 1
    tree_allclose(after.params, before.params, atol=0)
    tree_allclose(after.opt_state, before.opt_state, atol=0)


def test_an_update_that_makes_the_state_non_finite_is_skipped(params):
    """A finite loss and gradient can still give infinite parameters (learning rate 1e39): not applied."""
    batch = make_batch(params, seed=11)
    tx = make_optimizer(1e39)
    step = fast_jit(lambda s, b: train_step(s, b, objective=policy_gradient(CFG, **PPO), optimizer=tx))
    state = init_train_state(params, tx, jax.random.key(0))
    after, metrics = step(state, batch)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert metrics["finite"] == 0.0 and int(after.step) == 0
    tree_allclose(after.params, params, atol=0)
    tree_allclose(after.opt_state, state.opt_state, atol=0)


# ---------------------------------------------------------------------------
# Optimizer and config edges


def test_optimizer_schedule_and_weight_decay_mask():
    tx = make_optimizer(1.0, warmup_steps=2, schedule="cosine", total_steps=6, weight_decay=0.5,
                        max_grad_norm=0.0)
    p = {"w": jnp.ones((2, 2)), "norm_D": jnp.ones(2), "layers": {"q_bias_LNH": jnp.ones(2)}}
    state = tx.init(p)
    rates = []
    for _ in range(6):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, p), state, p)
        rates.append(float(state.hyperparams["learning_rate"]))
    np.testing.assert_allclose(rates, [0.0, 0.5, 1.0, 0.853553, 0.5, 0.146447], atol=1e-5)
    # With zero gradients only weight decay moves the weights: matrices only.
    assert np.all(np.asarray(updates["w"]) < 0)
    assert not np.any(updates["norm_D"]) and not np.any(updates["layers"]["q_bias_LNH"])
    with pytest.raises(ValueError, match="total_steps"):
        make_optimizer(1.0, schedule="cosine")
    assert optimizer_from_config(OptimizerConfig(), total_steps=10) is not None


def test_loss_settings_fill_dr_grpo_normaliser():
    kw = policy_loss_settings(LOSS_PRESETS["dr_grpo"], max_completion_len=128, temperature=0.9)
    assert kw["aggregation"] == "seq_mean_token_sum_norm" and kw["max_len"] == 128
    assert kw["kl_coef"] == 0.0 and kw["temperature"] == 0.9


@pytest.mark.slow  # end to end, 10-35 s on 2 cores: in the slow set, which CI runs too
def test_mfu_benchmark_tiny_run_on_8_simulated_devices():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_mfu_gpu

    (row,) = bench_mfu_gpu.main(["--tiny", "--steps", "1"])
    assert row["loss finite"] and row["tokens/s"] > 0 and 0 < row["MFU %"]
    # The FLOP count by hand: 6 x layer matmul params x 64 positions, 6 x head on the
    # 48 completion positions, causal attention.
    layer = 64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128
    want = 6 * 2 * layer * 64 + 6 * 64 * 512 * 48 + 6 * 2 * 4 * 16 * 64 * 64
    assert bench_mfu_gpu.model_flops(bench_mfu_gpu.TINY, 64, 48) == want
