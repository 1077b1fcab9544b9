"""Self-Rewarding: the paper's pairs (best vs worst, ties dropped), judge agreement, DPO through the step."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.models import Tokenizer, init_params
from ouroboros_jax.rewards.judge import JudgeScores
from ouroboros_jax.selfplay.self_rewarding import (
    JudgeLabels,
    SelfRewardingSettings,
    judge_agreement,
    run_self_rewarding,
    self_rewarding_iteration,
    self_rewarding_pairs,
)
from ouroboros_jax.sharding import make_mesh

TOK = Tokenizer.char_level("0123456789+=?")
CFG = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                  d_ff=64, max_seq_len=64)
NAN = np.nan


def _mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def test_pairs_are_best_vs_worst_with_ties_dropped():
    scores = np.array([[1.0, 3.0, 3.0, 0.0],   # best: first of the two 3s; worst: the 0
                       [2.0, 2.0, 2.0, 2.0],   # all equal: a tie, dropped
                       [NAN, 1.0, 4.0, NAN],   # unparsed candidates take no part
                       [NAN, NAN, 5.0, NAN],   # one scored candidate: no pair
                       [4.5, 4.0, 4.25, 4.5]])
    pairs, counts = self_rewarding_pairs(scores)
    assert pairs == [(0, 1, 3), (2, 2, 1), (4, 0, 1)]
    assert counts == {"ties": 1, "unscored": 1}
    pairs, counts = self_rewarding_pairs(scores, min_gap=1.0)  # gaps of at most 1 count as ties
    assert pairs == [(0, 1, 3), (2, 2, 1)] and counts["ties"] == 2
    with pytest.raises(ValueError, match="prompts, candidates"):
        self_rewarding_pairs(np.zeros(4))


def test_judge_agreement():
    assert judge_agreement(np.array([0.9, 0.2, 0.5, NAN]), [True, False, False, True], 0.5) == 0.5
    assert judge_agreement(np.array([1.0, 0.0]), [True, False], 0.5) == 1.0


def _length_scorer(calls):
    def score(params, prompts, responses, rng):  # longer is better; "" unparsable
        calls.append(len(responses))
        s = np.array([len(r) if r else NAN for r in responses], np.float64)
        return JudgeScores(s, ~np.isnan(s), list(responses), [[] if r else ["empty"] for r in responses])
    return score


@pytest.mark.slow  # 13 s: the slow set (CI runs it) keeps the default suite under 10 minutes
def test_iteration_trains_dpo_on_judged_pairs_against_the_start():
    params = init_params(CFG, jax.random.key(0))
    calls = []
    settings = SelfRewardingSettings(num_candidates=4, max_new_tokens=5, steps=3, batch_size=2,
                                     learning_rate=1e-2, beta=0.1)
    prompts = ["12+3=", "4+4=", "9+1="]
    it = self_rewarding_iteration(params, CFG, prompts, scorer=_length_scorer(calls), encode=TOK.encode,
                                  decode=TOK.decode, stop_token_ids=(TOK.eos_id,), settings=settings,
                                  rng=jax.random.key(1), prompt_len_buckets=(8,), mesh=_mesh())
    assert calls == [12]  # all candidates of all prompts judged in one call
    assert it.pairs.size == it.metrics["pairs"] and it.pairs.size >= 1
    for p, c, r in zip(it.pairs.prompts, it.pairs.chosen, it.pairs.rejected, strict=True):
        assert TOK.decode(p) in prompts and len(TOK.decode(c)) > len(TOK.decode(r))  # longest chosen
    assert len(it.history) == 3
    # DPO starts at the reference: loss log(2), zero margin
    assert it.history[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert it.history[-1]["reward_margin"] > 0
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), it.params, params)
    assert max(jax.tree.leaves(moved)) > 0


def test_run_reports_every_iteration_and_ties_leave_params():
    params = init_params(CFG, jax.random.key(0))
    def flat(p, prompts, responses, rng):
        n = len(responses)
        return JudgeScores(np.ones(n), np.ones(n, bool), list(responses), [[] for _ in responses])
    labels = JudgeLabels(["1+1="] * 2, ["2", "3"], [True, False])
    seen = []
    final, reports = run_self_rewarding(
        params, CFG, ["1+2=", "2+2="], iterations=2, scorer=flat, heldout_accuracy=lambda p: 0.25,
        labels=labels, rng=jax.random.key(0), report=lambda t, m: seen.append(t), encode=TOK.encode,
        decode=TOK.decode, stop_token_ids=(TOK.eos_id,), prompt_len_buckets=(8,), mesh=_mesh(),
        settings=SelfRewardingSettings(num_candidates=2, max_new_tokens=3, steps=1, batch_size=2))
    assert seen == [0, 1, 2] and [r["accuracy"] for r in reports] == [0.25] * 3
    assert [r["judge_agreement"] for r in reports] == [0.5] * 3  # says "good" to both
    assert reports[1]["pairs"] == 0 and reports[1]["ties"] == 2  # every prompt a tie: nothing to train
    assert final is params


@pytest.mark.slow  # 10-12 s: the slow set (CI runs it) keeps the default suite under 10 minutes
def test_judge_training_pairs_are_mixed_in():
    from ouroboros_jax.batch import EncodedPairs

    params = init_params(CFG, jax.random.key(0))

    def flat(p, prompts, responses, rng):  # every candidate ties: only the judge pairs remain
        n = len(responses)
        return JudgeScores(np.ones(n), np.ones(n, bool), list(responses), [[] for _ in responses])

    eos = [TOK.eos_id]
    eft = EncodedPairs([TOK.encode("1+1=2?")], [TOK.encode("1") + eos], [TOK.encode("0") + eos])
    it = self_rewarding_iteration(params, CFG, ["1+2="], scorer=flat, encode=TOK.encode, decode=TOK.decode,
                                  stop_token_ids=(TOK.eos_id,), rng=jax.random.key(1), judge_pairs=eft,
                                  settings=SelfRewardingSettings(num_candidates=2, max_new_tokens=3, steps=1,
                                                                 batch_size=1),
                                  prompt_len_buckets=(8,), mesh=_mesh())
    assert it.metrics["pairs"] == 0 and it.metrics["judge_pairs"] == 1
    assert it.pairs.prompts == eft.prompts and it.pairs.chosen == eft.chosen and len(it.history) == 1
