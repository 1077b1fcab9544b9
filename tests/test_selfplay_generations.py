"""The generations loop: diversity measures, data policies, selection, the collapse guard, anchor
likelihood, and short end-to-end runs on a tiny model (expert iteration and GRPO)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ouroboros_jax.config import ConfigError, MeshConfig, ModelConfig, OptimizerConfig, SamplingConfig
from ouroboros_jax.data import arithmetic_source
from ouroboros_jax.models import Tokenizer, forward_padded, init_params
from ouroboros_jax.selfplay.generations import (
    CollapseWarning,
    GenerationsConfig,
    GenerationTask,
    anchor_loglik,
    run_generations,
    token_stats,
)
from ouroboros_jax.selfplay.reports import (
    CollapseGuard,
    answer_diversity,
    distinct_n,
    format_report,
    grouped_distinct_n,
    read_reports,
)
from ouroboros_jax.selfplay.selection import (
    Row,
    compose_batch,
    rows_to_batch,
    seed_count,
    select_group,
    self_consistency,
    training_pool,
    training_rewards,
)
from ouroboros_jax.sharding import make_mesh

TOK = Tokenizer.char_level("0123456789+-*=? .Whatis")
MODEL = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                    d_ff=64, max_seq_len=32)


# ---------------------------------------------------------------------------
# Diversity measures


def test_distinct_n_by_hand():
    words = ["a b a b".split(), "a b c".split()]
    # unigrams a b a b a b c: 3 distinct of 7; bigrams ab ba ab ab bc: 3 distinct of 5
    assert distinct_n(words, 1) == pytest.approx(3 / 7)
    assert distinct_n(words, 2) == pytest.approx(3 / 5)
    assert distinct_n(["aaa"], 2) == pytest.approx(1 / 2)  # characters of a string: aa, aa
    assert distinct_n(["a", ""], 2) == 0.0  # no bigram at all
    # per prompt then averaged: group 1 = 2 x "ab" -> 1/2; group 2 = "ab", "ba" -> 2/2
    assert grouped_distinct_n(["ab", "ab", "ab", "ba"], 2, 2) == pytest.approx(0.75)
    # a group without any bigram is left out of the mean
    assert grouped_distinct_n(["a", "b", "ab", "ab"], 2, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="groups of 3"):
        grouped_distinct_n(["ab", "ab"], 3, 2)


def test_answer_diversity_by_hand():
    answers = ["1", "1", "2", None, None, None, "3", "3"]
    assert answer_diversity(answers, 4) == pytest.approx((2 + 1) / 2)
    assert answer_diversity(answers, 8) == pytest.approx(3.0)
    assert answer_diversity([None, None], 2) == 0.0


# ---------------------------------------------------------------------------
# Judging, selection and the data policy


def _row(answer, correct, logp, generation=0, reward=0.0, ids=(1,)):
    return Row((5, 6), tuple(ids), answer=answer, correct=correct, logp=logp, generation=generation,
               reward=reward)


def test_diverse_selection_keeps_a_rare_verified_answer():
    group = ([_row("2/3", False, -0.1)] + [_row("1/2", True, -0.5 - 0.01 * i) for i in range(6)]
             + [_row("0.5", True, -3.0)])
    diverse = select_group(group, selection="diverse", keep=2, verified=True)
    assert [r.answer for r in diverse] == ["0.5", "1/2"]  # the rare verified answer first
    assert diverse[1].logp == -0.5  # and the likeliest of the common one
    likely = select_group(group, selection="likely", keep=2, verified=True)
    assert [r.answer for r in likely] == ["1/2", "1/2"]  # the most likely only: the rare one is lost
    # unverified: the most likely sample is the wrong one
    assert [r.answer for r in select_group(group, selection="likely", keep=1, verified=False)] == ["2/3"]
    assert len(select_group(group, selection="all", keep=0, verified=True)) == 7
    assert [r.answer for r in select_group(group, selection="all", keep=2, verified=False)] == ["2/3", "1/2"]
    # round after round: every answer once, then the second of each
    third = select_group(group + [_row("0.50", True, -4.0)], selection="diverse", keep=4)
    assert [r.answer for r in third] == ["0.5", "0.50", "1/2", "1/2"]
    by_reward = select_group([_row("a", True, -1.0, reward=0.2), _row("b", True, -2.0, reward=0.9)],
                             selection="reward", keep=1)
    assert by_reward[0].answer == "b"


def test_self_consistency_and_training_rewards_by_hand():
    answers = [["7", "7", "8", None], [None, "3", "4", "4"], [None, None, None, None]]
    np.testing.assert_array_equal(self_consistency(answers), [[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    assert self_consistency([["1", "2"]]).tolist() == [[1.0, 0.0]]  # ties: the earliest answer
    scores = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    r = training_rewards(scores, answers, verified=True, reward="self_consistency", weight=0.5)
    np.testing.assert_allclose(r[0], [1.5, 0.5, 0.0, 1.0])
    r = training_rewards(scores, answers, verified=False, reward="self_consistency", weight=1.0)
    np.testing.assert_allclose(r, self_consistency(answers))
    np.testing.assert_allclose(training_rewards(scores, answers, verified=True, reward="none", weight=1.0),
                               scores)
    fn = np.arange(12.0).reshape(3, 4)
    np.testing.assert_allclose(training_rewards(scores, answers, verified=False, reward="fn", weight=2.0,
                                                fn_scores=fn), 2 * fn)
    with pytest.raises(ValueError, match="reward 'fn' needs"):
        training_rewards(scores, answers, verified=True, reward="fn", weight=1.0)


def test_data_policies_select_the_expected_rows():
    g0 = [_row("a", True, 0.0, generation=0), _row("b", True, 0.0, generation=0)]
    g1 = [_row("c", True, 0.0, generation=1)]
    assert training_pool([g0, g1], "replace") == g1
    assert training_pool([g0, g1], "accumulate") == g0 + g1
    assert training_pool([], "replace") == []
    with pytest.raises(ValueError, match="unknown data policy"):
        training_pool([g0], "keep")


def test_seed_mix_puts_a_fixed_fraction_of_seed_rows_in_every_batch():
    pool = [_row(str(i), True, 0.0, generation=3, ids=(i,)) for i in range(10)]
    made = []

    def take_seed(n):
        rows = [_row(f"seed{len(made) + i}", True, 0.0, generation=-1) for i in range(n)]
        made.extend(rows)
        return rows

    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = compose_batch(pool, take_seed, 8, 0.25, rng)
        assert len(batch) == 8
        assert sum(r.generation == -1 for r in batch) == 2  # round(0.25 * 8)
        from_pool = [r for r in batch if r.generation == 3]
        assert len({r.answer for r in from_pool}) == 6  # without replacement while the pool is large enough
    assert len(made) == 6  # fresh seed rows for every batch
    assert all(r.generation == 3 for r in compose_batch(pool, take_seed, 8, 0.0, rng))
    assert all(r.generation == -1 for r in compose_batch([], take_seed, 8, 0.25, rng))  # empty pool: all seed
    assert compose_batch([], None, 8, 0.25, rng) == []
    assert len(compose_batch(pool[:2], None, 8, 0.0, rng)) == 8  # small pool: drawn with replacement
    assert seed_count(10, 0.3, pool_size=5, has_seed=True) == 3
    assert seed_count(10, 0.3, pool_size=5, has_seed=False) == 0


def test_rows_to_batch_aligns_completion_and_old_logprobs():
    rows = [Row((1, 2), (3, 4, 5), token_logp=(-0.1, -0.2, -0.3), advantage=2.0), Row((7,), (8,))]
    b = rows_to_batch(rows, width=6)
    np.testing.assert_array_equal(b.tokens, [[1, 2, 3, 4, 5, 0], [7, 8, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b.attention_mask, [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b.loss_mask, [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]])
    np.testing.assert_allclose(b.old_logp[0], [0, 0, -0.1, -0.2, -0.3, 0], rtol=1e-6)
    np.testing.assert_array_equal(b.advantages, [2.0, 1.0])
    assert rows_to_batch(rows).tokens.shape == (2, 16)  # default width: rounded up to 16
    with pytest.raises(ValueError, match="more than the width 4"):
        rows_to_batch(rows, width=4)


# ---------------------------------------------------------------------------
# The collapse guard


def _report(g, distinct, answers, anchor):
    return {"generation": g, "distinct-2": distinct, "answer_diversity": answers, "anchor_logp": anchor}


def test_collapse_guard_on_a_constructed_sequence():
    reports = [_report(0, 0.8, 6.0, -1.0), _report(1, 0.7, 5.0, -1.2), _report(2, 0.39, 5.0, -1.3),
               _report(3, 0.5, 2.9, -1.7)]
    guard = CollapseGuard(min_distinct_ratio=0.5, min_answer_diversity_ratio=0.5, max_anchor_drop=0.5,
                          action="warn")
    states = [guard.check(r, reports[0]) for r in reports]
    assert [s.status for s in states] == ["ok", "ok", "warn", "warn"]
    assert len(states[2].reasons) == 1 and states[2].reasons[0].startswith("distinct-2 0.390 < 0.5")
    assert len(states[3].reasons) == 2  # answer diversity 2.9 < 3.0, and the anchor fell 0.7 > 0.5
    assert "anchor log-likelihood fell 0.700" in states[3].reasons[1]
    stop = dataclasses.replace(guard, action="stop")
    assert [stop.check(r, reports[0]).status for r in reports] == ["ok", "ok", "stop", "stop"]
    off = CollapseGuard(min_distinct_ratio=None, min_answer_diversity_ratio=None, max_anchor_drop=None)
    assert {off.check(r, reports[0]).status for r in reports} == {"ok"}
    line = format_report({**reports[3], "pass@1": 0.25, "guard/status": "warn",
                          "guard/reasons": list(states[3].reasons)}, 5)
    assert line.startswith("generation 3/5  pass@1 0.250") and "guard warn (answer_diversity" in line
    with pytest.raises(ConfigError, match="guard.action"):
        CollapseGuard(action="halt")
    with pytest.raises(ConfigError, match="guard.min_distinct_ratio"):
        CollapseGuard(min_distinct_ratio=1.5)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="generations.data_policy"):
        GenerationsConfig(data_policy="keep_all")
    with pytest.raises(ConfigError, match="generations.seed_fraction"):
        GenerationsConfig(seed_fraction=1.5)
    with pytest.raises(ConfigError, match="generations.reward: an unverified GRPO loop"):
        GenerationsConfig(method="grpo", verified=False)
    with pytest.raises(ConfigError, match="generations.eval_k"):
        GenerationsConfig(sampling=SamplingConfig(eval_num_samples=4), eval_k=8)
    with pytest.raises(ConfigError, match="generations.micro_batch_size"):
        GenerationsConfig(batch_size=8, micro_batch_size=3)


# ---------------------------------------------------------------------------
# Anchor likelihood and entropy against a plain forward pass


_forward = jax.jit(forward_padded, static_argnums=1)


def _by_hand(params, prompts, answers):
    """Mean log-prob of the answer tokens and the entropies, from forward_padded logits."""
    logps, ents = [], []
    for p, a in zip(prompts, answers, strict=True):
        tokens = np.array([p + a])
        logits = np.asarray(_forward(params, MODEL, tokens, np.ones_like(tokens, bool)))[0]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        logp = logits - logz[:, None]
        for j in range(len(a)):
            t = len(p) + j  # position t - 1 predicts token t
            logps.append(logp[t - 1, tokens[0, t]])
            ents.append(-(np.exp(logp[t - 1]) * logp[t - 1]).sum())
    return float(np.mean(logps)), np.array(ents)


def test_anchor_likelihood_and_its_drift_match_a_forward_pass():
    prompts, answers = [[3, 4, 5], [6, 7]], [[8, 9, 2], [10]]
    before = init_params(MODEL, jax.random.key(0))
    after = jax.tree.map(lambda x: x * 1.5, before)  # "a later generation": other parameters
    got_before = anchor_loglik(before, MODEL, prompts, answers)
    got_after = anchor_loglik(after, MODEL, prompts, answers)
    want_before, ents = _by_hand(before, prompts, answers)
    want_after, _ = _by_hand(after, prompts, answers)
    assert got_before == pytest.approx(want_before, abs=1e-5)
    assert got_after - got_before == pytest.approx(want_after - want_before, abs=1e-5)
    assert abs(want_after - want_before) > 1e-2  # the drift is not trivially zero
    batch = rows_to_batch([Row(tuple(p), tuple(a)) for p, a in zip(prompts, answers, strict=True)])
    _, entropy = token_stats(before, MODEL, np.asarray(batch.tokens), np.asarray(batch.attention_mask))
    np.testing.assert_allclose(entropy[np.asarray(batch.loss_mask)], ents, atol=1e-5)


# ---------------------------------------------------------------------------
# End to end on a tiny model


def _any_digit(completion: str, example) -> float:
    """A lenient judge for an untrained model: some of its 3-token completions hold a digit."""
    return float(any(c.isdigit() for c in completion))


def _task(verifier="math_any") -> GenerationTask:
    eos = TOK.eos_id
    heldout = arithmetic_source(seed=0, digits=1, heldout=True).take(4)
    return GenerationTask(
        pool=arithmetic_source(seed=0, digits=1),
        encode=lambda exs: TOK.encode_batch([e.prompt for e in exs]),
        decode=lambda ids: TOK.decode(list(ids)), answer_ids=lambda ex: TOK.encode(ex.gold["answer"]) + [eos],
        verifier=verifier, stop_token_ids=(eos,), eval_examples=heldout, anchor_examples=heldout,
        seed_source=arithmetic_source(seed=1, digits=1))


def _mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


SMALL = GenerationsConfig(
    generations=2, prompts_per_generation=4,
    sampling=SamplingConfig(group_size=4, max_new_tokens=3, eval_num_samples=4, eval_temperature=1.0,
                            prompt_len_buckets=(24,)),
    train_steps=2, batch_size=8, optimizer=OptimizerConfig(learning_rate=1e-3, b2=0.99), eval_k=2,
    batch_prompts=8, selection="diverse", data_policy="accumulate", seed_fraction=0.5, verified=True)

REPORT_KEYS = ("generation", "pass@1", "pass@2", "distinct-1", "distinct-2", "entropy", "answer_diversity",
               "length", "anchor_logp", "anchor_drift", "guard/status", "guard/reasons", "time/eval")
ROUND_KEYS = ("pool/pass@1", "pool/reward", "pool/kept", "pool/kept_correct_frac", "train/steps",
              "train/pool_rows", "train/seed_frac", "train/loss", "train/finite", "time/sample", "time/train")


def _check_reports(run_dir, generations):
    reports = read_reports(run_dir)
    assert [r["generation"] for r in reports] == list(range(generations + 1))
    for r in reports:
        for key in REPORT_KEYS + (ROUND_KEYS if r["generation"] > 0 else ()):
            assert key in r, key
            if not isinstance(r[key], str | list):
                assert r[key] is not None and math.isfinite(r[key]), (key, r[key])
        assert 0 <= r["pass@1"] <= r["pass@2"] <= 1 and 0 <= r["distinct-2"] <= 1
        assert r["guard/status"] in ("ok", "warn")
    assert reports[0]["anchor_drift"] == 0.0
    return reports


@pytest.mark.slow  # end to end, 10-35 s on 2 cores: in the slow set, which CI runs too
def test_two_generations_of_expert_iteration_write_reports(tmp_path, capsys):
    params = init_params(MODEL, jax.random.key(0))
    # A judge that passes some of a random model's samples, so the pool is not empty by chance.
    result = run_generations(SMALL, model_config=MODEL, params=params, task=_task(_any_digit),
                             run_dir=tmp_path, mesh=_mesh())
    reports = _check_reports(tmp_path, 2)
    assert reports == json.loads(json.dumps(result.reports))
    assert not result.stopped
    assert reports[1]["train/steps"] == 2 and reports[1]["train/seed_frac"] == 0.5
    assert reports[1]["pool/kept_correct_frac"] in (0.0, 1.0)  # verified: only correct rows are kept
    assert (tmp_path / "generations_config.json").is_file()
    assert capsys.readouterr().out.count("generation ") == 3
    # the loop trained a copy: M_0 is untouched, M_2 differs from it
    assert not np.allclose(np.asarray(params["embed_VD"]), np.asarray(result.params["embed_VD"]))
    np.testing.assert_array_equal(np.asarray(params["embed_VD"]),
                                  np.asarray(init_params(MODEL, jax.random.key(0))["embed_VD"]))


@pytest.mark.slow
def test_grpo_generations_and_a_guard_that_stops(tmp_path):
    cfg = dataclasses.replace(SMALL, method="grpo", verified=False, reward="self_consistency",
                              selection="all", seed_fraction=0.25,
                              optimizer=OptimizerConfig(learning_rate=1e-3, b2=0.99))
    result = run_generations(cfg, model_config=MODEL, params=init_params(MODEL, jax.random.key(0)),
                             task=_task(), run_dir=tmp_path / "grpo", mesh=_mesh(), console=False)
    reports = _check_reports(tmp_path / "grpo", 2)
    assert reports[1]["train/seed_frac"] == 0.25
    assert not result.stopped
    # a learning rate that wrecks the model: the anchor likelihood falls and the guard stops the loop
    wreck = dataclasses.replace(SMALL, optimizer=OptimizerConfig(learning_rate=0.3, b2=0.99), train_steps=5,
                                generations=3,
                                guard=CollapseGuard(max_anchor_drop=0.5, action="stop"))
    stopped = run_generations(wreck, model_config=MODEL, params=init_params(MODEL, jax.random.key(0)),
                              task=_task(), run_dir=tmp_path / "stop", mesh=_mesh(), console=False)
    assert stopped.stopped and len(stopped.reports) < 4
    assert stopped.reports[-1]["guard/status"] == "stop"
    assert "anchor log-likelihood fell" in stopped.reports[-1]["guard/reasons"][-1]
    with pytest.warns(CollapseWarning, match="collapse guard, generation 1"):
        run_generations(dataclasses.replace(wreck, generations=1, guard=CollapseGuard(max_anchor_drop=0.5)),
                        model_config=MODEL, params=init_params(MODEL, jax.random.key(0)), task=_task(),
                        run_dir=tmp_path / "warn", mesh=_mesh(), console=False)


# ---------------------------------------------------------------------------
# The collapse experiment's task: many right answers per prompt


def _experiment():
    spec = importlib.util.spec_from_file_location(
        "selfplay_collapse", Path(__file__).resolve().parent.parent / "experiments" / "selfplay_collapse.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["selfplay_collapse"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_split_task_verifier_and_gold_answers():
    exp = _experiment()
    ex = exp.split_example(47, seed=0)  # target TARGETS[47] = 57
    assert ex.prompt == "57=" and ex.gold["target"] == 57
    a, b = map(int, ex.gold["answer"].split("+"))
    assert a + b == 57 and a >= 1 and b >= 1
    assert exp.verify_split(ex.gold["answer"], ex.gold).correct
    ok = exp.verify_split(" 23+34", ex.gold)
    assert ok.correct and ok.extracted == "23+34"
    wrong = exp.verify_split("23+33", ex.gold)
    assert not wrong.correct and wrong.extracted == "23+33" and "= 56, not 57" in wrong.reason
    for bad in ("57", "057+0", "0+57", "23+034", "23-34"):
        assert exp.verify_split(bad, ex.gold).extracted is None, bad
    # every target, each with its own random gold split: many distinct right answers
    golds = {exp.split_example(i, seed=0).gold["answer"] for i in range(47, 90 * 20, 90)}
    assert len(golds) > 10
    assert exp.decode(exp.answer_ids(ex)[:-1]) == ex.gold["answer"]
