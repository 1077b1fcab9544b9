"""On-policy distillation: the loss by hand, and the student's reverse KL to a teacher falls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.batch import Batch
from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.models import forward_padded, init_params, param_specs, policy_logprobs
from ouroboros_jax.objectives.distill import distill
from ouroboros_jax.sampling import generate
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step

CFG = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=32)
FAST = {"xla_backend_optimization_level": 0}
P, C = 3, 5


def teacher_params():
    teacher = init_params(CFG, jax.random.key(1))
    # A sharper teacher: larger logits, so the two models disagree clearly.
    return teacher | {"final_norm_D": teacher["final_norm_D"] * 8.0}


def student_batch(student, seed):
    prompts = np.random.default_rng(seed).integers(1, CFG.vocab_size, (4, P)).tolist()
    out = generate(student, CFG, prompts, max_new_tokens=C, num_samples=2, rng=jax.random.key(seed))
    tokens, attention = out.sequences()
    width = out.prompt_tokens.shape[1]
    loss_mask = np.zeros_like(attention)
    loss_mask[:, width:] = out.mask
    return Batch(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attention),
                 loss_mask=jnp.asarray(loss_mask), old_logp=jnp.zeros(tokens.shape),
                 advantages=jnp.ones(tokens.shape[0]), loss_start=width)


def exact_reverse_kl(student, teacher, batch):
    """Full-vocabulary KL(student || teacher) averaged over the completion positions."""
    ls = jax.nn.log_softmax(forward_padded(student, CFG, batch.tokens, batch.attention_mask), -1)
    lt = jax.nn.log_softmax(forward_padded(teacher, CFG, batch.tokens, batch.attention_mask), -1)
    kl = jnp.sum(jnp.exp(ls) * (ls - lt), -1)[:, :-1]  # position t - 1 predicts token t
    mask = np.asarray(batch.loss_mask)[:, 1:]
    return float(np.asarray(kl)[mask].mean())


@pytest.mark.slow
def test_distill_loss_and_metric_by_hand():
    student, teacher = init_params(CFG, jax.random.key(0)), teacher_params()
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, CFG.vocab_size, (4, P + C)), jnp.int32)
    attention = jnp.ones(tokens.shape, bool).at[0, 0].set(False)
    batch = Batch(tokens=tokens, attention_mask=attention, loss_mask=attention.at[:, :P].set(False),
                  old_logp=jnp.zeros(tokens.shape), advantages=jnp.ones(4), loss_start=P)
    objective = distill(CFG)
    value, metrics = jax.jit(objective.loss)(student, teacher, batch, objective.normalizer(batch))
    s, _ = policy_logprobs(student, CFG, batch.tokens, batch.attention_mask, with_entropy=False)
    t, _ = policy_logprobs(teacher, CFG, batch.tokens, batch.attention_mask, with_entropy=False)
    mask = np.asarray(batch.loss_mask)
    gap = np.asarray(s - t)[mask]
    np.testing.assert_allclose(metrics["distill_kl"], gap.mean(), rtol=1e-5)
    np.testing.assert_allclose(value, (gap * np.asarray(s)[mask]).mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="teacher"):
        objective.loss(student, None, batch, objective.normalizer(batch))


@pytest.mark.slow
def test_student_reverse_kl_to_the_teacher_falls():
    student, teacher = init_params(CFG, jax.random.key(0)), teacher_params()
    optimizer = make_optimizer(5e-2)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1), jax.devices()[:1])
    step_fn, shardings = make_train_step(distill(CFG), optimizer, mesh, param_specs(CFG),
                                         compiler_options=FAST)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the step donates the state
    state = init_train_state(copy(student), optimizer, jax.random.key(0), with_reference=True)
    state = jax.device_put(state._replace(ref_params=copy(teacher)), shardings)
    held_out = student_batch(student, 100)
    before = exact_reverse_kl(student, teacher, held_out)
    for i in range(25):
        state, metrics = step_fn(state, student_batch(state.params, i))
        assert float(metrics["finite"]) == 1.0
    after = exact_reverse_kl(state.params, teacher, held_out)
    # Measured: 0.49 -> 0.37 over 25 steps of 8 samples; a wrong-signed gradient raises it.
    assert after < 0.8 * before, (before, after)
