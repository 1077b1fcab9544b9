"""Supervised warm-start through the update step: batch layout, learning, early stop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.batch import pack_rows
from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.data import arithmetic_source
from ouroboros_jax.models import Tokenizer, init_params
from ouroboros_jax.models.transformer import forward_padded
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.supervised import supervised_warmstart

TOK = Tokenizer.char_level("0123456789+-*=? .Whatis")
CFG = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                  d_ff=64, max_seq_len=32)


def test_sft_batch_puts_the_loss_on_the_answer_tokens_only():
    b = pack_rows([[5, 6, 7], [8]], [[1, 2], [3, 4, 2]], width=6, advantages=[1.0, 0.5])
    np.testing.assert_array_equal(b.tokens, [[5, 6, 7, 1, 2, 0], [8, 3, 4, 2, 0, 0]])
    np.testing.assert_array_equal(b.attention_mask, [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b.loss_mask, [[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b.advantages, [1.0, 0.5])


def _answer_nll(params, examples) -> float:
    prompts = TOK.encode_batch([e.prompt for e in examples])
    answers = [TOK.encode(e.gold["answer"]) + [TOK.eos_id] for e in examples]
    b = pack_rows(prompts, answers, width=24)
    logits = forward_padded(params, CFG, b.tokens, b.attention_mask)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), b.tokens[:, 1:, None], axis=-1)[..., 0]
    mask = b.loss_mask[:, 1:]
    return float(-(np.asarray(logp) * mask).sum() / mask.sum())


@pytest.mark.slow  # end to end, 10-35 s on 2 cores: in the slow set, which CI runs too
def test_warmstart_lowers_the_gold_answer_nll_and_stops_when_told():
    source = arithmetic_source(seed=0, digits=1)
    probe = arithmetic_source(seed=1, digits=1).take(32)
    params = init_params(CFG, jax.random.key(0))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    checks = []

    def until(p, step):
        checks.append((step, _answer_nll(p, probe)))
        return step >= 20

    kwargs = dict(encode=lambda exs: TOK.encode_batch([e.prompt for e in exs]),
                  answer_ids=lambda ex: TOK.encode(ex.gold["answer"]) + [TOK.eos_id],
                  batch_size=16, learning_rate=3e-3, mesh=mesh, length=24)
    before = _answer_nll(params, probe)
    trained = supervised_warmstart(params, CFG, source, steps=100, until=until, check_every=10, **kwargs)
    assert [s for s, _ in checks] == [10, 20]  # checked every 10 steps, stopped at the first True
    assert source.position == 20 * 16  # no batch drawn after the stop
    after = _answer_nll(trained, probe)
    assert after == checks[-1][1] and after < before - 0.5
    assert _answer_nll(params, probe) == before  # the input parameters are not modified
