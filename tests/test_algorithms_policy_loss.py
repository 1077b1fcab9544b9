"""Policy losses (PPO-clip, GSPO, GSPO-token): hand-computed cases and properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.algorithms import AGGREGATIONS, POLICY_VARIANTS, group_advantages, policy_loss

NAN = float("nan")
TOL = dict(rtol=1e-5, atol=1e-6)

# Three sequences of up to three tokens; token (1, 2) is padding and holds garbage.
MASK = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
RATIOS = np.array([[1.0, 1.5, 0.5], [0.7, 4.0, 1.0], [0.25, 1.0, 0.64]])
OLD_LOGP = np.array([[-1.0, -2.0, -0.5], [-1.5, -3.0, -0.2], [-0.7, -1.2, -2.2]])
LOGP = np.where(MASK == 1, OLD_LOGP + np.log(RATIOS), NAN)
# GSPO sequence ratios (geometric means of the token ratios above):
S0 = 0.9085602964160698  # 0.75 ** (1/3)
S1 = 1.6733200530681511  # sqrt(0.7 * 4)
S2 = 0.5428835233189814  # 0.16 ** (1/3)


def _mask(rows):
    """MASK with every row outside ``rows`` turned into padding (shapes stay 3 x 3)."""
    keep = np.zeros((3, 1), int)
    keep[rows] = 1
    return jnp.asarray(MASK * keep)


def _loss(variant, advantages, *, rows=slice(None), aggregation="token_mean", **kwargs):
    kwargs = dict(clip_low=0.2, clip_high=0.28) | kwargs
    return policy_loss(
        jnp.asarray(LOGP, jnp.float32),
        jnp.asarray(OLD_LOGP, jnp.float32),
        jnp.asarray(advantages, jnp.float32),
        _mask(rows),
        variant=variant,
        aggregation=aggregation,
        **kwargs,
    )


def _grad(variant, advantages, *, rows=slice(None), **kwargs):
    def loss_of(logp):
        return policy_loss(
            logp,
            jnp.asarray(OLD_LOGP, jnp.float32),
            jnp.asarray(advantages, jnp.float32),
            _mask(rows),
            variant=variant,
            **(dict(clip_low=0.2, clip_high=0.28) | kwargs),
        )[0]

    return np.asarray(jax.grad(loss_of)(jnp.asarray(LOGP, jnp.float32)))


# ----------------------------------------------------------------------------- PPO-clip
# Rows 0-1 (row 2 is padding, its NaN advantage is ignored), advantages (1, -2), clip range
# [0.8, 1.28], dual-clip c = 3. Per-token loss:
#   row 0 (A = +1): r = 1 -> -1; r = 1.5 -> -1.28 (high clip); r = 0.5 -> -0.5 (unclipped)
#   row 1 (A = -2): r = 0.7 -> 1.6 (low clip); r = 4 -> min(8, 6) = 6 (dual clip)
PPO_ADV = [1.0, -2.0, NAN]
PPO_CASES = [
    ("token_mean", 0.964),  # (-1 - 1.28 - 0.5 + 1.6 + 6) / 5
    ("seq_mean_token_mean", 1.4366666667),  # (-2.78 / 3 + 7.6 / 2) / 2
    ("seq_mean_token_sum", 2.41),  # (-2.78 + 7.6) / 2
    ("seq_mean_token_sum_norm", 0.8033333333),  # (-2.78 / 3 + 7.6 / 3) / 2
]


@pytest.mark.parametrize("aggregation, expected", PPO_CASES)
def test_ppo_clip_hand_computed(aggregation, expected):
    loss, metrics = _loss("ppo_clip", PPO_ADV, rows=slice(0, 2), aggregation=aggregation, dual_clip=3.0)
    np.testing.assert_allclose(loss, expected, **TOL)
    np.testing.assert_allclose(metrics["pg_loss"], expected, **TOL)


def test_ppo_clip_hand_computed_metrics():
    _, metrics = _loss("ppo_clip", PPO_ADV, rows=slice(0, 2), dual_clip=3.0)
    expected = {
        "clip_frac_low": 0.2, "clip_frac_high": 0.2, "clip_frac_dual": 0.2, "clip_frac": 0.6,
        "ratio_mean": 1.54, "ratio_min": 0.5, "ratio_max": 4.0,  # (1 + 1.5 + 0.5 + 0.7 + 4) / 5
        "kl_old_k1": -0.14838746894587546,  # mean(-log r)
        "kl_old_k3": 0.3916125310541245,  # mean(r - 1 - log r)
        "advantage_mean": -0.5, "advantage_std": 1.5, "advantage_min": -2.0, "advantage_max": 1.0,
        "num_tokens": 5.0, "num_sequences": 2.0,
    }  # fmt: skip
    for key, value in expected.items():
        np.testing.assert_allclose(metrics[key], value, **TOL, err_msg=key)
    assert "kl_ref" not in metrics and "entropy" not in metrics


def test_ppo_clip_without_dual_clip():
    loss, metrics = _loss("ppo_clip", PPO_ADV, rows=slice(0, 2))
    np.testing.assert_allclose(loss, 1.364, **TOL)  # the r = 4 token now costs 8
    assert metrics["clip_frac_dual"] == 0.0


def test_ppo_clip_hand_computed_gradient():
    # Only unclipped tokens pass gradient, d/dlogp (-A r) = -A r, over 5 tokens (token_mean)
    # or over n_i * 2 sequences (seq_mean_token_mean).
    grad = _grad("ppo_clip", PPO_ADV, rows=slice(0, 2), aggregation="token_mean", dual_clip=3.0)
    np.testing.assert_allclose(grad, [[-0.2, 0.0, -0.1], [0.0] * 3, [0.0] * 3], **TOL)
    grad = _grad("ppo_clip", PPO_ADV, rows=slice(0, 2), aggregation="seq_mean_token_mean", dual_clip=3.0)
    np.testing.assert_allclose(grad, [[-1 / 6, 0.0, -1 / 12], [0.0] * 3, [0.0] * 3], **TOL)


# ----------------------------------------------------------------------------- GSPO
# Advantages (1, 1, -1): row 0 unclipped (-S0), row 1 high clip (-1.28), row 2 low clip (0.8).
GSPO_CASES = [
    ("token_mean", -0.3607101111560262),  # (3 * -S0 + 2 * -1.28 + 3 * 0.8) / 8
    ("seq_mean_token_mean", -0.4628534321386899),  # (-S0 - 1.28 + 0.8) / 3
    ("seq_mean_token_sum", -0.9618936297494032),  # (3 * -S0 + 2 * -1.28 + 3 * 0.8) / 3
    ("seq_mean_token_sum_norm", -0.3206312099164677),  # the same / T = 3
]


@pytest.mark.parametrize("variant", ["gspo", "gspo_token"])
@pytest.mark.parametrize("aggregation, expected", GSPO_CASES)
def test_gspo_hand_computed(variant, aggregation, expected):
    loss, _ = _loss(variant, [1.0, 1.0, -1.0], aggregation=aggregation)
    np.testing.assert_allclose(loss, expected, **TOL)


@pytest.mark.parametrize("variant", ["gspo", "gspo_token"])
def test_gspo_hand_computed_metrics_and_gradient(variant):
    _, metrics = _loss(variant, [1.0, 1.0, -1.0])
    np.testing.assert_allclose(metrics["clip_frac_high"], 2 / 8, **TOL)  # row 1, 2 tokens
    np.testing.assert_allclose(metrics["clip_frac_low"], 3 / 8, **TOL)  # row 2, 3 tokens
    np.testing.assert_allclose(metrics["ratio_min"], S2, **TOL)
    np.testing.assert_allclose(metrics["ratio_max"], S1, **TOL)
    np.testing.assert_allclose(metrics["ratio_mean"], (3 * S0 + 2 * S1 + 3 * S2) / 8, **TOL)
    # Only row 0 is unclipped: d/dlogp_t of (1/3) * -S0 is -S0 / 3 * (1/3) per token.
    grad = _grad(variant, [1.0, 1.0, -1.0], aggregation="seq_mean_token_mean")
    np.testing.assert_allclose(grad, [[-S0 / 9] * 3, [0.0] * 3, [0.0] * 3], **TOL)


@pytest.mark.parametrize("variant", ["gspo", "gspo_token"])
def test_gspo_dual_clip(variant):
    # Advantages (1, -2, -1) and c = 1.5: row 1 has S1 > 1.5 and costs 2 * 1.5 instead of 2 * S1.
    kwargs = dict(aggregation="seq_mean_token_mean")
    loss, metrics = _loss(variant, [1.0, -2.0, -1.0], dual_clip=1.5, **kwargs)
    np.testing.assert_allclose(loss, (-S0 + 3.0 + 0.8) / 3, **TOL)
    np.testing.assert_allclose(metrics["clip_frac_dual"], 2 / 8, **TOL)
    loss, _ = _loss(variant, [1.0, -2.0, -1.0], **kwargs)
    np.testing.assert_allclose(loss, (-S0 + 2 * S1 + 0.8) / 3, **TOL)


def test_gspo_token_uses_token_advantages_per_token():
    # Row 0 alone, token advantages (1, 2, -1); S0 is inside the clip range.
    # GSPO-token: loss = (1/3) sum_t -A_t S0, gradient -A_t S0 / 3 on token t.
    # GSPO: the gradient flows through the shared S0: -(2/3) S0 / 3 on every token.
    advantages = [[1.0, 2.0, -1.0], [NAN] * 3, [NAN] * 3]
    kwargs = dict(rows=slice(0, 1), aggregation="seq_mean_token_mean")
    loss, _ = _loss("gspo_token", advantages, **kwargs)
    np.testing.assert_allclose(loss, -2 / 3 * S0, **TOL)
    grad = _grad("gspo_token", advantages, **kwargs)
    np.testing.assert_allclose(grad, [[-S0 / 3, -2 * S0 / 3, S0 / 3], [0.0] * 3, [0.0] * 3], **TOL)
    grad = _grad("gspo", advantages, **kwargs)
    np.testing.assert_allclose(grad, [[-2 * S0 / 9] * 3, [0.0] * 3, [0.0] * 3], **TOL)


# ----------------------------------------------------------------------------- KL, entropy
# One sequence of two tokens; everything else is padding with garbage.
KL_MASK = jnp.array([[1, 1, 0], [0, 0, 0], [0, 0, 0]])
KL_LOGP = jnp.where(KL_MASK == 1, jnp.log(jnp.array([[0.5, 0.25, 1.0]])), NAN)
KL_REF = jnp.where(KL_MASK == 1, jnp.log(jnp.array([[0.25, 0.5, 1.0]])), -jnp.inf)


def _kl_loss(logp, aggregation="token_mean", **kwargs):
    return policy_loss(
        logp,
        KL_LOGP,
        jnp.zeros(3),
        KL_MASK,
        variant="ppo_clip",
        clip_low=0.2,
        clip_high=0.2,
        aggregation=aggregation,
        ref_logp=KL_REF,
        **kwargs,
    )


def test_kl_term_hand_computed():
    # k3 per token: 0.5 + log 2 - 1 = 0.19314718, 2 - log 2 - 1 = 0.30685282; mean 0.25.
    loss, metrics = _kl_loss(KL_LOGP, kl_coef=0.04)
    np.testing.assert_allclose(metrics["kl_ref"], 0.25, **TOL)
    np.testing.assert_allclose(metrics["kl_loss"], 0.01, **TOL)
    np.testing.assert_allclose(metrics["pg_loss"], 0.0, **TOL)
    np.testing.assert_allclose(loss, 0.01, **TOL)
    # Sum of the two tokens over one sequence.
    _, metrics = _kl_loss(KL_LOGP, aggregation="seq_mean_token_sum", kl_coef=0.04)
    np.testing.assert_allclose(metrics["kl_loss"], 0.02, **TOL)
    _, metrics = _kl_loss(KL_LOGP, kl_coef=0.04, kl_kind="k1")
    np.testing.assert_allclose(metrics["kl_ref"], 0.0, **TOL)  # (log 2 - log 2) / 2
    _, metrics = _kl_loss(KL_LOGP, kl_coef=0.04, kl_kind="k2")
    np.testing.assert_allclose(metrics["kl_ref"], 0.2402265069591007, **TOL)


def test_kl_term_gradient():
    # d k3 / d logp = 1 - exp(ref - logp): 1 - 0.5 and 1 - 2; times 0.04 / 2 tokens.
    grad = jax.grad(lambda lp: _kl_loss(lp, kl_coef=0.04)[0])(KL_LOGP)
    np.testing.assert_allclose(grad, [[0.01, -0.02, 0.0], [0.0] * 3, [0.0] * 3], **TOL)


def test_entropy_bonus_hand_computed():
    entropy = jnp.where(KL_MASK == 1, jnp.array([[0.5, 1.5, 0.0]]), NAN)

    def loss_of(ent):
        return policy_loss(
            KL_LOGP,
            KL_LOGP,
            jnp.zeros(3),
            KL_MASK,
            variant="ppo_clip",
            clip_low=0.2,
            clip_high=0.2,
            aggregation="token_mean",
            entropy=ent,
            entropy_coef=0.01,
        )

    loss, metrics = loss_of(entropy)
    np.testing.assert_allclose(metrics["entropy"], 1.0, **TOL)
    np.testing.assert_allclose(metrics["entropy_loss"], -0.01, **TOL)
    np.testing.assert_allclose(loss, -0.01, **TOL)
    grad = jax.grad(lambda e: loss_of(e)[0])(entropy)
    np.testing.assert_allclose(grad, [[-0.005, -0.005, 0.0], [0.0] * 3, [0.0] * 3], **TOL)


# ----------------------------------------------------------------------------- properties
def _random_batch(seed, batch=4, length=5, spread=0.0):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 0.5, (batch, length))
    logp = old + rng.normal(0.0, spread, (batch, length))
    mask = (np.arange(length)[None] < rng.integers(1, length + 1, (batch, 1))).astype(np.int32)
    mask[-1] = 0  # a padding row
    advantages = rng.normal(size=batch)
    return tuple(jnp.asarray(x, jnp.float32) for x in (logp, old, advantages)) + (jnp.asarray(mask),)


@pytest.mark.parametrize("variant", POLICY_VARIANTS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_ratio_one_gives_plain_policy_gradient(variant, aggregation):
    logp, old, advantages, mask = _random_batch(1)
    m = np.asarray(mask, np.float64)
    a = np.asarray(advantages, np.float64)[:, None]
    n = m.sum(-1, keepdims=True)
    n_seqs = (n > 0).sum()
    weight = {  # d loss / d logp_it = -A_i * weight_i on completion tokens
        "token_mean": np.full_like(n, 1 / m.sum()),
        "seq_mean_token_mean": 1 / (np.maximum(n, 1) * n_seqs),
        "seq_mean_token_sum": np.full_like(n, 1 / n_seqs),
        "seq_mean_token_sum_norm": np.full_like(n, 1 / (m.shape[1] * n_seqs)),
    }[aggregation]

    def loss_of(lp):
        return policy_loss(
            lp, old, advantages, mask, variant=variant, clip_low=0.2, clip_high=0.2, aggregation=aggregation
        )

    (loss, metrics), grad = jax.value_and_grad(loss_of, has_aux=True)(old)
    # Ratio variants see rho = 1; "sft" has no ratio and "cispo" weighs logp by the clipped ratio,
    # so their value is -A * logp; "sapo" gates rho = 1 to 2 / tau (tau 1.0 for A > 0, else 1.05).
    # The gradient is the same for all.
    per_token = {
        "sft": np.asarray(old, np.float64),
        "cispo": np.asarray(old, np.float64),
        "sapo": np.where(a > 0, 2 / 1.0, 2 / 1.05),
    }.get(variant, 1.0)
    np.testing.assert_allclose(loss, -np.sum(a * m * weight * per_token), **TOL)
    np.testing.assert_allclose(grad, -a * m * weight, **TOL)
    assert metrics["clip_frac"] == 0.0


@pytest.mark.parametrize("variant", ["gspo", "gspo_token"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_sum_norm"])
def test_gspo_equals_ppo_clip_for_one_token_sequences(variant, aggregation):
    # Each sequence has one completion token (at a different position; the rest is padding
    # with garbage). Ratios and advantages put one sequence in each region: low clip,
    # unclipped, high clip, dual clip.
    mask = jnp.eye(4, 5, k=1, dtype=jnp.int32)
    old = jnp.where(mask == 1, jnp.array([[-1.0], [-0.5], [-2.0], [-1.5]]), -jnp.inf)
    logp = jnp.where(mask == 1, old + jnp.log(jnp.array([[0.5], [1.1], [1.6], [4.0]])), jnp.nan)
    advantages = jnp.array([-1.0, 0.7, 1.3, -0.4])
    kwargs = dict(clip_low=0.2, clip_high=0.28, dual_clip=2.0, aggregation=aggregation)

    def run(name):
        fn = functools.partial(policy_loss, variant=name, **kwargs)
        return jax.value_and_grad(fn, has_aux=True)(logp, old, advantages, mask)

    (ppo, ppo_metrics), ppo_grad = run("ppo_clip")
    (loss, metrics), grad = run(variant)
    np.testing.assert_allclose(loss, ppo, **TOL)
    np.testing.assert_allclose(grad, ppo_grad, **TOL)
    for key in ("clip_frac_low", "clip_frac_high", "clip_frac_dual"):
        np.testing.assert_allclose(metrics[key], ppo_metrics[key], **TOL)
    np.testing.assert_allclose(ppo_metrics["clip_frac"], 0.75, **TOL)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gspo_token_equals_gspo_for_sequence_advantages(aggregation):
    logp, old, _, mask = _random_batch(3, spread=0.3)
    # Sequence ratios are about (1.09, 1.16, 0.77): high clip, unclipped, low clip.
    advantages = jnp.array([1.0, -1.0, -1.0, 0.5])
    kwargs = dict(clip_low=0.05, clip_high=0.06, aggregation=aggregation)

    def run(name):
        fn = functools.partial(policy_loss, variant=name, **kwargs)
        return jax.value_and_grad(fn, has_aux=True)(logp, old, advantages, mask)

    (gspo, metrics), gspo_grad = run("gspo")
    (token, _), token_grad = run("gspo_token")
    np.testing.assert_allclose(token, gspo, **TOL)
    np.testing.assert_allclose(token_grad, gspo_grad, **TOL)
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0
    assert np.any(np.asarray(gspo_grad) != 0.0)


@pytest.mark.parametrize("variant", POLICY_VARIANTS)
def test_sequence_and_broadcast_token_advantages_agree(variant):
    logp, old, advantages, mask = _random_batch(4, spread=0.3)
    kwargs = dict(variant=variant, clip_low=0.2, clip_high=0.28, aggregation="token_mean")
    per_seq, _ = policy_loss(logp, old, advantages, mask, **kwargs)
    per_token = jnp.broadcast_to(advantages[:, None], logp.shape)
    per_token = jnp.where(mask == 1, per_token, jnp.nan)  # garbage off the mask is ignored
    np.testing.assert_allclose(policy_loss(logp, old, per_token, mask, **kwargs)[0], per_seq, **TOL)


@pytest.mark.parametrize("variant", POLICY_VARIANTS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_masked_tokens_get_zero_gradient_and_garbage_does_not_leak(variant, aggregation):
    logp, old, advantages, mask = _random_batch(5, spread=0.3)
    off = mask == 0
    garbage = lambda x, value: jnp.where(off, value, x)
    logp, old = garbage(logp, jnp.nan), garbage(old, -jnp.inf)
    ref = garbage(logp - 0.1, jnp.inf)
    entropy = garbage(jnp.ones_like(logp), jnp.nan)

    def loss_of(lp, ent):
        return policy_loss(
            lp,
            old,
            advantages,
            mask,
            variant=variant,
            clip_low=0.2,
            clip_high=0.28,
            aggregation=aggregation,
            dual_clip=3.0,
            ref_logp=ref,
            kl_coef=0.1,
            entropy=ent,
            entropy_coef=0.01,
        )

    (loss, metrics), grads = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)(logp, entropy)
    assert np.isfinite(loss)
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    for grad in grads:
        assert np.all(np.isfinite(grad))
        assert np.all(np.asarray(grad)[np.asarray(off)] == 0.0)
        assert np.any(np.asarray(grad)[~np.asarray(off)] != 0.0)


@pytest.mark.parametrize("variant", POLICY_VARIANTS)
def test_zero_variance_group_gives_zero_gradient(variant):
    rewards = jnp.array([[1.0, 1.0], [0.0, 1.0]])
    advantages = group_advantages(rewards).reshape(-1)
    logp, old, _, _ = _random_batch(6, spread=0.1)
    mask = jnp.ones(logp.shape)

    grad = jax.grad(
        lambda lp: policy_loss(
            lp,
            old,
            advantages,
            mask,
            variant=variant,
            clip_low=0.2,
            clip_high=0.28,
            aggregation="seq_mean_token_mean",
        )[0]
    )(logp)
    assert np.all(np.asarray(advantages[:2]) == 0.0)
    assert np.all(np.asarray(grad[:2]) == 0.0)
    assert np.all(np.asarray(grad[2:]) != 0.0)


@pytest.mark.parametrize("variant", POLICY_VARIANTS)
def test_jit_equals_eager(variant):
    logp, old, advantages, mask = _random_batch(7, spread=0.3)
    kwargs = dict(
        variant=variant,
        clip_low=0.2,
        clip_high=0.28,
        aggregation="seq_mean_token_mean",
        dual_clip=3.0,
        kl_coef=0.04,
        max_len=8,
    )
    fn = functools.partial(policy_loss, **kwargs)
    eager_loss, eager_metrics = fn(logp, old, advantages, mask, ref_logp=old - 0.2)
    jit_loss, jit_metrics = jax.jit(fn)(logp, old, advantages, mask, ref_logp=old - 0.2)
    np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-6, atol=1e-7)
    assert jit_metrics.keys() == eager_metrics.keys()
    for key in eager_metrics:
        np.testing.assert_allclose(jit_metrics[key], eager_metrics[key], rtol=1e-6, atol=1e-7)


def test_bfloat16_inputs_are_computed_in_float32():
    logp, old, advantages, mask = _random_batch(8, spread=0.3)
    kwargs = dict(variant="ppo_clip", clip_low=0.2, clip_high=0.28, aggregation="token_mean")
    low, _ = policy_loss(logp.astype(jnp.bfloat16), old, advantages, mask, **kwargs)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, policy_loss(logp, old, advantages, mask, **kwargs)[0], atol=2e-2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variant="reinforce"), "unknown policy loss"),
        (dict(aggregation="sum"), "unknown aggregation"),
        (dict(kl_kind="k4", ref_logp=jnp.zeros((2, 3))), "unknown KL estimator"),
        (dict(kl_coef=0.1), "needs ref_logp"),
        (dict(dual_clip=1.0), "dual_clip must be > 1"),
        (dict(entropy_coef=0.01), "needs entropy"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    base = dict(variant="ppo_clip", clip_low=0.2, clip_high=0.2, aggregation="token_mean")
    with pytest.raises(ValueError, match=message):
        policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(2), jnp.ones((2, 3)), **(base | kwargs))


def test_sft_variant_is_advantage_weighted_nll():
    """l = -A * logp, token-mean: with A = 1 the plain NLL of the masked tokens; no ratio, no clip."""
    logp = jnp.array([[-0.5, -1.0, -2.0], [-0.25, -3.0, 0.0]])
    old = jnp.full((2, 3), 7.0)  # ignored
    mask = jnp.array([[1, 1, 0], [1, 0, 0]], bool)
    loss, metrics = policy_loss(logp, old, jnp.array([1.0, 1.0]), mask, variant="sft", clip_low=0.2,
                                clip_high=0.2, aggregation="token_mean")
    np.testing.assert_allclose(loss, (0.5 + 1.0 + 0.25) / 3, rtol=1e-6)
    assert float(metrics["clip_frac"]) == 0.0 and float(metrics["ratio_mean"]) == 1.0
    weighted, _ = policy_loss(logp, old, jnp.array([2.0, -1.0]), mask, variant="sft", clip_low=0.2,
                              clip_high=0.2, aggregation="token_mean")
    np.testing.assert_allclose(weighted, (2 * 0.5 + 2 * 1.0 - 0.25) / 3, rtol=1e-6)
    grad = jax.grad(lambda lp: policy_loss(lp, old, jnp.array([1.0, 1.0]), mask, variant="sft", clip_low=0.2,
                                           clip_high=0.2, aggregation="token_mean")[0])(logp)
    np.testing.assert_allclose(grad, -np.asarray(mask, np.float32) / 3.0, rtol=1e-6)


# ----------------------------------------------------------------------------- CISPO
# Rows 0-1 of the fixture, advantages (1, -2), weight bounds [0.8, 1.28]. Per token
# l = -clip(r) * A * logp with logp = old + log r:
#   row 0: r = 1 -> 1; r = 1.5 -> 1.28 * (-2 + log 1.5); r = 0.5 -> 0.8 * (-0.5 + log 0.5)
#   row 1: r = 0.7 -> -2 * 0.8 * (-1.5 + log 0.7); r = 4 -> -2 * 1.28 * (-3 + log 4)
CISPO_TOKENS = [1.0, 2.0410046616215496, 0.9545177444479563, -2.970679910301972, -4.1310864355330805]


def test_cispo_hand_computed():
    loss, metrics = _loss("cispo", PPO_ADV, rows=slice(0, 2))
    np.testing.assert_allclose(loss, sum(CISPO_TOKENS) / 5, **TOL)  # -0.62124879
    # Weights hit a bound on r = 1.5, 4 (high) and r = 0.5, 0.7 (low), whatever the advantage.
    expected = {"clip_frac_high": 0.4, "clip_frac_low": 0.4, "clip_frac_dual": 0.0, "clip_frac": 0.8,
                "ratio_mean": 1.54, "ratio_max": 4.0}  # fmt: skip
    for key, value in expected.items():
        np.testing.assert_allclose(metrics[key], value, **TOL, err_msg=key)
    loss, _ = _loss("cispo", PPO_ADV, rows=slice(0, 2), aggregation="seq_mean_token_sum")
    np.testing.assert_allclose(loss, sum(CISPO_TOKENS) / 2, **TOL)
    # Dual clip does not apply to CISPO.
    loss, _ = _loss("cispo", PPO_ADV, rows=slice(0, 2), dual_clip=3.0)
    np.testing.assert_allclose(loss, sum(CISPO_TOKENS) / 5, **TOL)


def test_cispo_gradient_keeps_clipped_tokens():
    # d l / d logp = -clip(r) * A, over 5 tokens: every token passes gradient, clipped ones at
    # the bound (PPO-clip gives 0 on r = 1.5 and r = 0.7, see test_ppo_clip_hand_computed_gradient).
    grad = _grad("cispo", PPO_ADV, rows=slice(0, 2), aggregation="token_mean")
    np.testing.assert_allclose(grad, [[-0.2, -0.256, -0.16], [0.32, 0.512, 0.0], [0.0] * 3], **TOL)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_cispo_without_clipping_has_the_unclipped_surrogate_gradient(aggregation):
    # With bounds that never bind, grad(-sg(r) A logp) = -r A grad logp = grad(-r A).
    logp, old, advantages, mask = _random_batch(9, spread=0.5)
    wide = dict(clip_low=1.0, clip_high=1e6, aggregation=aggregation)

    def grad_of(variant):
        return jax.grad(lambda lp: policy_loss(lp, old, advantages, mask, variant=variant, **wide)[0])(logp)

    np.testing.assert_allclose(grad_of("cispo"), grad_of("ppo_clip"), **TOL)
    assert np.any(np.asarray(grad_of("cispo")) != 0.0)


# ----------------------------------------------------------------------------- SAPO
# Rows 0-1, advantages (1, -2), tau_pos = 2 (row 0), tau_neg = 4 (row 1). Per token
# l = -A * (4 / tau) * sigmoid(tau * (r - 1)):
#   row 0: r = 1 -> -1; r = 1.5 -> -2 sigmoid(1); r = 0.5 -> -2 sigmoid(-1)
#   row 1: r = 0.7 -> 2 sigmoid(-1.2); r = 4 -> 2 sigmoid(12)
SAPO_TOKENS = [-1.0, -1.4621171572600098, -0.5378828427399902, 0.46295043300196465, 1.9999877116507956]


def test_sapo_hand_computed():
    kwargs = dict(rows=slice(0, 2), tau_pos=2.0, tau_neg=4.0)
    loss, metrics = _loss("sapo", PPO_ADV, **kwargs)
    np.testing.assert_allclose(loss, sum(SAPO_TOKENS) / 5, **TOL)  # -0.10741237
    assert metrics["clip_frac"] == 0.0  # nothing is hard-clipped
    # Gate weight w = 4 p (1 - p), p = sigmoid(tau (r - 1)): mean over the 5 tokens.
    np.testing.assert_allclose(metrics["gate_weight_mean"], 0.6568995610132966, **TOL)
    loss, _ = _loss("sapo", PPO_ADV, aggregation="seq_mean_token_mean", **kwargs)
    np.testing.assert_allclose(loss, (sum(SAPO_TOKENS[:3]) / 3 + sum(SAPO_TOKENS[3:]) / 2) / 2, **TOL)


def test_sapo_hand_computed_gradient():
    # d l / d logp = -A * w * r (w the gate weight above), over 5 tokens.
    grad = _grad("sapo", PPO_ADV, rows=slice(0, 2), tau_pos=2.0, tau_neg=4.0, aggregation="token_mean")
    expected = [[-0.2, -0.23593431988977823, -0.07864477329659274],
                [0.19924177352442235, 3.932247584848476e-05, 0.0], [0.0] * 3]  # fmt: skip
    # atol: 1 - sigmoid(12) keeps only ~2 significant digits in float32.
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_sapo_small_temperature_has_the_unclipped_surrogate_gradient(aggregation):
    # As tau -> 0 the gate's slope 4 p (1 - p) -> 1 for every ratio: the gradient of -r A.
    logp, old, advantages, mask = _random_batch(10, spread=0.5)
    kwargs = dict(clip_low=1.0, clip_high=1e6, aggregation=aggregation)

    def grad_of(variant, **extra):
        fn = lambda lp: policy_loss(lp, old, advantages, mask, variant=variant, **kwargs, **extra)[0]
        return jax.grad(fn)(logp)

    sapo = grad_of("sapo", tau_pos=1e-3, tau_neg=1e-3)
    np.testing.assert_allclose(sapo, grad_of("ppo_clip"), rtol=1e-4, atol=1e-7)


def test_sapo_is_finite_for_extreme_ratios():
    mask = jnp.ones((1, 3))
    old = jnp.zeros((1, 3))
    logp = jnp.array([[200.0, -200.0, 0.0]])  # ratios e^200 and e^-200 overflow / underflow

    def loss_of(lp):
        return policy_loss(lp, old, jnp.array([1.0]), mask, variant="sapo", clip_low=0.2, clip_high=0.2,
                           aggregation="token_mean")

    (loss, metrics), grad = jax.value_and_grad(loss_of, has_aux=True)(logp)
    # tau = 1: the gate is 4 sigmoid(r - 1): 4 on the huge ratio, 4 sigmoid(-1) on the tiny one, 2 at r = 1.
    np.testing.assert_allclose(loss, -(4.0 + 4 * 0.2689414213699951 + 2.0) / 3, **TOL)
    assert np.isfinite(metrics["gate_weight_mean"])
    np.testing.assert_allclose(grad, [[0.0, 0.0, -1 / 3]], atol=1e-7)  # only the on-policy token moves


@pytest.mark.parametrize("tau", [dict(tau_pos=0.0), dict(tau_neg=-1.0)])
def test_sapo_rejects_non_positive_temperatures(tau):
    with pytest.raises(ValueError, match="tau_"):
        policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(2), jnp.ones((2, 3)), variant="sapo",
                    clip_low=0.2, clip_high=0.2, aggregation="token_mean", **tau)


# ----------------------------------------------------------------------------- importance weights
def test_importance_weights_hand_computed():
    # The PPO-clip case above (per-token losses -1, -1.28, -0.5 | 1.6, 6 with dual clip 3)
    # with weights (2, 0.5, 0 | 1, 0.25); the padding row's weights are garbage.
    weights = jnp.array([[2.0, 0.5, 0.0], [1.0, 0.25, NAN], [NAN] * 3])
    kwargs = dict(rows=slice(0, 2), dual_clip=3.0, importance_weights=weights)
    loss, metrics = _loss("ppo_clip", PPO_ADV, **kwargs)
    np.testing.assert_allclose(loss, (-2.0 - 0.64 + 0.0 + 1.6 + 1.5) / 5, **TOL)
    np.testing.assert_allclose(metrics["pg_loss"], 0.092, **TOL)
    # Unclipped tokens (0, 0) and (0, 2) pass -A r w / 5: -1 * 1 * 2 / 5 and 0.
    grad = _grad("ppo_clip", PPO_ADV, aggregation="token_mean", **kwargs)
    np.testing.assert_allclose(grad, [[-0.4, 0.0, 0.0], [0.0] * 3, [0.0] * 3], **TOL)


@pytest.mark.parametrize("variant", POLICY_VARIANTS)
def test_importance_weights_are_constant_per_token_factors(variant):
    logp, old, advantages, mask = _random_batch(11, spread=0.3)
    kwargs = dict(variant=variant, clip_low=0.2, clip_high=0.28, aggregation="seq_mean_token_mean",
                  ref_logp=old - 0.1, kl_coef=0.05)  # fmt: skip

    def run(lp, w=None):
        return policy_loss(lp, old, advantages, mask, importance_weights=w, **kwargs)

    (plain, plain_metrics), plain_grad = jax.value_and_grad(run, has_aux=True)(logp)
    ones = jnp.where(mask == 1, 1.0, jnp.nan)  # garbage off the mask is ignored
    (loss, _), grad = jax.value_and_grad(run, has_aux=True)(logp, ones)
    np.testing.assert_allclose(loss, plain, **TOL)
    np.testing.assert_allclose(grad, plain_grad, **TOL)
    # A constant weight c scales the policy term only (not the KL term).
    (loss, metrics), weight_grad = jax.value_and_grad(lambda w: run(logp, w), has_aux=True)(jnp.full(4, 0.5))
    np.testing.assert_allclose(metrics["pg_loss"], 0.5 * plain_metrics["pg_loss"], **TOL)
    np.testing.assert_allclose(metrics["kl_loss"], plain_metrics["kl_loss"], **TOL)
    assert np.all(np.asarray(weight_grad) == 0.0)  # weights carry no gradient
    # Per-sequence [B] weights equal the same weights broadcast over tokens.
    per_seq = jnp.array([0.3, 1.7, 0.9, 2.0])
    broadcast = jnp.broadcast_to(per_seq[:, None], logp.shape)
    np.testing.assert_allclose(run(logp, per_seq)[0], run(logp, broadcast)[0], **TOL)
