"""Best-of-N evaluation: the highest-rewarded sample is kept and graded beside pass@1 and maj@N."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.data import Example
from ouroboros_jax.evaluation import best_of_n_choice, evaluate_best_of_n
from ouroboros_jax.models import Tokenizer, init_params
from ouroboros_jax.rewards import FnReward
from verifiers import Verdict

TOK = Tokenizer.char_level("0123456789")
CFG = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                  d_ff=64, max_seq_len=32)


def test_best_of_n_choice():
    r = np.array([[0.1, 0.9, 0.9], [np.nan, -1.0, -2.0], [np.nan, np.nan, np.nan]])
    np.testing.assert_array_equal(best_of_n_choice(r), [1, 1, 0])
    with pytest.raises(ValueError, match="prompts, samples"):
        best_of_n_choice(np.zeros(3))


def test_evaluate_best_of_n_keeps_the_rewarded_sample():
    params = init_params(CFG, jax.random.key(0))
    examples = [Example(id=str(i), prompt=str(i), gold={"digit": str(i)}) for i in range(4)]

    def score(texts, golds):  # right when the completion starts with the gold digit
        return [Verdict(float(t[:1] == g["digit"]), t[:1] == g["digit"], extracted=t[:1] or None)
                for t, g in zip(texts, golds, strict=True)]

    def oracle(c):  # a reward source that knows the verifier: best-of-N reaches pass@N
        golds = [ex.gold for ex in c.row_examples()]
        return np.array([float(v.correct) for v in score(list(c.texts), golds)])

    common = dict(decode=TOK.decode, score=score, n=8, max_new_tokens=2, stop_token_ids=(),
                  rng=jax.random.key(1), prompt_len_buckets=(4,))
    ids = [TOK.encode(ex.prompt) for ex in examples]
    good = evaluate_best_of_n(params, CFG, examples, ids, reward=FnReward(oracle), **common)
    assert good["eval/best_of_8"] == good["eval/pass@8"] and good["eval/best_of_8_oracle_gap"] == 0.0
    assert good["eval/pass@8"] > good["eval/pass@1"]  # a random model sometimes starts right
    bad = evaluate_best_of_n(params, CFG, examples, ids, reward=FnReward(lambda c: -oracle(c)), **common)
    assert bad["eval/pass@1"] == good["eval/pass@1"]  # same samples
    assert bad["eval/best_of_8"] < good["eval/best_of_8"]
    assert "eval/maj@8" in good
