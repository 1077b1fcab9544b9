"""Constitutional AI: the shipped constitution, critique / revision rounds, SFT on revisions, RLAIF pairs."""

from __future__ import annotations

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.data import DataError
from ouroboros_jax.models import Tokenizer, init_params
from ouroboros_jax.rewards.judge import Judge
from ouroboros_jax.sampling import generate
from ouroboros_jax.selfplay.constitutional import (
    CritiqueTemplates,
    Principle,
    ai_preference_pairs,
    critique_and_revise,
    draw_principles,
    load_constitution,
    sft_on_revisions,
)
from ouroboros_jax.sharding import make_mesh

TOK = Tokenizer.char_level("0123456789+=?|CRAB")
CFG = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                  d_ff=64, max_seq_len=64)


def test_shipped_constitution_loads_and_bad_files_name_the_problem(tmp_path):
    principles = load_constitution()
    assert len(principles) >= 6 and len({p.name for p in principles}) == len(principles)
    assert all(p.critique_request and p.revision_request and p.preference for p in principles)
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"principles": [{"name": "x", "critique_request": "c", "revision_request": "r",
                                               "preference": "p"}, {"name": "y", "critique_request": ""}]}))
    with pytest.raises(DataError, match=r"c.json: principle 1: field 'critique_request' missing"):
        load_constitution(bad)
    bad.write_text("{}")
    with pytest.raises(DataError, match="non-empty list 'principles'"):
        load_constitution(bad)
    with pytest.raises(DataError, match="no such file"):
        load_constitution(tmp_path / "absent.json")
    drawn = draw_principles(principles[:2], 200, random.Random(0))
    assert {p.name for p in drawn} == {principles[0].name, principles[1].name}


class Scripted:
    """A stand-in generator that records what it was asked: answers 'x', critiques 'k', revises to 'r<i>'."""

    def __init__(self):
        self.calls = []

    def __call__(self, texts, rng, num_samples=1):
        self.calls.append(list(texts))
        stage = len(self.calls)
        return [f"s{stage}" for _ in texts]


def test_critique_and_revise_rounds_and_prompts():
    cons = [Principle("one", "C1", "R1", "P1"), Principle("two", "C2", "R2", "P2")]
    gen = Scripted()
    t = CritiqueTemplates(critique="{prompt}|{response}|{critique_request}",
                          revision="{prompt}|{response}|{critique_request}|{critique}|{revision_request}")
    out = critique_and_revise(gen, ["p0", "p1"], cons, rounds=2, templates=t, rng=jax.random.key(0), seed=3)
    assert len(gen.calls) == 5  # first tries, then (critique, revision) per round, each one call for all
    draw = random.Random(3)
    first_round = [p.name for p in draw_principles(cons, 2, draw)]
    second_round = [p.name for p in draw_principles(cons, 2, draw)]
    assert out.principles == [first_round, second_round]
    req = {p.name: p for p in cons}
    assert gen.calls[1] == [f"p{i}|s1|{req[n].critique_request}" for i, n in enumerate(first_round)]
    assert gen.calls[2] == [f"p{i}|s1|{req[n].critique_request}|s2|{req[n].revision_request}"
                            for i, n in enumerate(first_round)]
    # round two revises round one's revision
    assert gen.calls[3] == [f"p{i}|s3|{req[n].critique_request}" for i, n in enumerate(second_round)]
    assert out.initial == ["s1", "s1"] and out.critiques == [["s2"] * 2, ["s4"] * 2]
    assert out.final == ["s5", "s5"]


def _mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


@pytest.mark.slow  # 11-15 s: the slow set (CI runs it) keeps the default suite under 10 minutes
def test_sft_on_revisions_teaches_the_revisions():
    params = init_params(CFG, jax.random.key(0))
    prompts, revisions = ["1+2=", "3+4="], ["3", "7"]
    new, n = sft_on_revisions(params, CFG, prompts + ["5+5="], revisions + [""], encode=TOK.encode,
                              eos_id=TOK.eos_id, steps=20, batch_size=2, learning_rate=1e-2, mesh=_mesh(),
                              length=16)
    assert n == 2  # the empty revision is dropped
    out = generate(new, CFG, [TOK.encode(p) for p in prompts], max_new_tokens=2, temperature=0.0,
                   stop_token_ids=(TOK.eos_id,), rng=jax.random.key(0), prompt_len_buckets=(8,))
    rows = zip(out.tokens, out.lengths, strict=True)
    assert [TOK.decode([int(t) for t in r[:n] if t != TOK.eos_id]) for r, n in rows] == revisions


def test_ai_preference_pairs_drop_ties_and_fill_the_principle():
    params = init_params(CFG, jax.random.key(0))
    judge = Judge(params, CFG, encode=TOK.encode, decode=TOK.decode, template="{prompt}{response}?",
                  pairwise_template="{prompt}A{response_a}B{response_b}|{principle}",
                  choice_pattern=r"([AB])", max_new_tokens=3, prompt_len_buckets=(16,))
    seen = []
    real = judge.compare

    def compare(prompts, a, b, rng, *, fields=None):
        seen.append(fields)
        return real(prompts, a, b, rng, fields=fields)

    judge.compare = compare
    cons = [Principle("n", "c", "r", "C")]
    pairs, metrics = ai_preference_pairs(judge, ["1+1=", "2+2="], ["2", "4"], ["3", "5"], cons,
                                         rng=jax.random.key(0), encode=TOK.encode,
                                         encode_response=lambda s: TOK.encode(s) + [TOK.eos_id])
    assert seen == [[{"principle": "C"}, {"principle": "C"}]]
    assert pairs.size == metrics["pairs"] == 2 - metrics["judge/ties"]
    for c, r in zip(pairs.chosen, pairs.rejected, strict=True):
        assert {TOK.decode(c), TOK.decode(r)} in ({"2", "3"}, {"4", "5"})


def _pairwise_judge(choice_pattern: str) -> Judge:
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(1))
    return Judge(params, CFG, encode=TOK.encode, decode=TOK.decode,
                 template="{prompt}{response}?",
                 pairwise_template="{prompt}A{response_a}B{response_b}|{principle}",
                 choice_pattern=choice_pattern, max_new_tokens=3, prompt_len_buckets=(16,))


def test_choice_preferences_average_both_orders_of_the_answer_logprobs():
    from ouroboros_jax.models.transformer import forward
    from ouroboros_jax.selfplay.constitutional import choice_preferences

    judge = _pairwise_judge(r"([AB])")
    prompts, a, b = ["1+1=", "2+2=", "3+3="], ["2", "4", "6"], ["3", "5", "9"]
    got = choice_preferences(judge, prompts, a, b, fields=[{"principle": "C"}] * 3, choices=("A", "BA"),
                             encode_choice=TOK.encode)

    texts = [t for p, x, y in zip(prompts, a, b, strict=True) for t in (f"{p}A{x}B{y}|C", f"{p}A{y}B{x}|C")]
    rows = [TOK.encode(t) + TOK.encode(ans) for ans in ("A", "BA") for t in texts]
    width = max(map(len, rows))  # right padding: causal attention keeps it out of the earlier positions
    padded = jnp.asarray([r + [0] * (width - len(r)) for r in rows])
    logits = np.asarray(jax.jit(forward, static_argnums=1)(judge.params, CFG, padded), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = [sum(logits[k, t - 1, r[t]] - logz[k, t - 1] for t in range(len(TOK.encode(texts[k % 6])), len(r)))
            for k, r in enumerate(rows)]  # teacher-forced log-prob of each answer, by hand
    for i in range(3):
        says_a = [1 / (1 + np.exp(logp[6 + j] - logp[j])) for j in (2 * i, 2 * i + 1)]
        assert got[i] == pytest.approx(0.5 * (says_a[0] + 1 - says_a[1]), abs=1e-4)


def test_ai_preferences_label_unparsed_pairs_by_logprob_or_drop_them():
    from ouroboros_jax.selfplay.constitutional import ai_preferences, choice_preferences

    judge = _pairwise_judge(r"(Z)")  # no verdict ever parses: every pair a tie
    cons = [Principle("n", "c", "r", "C")]
    prompts, a, b = ["1+1=", "2+2=", "3+3=", "4+4="], ["2", "4", "6", "8"], ["3", "5", "9", "1"]
    kw = dict(rng=jax.random.key(0), choices=("A", "B"), encode_choice=TOK.encode)
    dropped, m = ai_preferences(judge, prompts, a, b, cons, **kw)
    assert dropped == [] and m["judge/parse_failures"] == 8 and m["pairs/dropped"] == 4
    pairs, m = ai_preferences(judge, prompts, a, b, cons, undecided="logprob", **kw)
    prob_a = choice_preferences(judge, prompts, a, b, fields=[{"principle": "C"}] * 4, choices=("A", "B"),
                                encode_choice=TOK.encode)
    want = [(p, x, y) if q > 0.5 else (p, y, x) for p, x, y, q in zip(prompts, a, b, prob_a, strict=True)]
    assert [(q.prompt, q.chosen, q.rejected) for q in pairs] == want
    assert all(q.id == "n" for q in pairs)
    assert m["pairs"] == m["pairs/by_logprob"] == 4 and m["pairs/by_verdict"] == 0
    assert m["judge/parse_failures"] == 8  # still counted and reported
    with pytest.raises(ValueError, match="needs encode_choice"):
        ai_preferences(judge, prompts, a, b, cons, rng=jax.random.key(0), undecided="logprob")
