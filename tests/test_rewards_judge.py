"""The LM judge: verdict parsing, the two-order pairwise logic, batched judging equal to one by one."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.data import Example
from ouroboros_jax.models import Tokenizer, init_params
from ouroboros_jax.rewards import Completions
from ouroboros_jax.rewards.judge import (
    DEFAULT_PAIRWISE_TEMPLATE,
    DEFAULT_POINTWISE_TEMPLATE,
    Judge,
    JudgeConfig,
    JudgeError,
    JudgeReward,
    combine_orders,
    load_template,
    parse_choice,
    parse_score,
)
from ouroboros_jax.sampling import SampleOutput

TOK = Tokenizer.char_level("0123456789+=?AB")
CFG = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                  d_ff=64, max_seq_len=64)


def test_parse_score_cases():
    assert parse_score("Clear and complete.\nScore: 4").value == 4.0
    assert parse_score("Score: 2 at first... on reflection Score: 3.5").value == 3.5  # the last one counts
    assert parse_score("score: 4").value is None  # case matters in the default pattern
    out = parse_score("I would give it four points")
    assert out.value is None and "no score found" in out.reason
    out = parse_score("Score: 7")
    assert out.value is None and "outside [0, 5]" in out.reason
    assert parse_score("Score: -1").value is None
    assert parse_score("Score: 1", low=1, high=1).value == 1.0
    assert parse_score("x=1", pattern=r"=(\d)").value == 1.0


def test_parse_choice_cases():
    assert parse_choice("B is wrong.\nBetter: A").value == "A"
    assert parse_choice("Better: (B)").value == "B"
    assert parse_choice("Better: A ... Better: B").value == "B"
    out = parse_choice("Both are fine")
    assert out.value is None and "no choice found" in out.reason
    assert parse_choice("C", pattern=r"([A-C])").reason == "choice 'C' is neither A nor B"


def test_combine_orders_swap_logic():
    # a shown first wins ("A"), and with b shown first a is "B": consistent, a wins
    assert combine_orders(["A"], ["B"]) == ("a", True)
    assert combine_orders(["B"], ["A"]) == ("b", True)
    # always picking the first position: the orders disagree -> tie
    assert combine_orders(["A"], ["A"]) == ("tie", False)
    assert combine_orders(["B"], ["B"]) == ("tie", False)
    # an unparsed order decides nothing
    assert combine_orders([None], ["B"]) == ("tie", False)
    # several samples: the majority of each order's parsed choices
    assert combine_orders(["A", "A", "B"], ["B", None, "B"]) == ("a", True)
    assert combine_orders(["A", "B"], ["B", "B"]) == ("tie", False)  # an even split prefers neither


def test_templates_from_text_and_file(tmp_path):
    assert load_template(DEFAULT_POINTWISE_TEMPLATE, ("{prompt}", "{response}")) == DEFAULT_POINTWISE_TEMPLATE
    assert "{response_b}" in load_template(DEFAULT_PAIRWISE_TEMPLATE, ("{response_a}", "{response_b}"))
    f = tmp_path / "judge.txt"
    f.write_text("{prompt} -> {response}?")
    assert load_template(str(f), ("{prompt}", "{response}")) == "{prompt} -> {response}?"
    with pytest.raises(JudgeError, match=r"judge.txt: missing placeholder\(s\) \['\{response_a\}'"):
        load_template(f, ("{response_a}",))
    with pytest.raises(JudgeError, match="no such file"):
        load_template(str(tmp_path / "absent.txt"), ("{prompt}",))


def _judge(**kw):
    params = init_params(CFG, jax.random.key(3))
    base = dict(encode=TOK.encode, decode=TOK.decode, template="{prompt}{response}?",
                pairwise_template="{prompt}A{response_a}B{response_b}?", score_pattern=r"([0-9])", low=0,
                high=9, choice_pattern=r"([AB])", max_new_tokens=6, prompt_len_buckets=(16,))
    return Judge(params, CFG, **(base | kw))


def test_batched_judging_equals_one_by_one():
    judge = _judge()
    prompts = ["12+3=", "4+4="]
    responses = ["15", "8"]
    rng = jax.random.key(0)
    batched = judge.score(prompts, responses, rng)
    assert len(batched.texts) == 2
    for i in range(2):
        alone = judge.score(prompts[i:i + 1], responses[i:i + 1], rng)
        assert alone.texts == batched.texts[i:i + 1]
        np.testing.assert_array_equal(alone.scores, batched.scores[i:i + 1])
    # the scores are what the parser reads from the texts
    for t, s, ok in zip(batched.texts, batched.scores, batched.valid, strict=True):
        p = parse_score(t, pattern=r"([0-9])", low=0, high=9)
        assert ok == (p.value is not None) and (not ok or s == p.value)
    pairs = judge.compare(prompts, responses, responses[::-1], rng)
    assert len(pairs.texts) == 4 and len(pairs.outcomes) == 2  # both orders, one call
    alone = judge.compare(prompts[:1], responses[:1], responses[1:], rng)
    assert alone.texts == [pairs.texts[0], pairs.texts[2]] and alone.outcomes == pairs.outcomes[:1]


def test_sampled_judgements_are_averaged_and_failures_counted():
    judge = _judge(temperature=1.0, num_samples=4)
    out = judge.score(["1+1="] * 3, ["2", "3", "11"], jax.random.key(1))
    assert len(out.texts) == 12
    for i in range(3):
        vals = [parse_score(t, pattern=r"([0-9])", low=0, high=9).value for t in out.texts[4 * i:4 * i + 4]]
        good = [v for v in vals if v is not None]
        assert len(out.reasons[i]) == 4 - len(good)
        if good:
            assert out.scores[i] == pytest.approx(np.mean(good))
    assert out.metrics["judge/parse_failures"] == sum(len(r) for r in out.reasons)
    with pytest.raises(JudgeError, match="needs temperature > 0"):
        _judge(num_samples=2)


def _completions(texts):
    R = len(texts)
    z = np.zeros((R, 1), np.int32)
    sample = SampleOutput(z, z.astype(bool), z * 0.0, z * 0.0, np.ones(R, np.int32), np.zeros(R, bool), z,
                          z.astype(bool), 1)
    return Completions(sample, texts, [Example(id="e0", prompt="1+1=", gold={})])


def test_judge_reward_never_silently_zero():
    never = _judge(score_pattern=r"(Z)")  # no verdict can parse
    with pytest.raises(JudgeError, match=r"row 0 has no parsable judgement: \[.no score found"):
        JudgeReward(never)(_completions(["2", "3"]))
    out = JudgeReward(never, on_failure="lowest")(_completions(["2", "3"]))
    np.testing.assert_array_equal(out.rewards, [0.0, 0.0])
    assert out.metrics["judge/invalid_rows"] == 2.0 and out.metrics["judge/parse_failure_rate"] == 1.0


def test_judge_from_config_reads_a_template_file(tmp_path):
    f = tmp_path / "rubric.txt"
    f.write_text("Q {prompt} R {response} Score:")
    judge = Judge.from_config(JudgeConfig(template=str(f), low=1, high=3), {}, CFG, encode=TOK.encode,
                              decode=TOK.decode)
    assert judge.template == "Q {prompt} R {response} Score:" and (judge.low, judge.high) == (1, 3)
    assert judge.pairwise_template == DEFAULT_PAIRWISE_TEMPLATE
    with pytest.raises(JudgeError, match="judge.on_failure"):
        JudgeConfig(on_failure="zero")
    with pytest.raises(JudgeError, match=r"rubric2.txt: no such file"):
        Judge.from_config(JudgeConfig(template=str(tmp_path / "rubric2.txt")), {}, CFG, encode=TOK.encode,
                          decode=TOK.decode)
