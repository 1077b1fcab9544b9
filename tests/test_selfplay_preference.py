"""Offline preference loops: pairs from JSONL, the DPO / IPO step against a frozen reference, SPIN."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.algorithms import dpo_loss
from ouroboros_jax.batch import EncodedPairs, pack_pairs, pair_widths
from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.data import DataError
from ouroboros_jax.models import forward_padded, init_params, param_specs
from ouroboros_jax.objectives import preference, sequence_logps
from ouroboros_jax.sampling import SampleOutput
from ouroboros_jax.selfplay.preference import (
    PreferencePair,
    read_preference_pairs,
    run_spin,
    spin_pairs,
    train_preference,
)
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step

CFG = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64,
                  max_seq_len=64)
PAIRS = EncodedPairs(prompts=[[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]],
                     chosen=[[11, 12, 2], [13, 2], [11, 11, 11, 2], [14, 2]],
                     rejected=[[12, 11, 2], [9, 9, 9, 2], [5, 2], [15, 15, 2]])


_SEQ_LOGPS = jax.jit(lambda p, tokens, mask, start, average=False: sequence_logps(
    p, CFG, tokens, mask, start=start, average=average), static_argnums=(3, 4))


def _mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def test_read_preference_pairs_field_mapping_and_errors(tmp_path):
    good = tmp_path / "prefs.jsonl"
    good.write_text(json.dumps({"question": "2+2?", "win": "4", "lose": "5", "extra": 1}) + "\n\n"
                    + json.dumps({"question": "1+1?", "win": "2", "lose": "11"}) + "\n")
    pairs = read_preference_pairs(good, prompt_field="question", chosen_field="win", rejected_field="lose")
    assert pairs == [PreferencePair("2+2?", "4", "5", id="prefs:1"),
                     PreferencePair("1+1?", "2", "11", id="prefs:3")]
    with pytest.raises(DataError, match=r"prefs.jsonl:1: missing field 'chosen'"):
        read_preference_pairs(good, prompt_field="question")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": 3, "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'chosen' must be a string"):
        read_preference_pairs(bad)
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: not valid JSON"):
        read_preference_pairs(bad)
    bad.write_text("\n")
    with pytest.raises(DataError, match="no preference pairs"):
        read_preference_pairs(bad)


def test_pair_batch_layout_and_errors():
    assert pair_widths(PAIRS) == (8, 8)
    b = pack_pairs(PAIRS.take([0, 1]), prompt_width=4, completion_width=4, num_rows=3)
    np.testing.assert_array_equal(b.chosen_tokens[0], [0, 1, 2, 3, 11, 12, 2, 0])
    np.testing.assert_array_equal(b.rejected_tokens[1], [0, 0, 4, 5, 9, 9, 9, 2])
    np.testing.assert_array_equal(b.chosen_mask[1], [0, 0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(b.pair_mask, [True, True, False])
    np.testing.assert_array_equal(b.chosen_mask[2], False)
    with pytest.raises(ValueError, match="pair 1: rejected response has 4 tokens, more than its width 3"):
        pack_pairs(PAIRS.take([0, 1]), prompt_width=4, completion_width=3)
    with pytest.raises(ValueError, match="pair 0 has an empty prompt"):
        pack_pairs(EncodedPairs([[]], [[1]], [[2]]), prompt_width=2, completion_width=2)


def test_sequence_logps_sum_response_tokens_only():
    params = init_params(CFG, jax.random.key(0))
    b = pack_pairs(PAIRS, prompt_width=4, completion_width=4)
    got = _SEQ_LOGPS(params, b.chosen_tokens, b.chosen_mask, 4)
    logits = jax.jit(lambda p: forward_padded(p, CFG, b.chosen_tokens, b.chosen_mask))(params)
    logp_all = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for i, response in enumerate(PAIRS.chosen):
        want = sum(float(logp_all[i, 4 + t - 1, tok]) for t, tok in enumerate(response))
        assert float(got[i]) == pytest.approx(want, rel=1e-5)
    mean = _SEQ_LOGPS(params, b.chosen_tokens, b.chosen_mask, 4, True)
    np.testing.assert_allclose(mean, got / np.array([3, 2, 4, 2]), rtol=1e-6)


def _logps(params, batch, side, start=4):
    return _SEQ_LOGPS(params, getattr(batch, f"{side}_tokens"), getattr(batch, f"{side}_mask"), start)


def _margin(params, ref, batch, start):
    """Mean of (policy - ref log-ratio of chosen) - (that of rejected), computed outside the step."""
    lp = lambda p, side: _logps(p, batch, side, start)
    h = (lp(params, "chosen") - lp(ref, "chosen")) - (lp(params, "rejected") - lp(ref, "rejected"))
    return float(jnp.mean(h))


@pytest.mark.parametrize("variant, beta, first_loss", [("sigmoid", 0.5, math.log(2.0)), ("ipo", 0.5, 1.0)])
def test_preference_step_raises_the_chosen_vs_rejected_margin(variant, beta, first_loss):
    params = init_params(CFG, jax.random.key(1))
    optimizer = make_optimizer(1e-2, b2=0.99)
    step_fn, shardings = make_train_step(preference(CFG, beta=beta, variant=variant), optimizer, _mesh(),
                                         param_specs(CFG))
    state = init_train_state(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(0),
                             with_reference=True, shardings=shardings)
    batch = pack_pairs(PAIRS, prompt_width=4, completion_width=4)
    history = []
    for _ in range(4):
        state, metrics = step_fn(state, batch)
        history.append(jax.device_get(metrics))
    # step 1: policy == reference, h = 0: sigmoid loss log 2; IPO (0 - 1/(2 beta))^2 = 1
    assert history[0]["loss"] == pytest.approx(first_loss, rel=1e-5)
    assert history[0]["log_ratio_margin"] == pytest.approx(0.0, abs=1e-6)
    margins = [float(h["log_ratio_margin"]) for h in history]
    assert min(margins[1:]) > 0 and history[-1]["loss"] < history[0]["loss"], margins
    if variant == "sigmoid":  # DPO pushes the margin up without bound; IPO regresses it onto 1/(2 beta)
        assert all(b > a for a, b in zip(margins, margins[1:], strict=False)), margins
    assert history[-1]["reward_accuracy"] == 1.0
    # the reference stayed frozen, and the step's metrics are dpo_loss of independently computed log-probs
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state.ref_params, params)
    assert _margin(state.params, params, batch, 4) > 0
    lp = lambda p, side: _logps(p, batch, side)
    want, _ = dpo_loss(lp(state.params, "chosen"), lp(state.params, "rejected"), lp(params, "chosen"),
                       lp(params, "rejected"), beta=beta, variant=variant)
    state, metrics = step_fn(state, batch)
    assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-4)


def test_train_preference_dpo_loop_pads_a_short_dataset():
    params = init_params(CFG, jax.random.key(2))
    result = train_preference(params, CFG, PAIRS.take([0, 1, 2]), steps=3, batch_size=4, learning_rate=1e-2,
                              beta=0.5, mesh=_mesh())
    assert len(result.history) == 3
    assert result.history[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert result.history[-1]["log_ratio_margin"] > 0
    with pytest.raises(ValueError, match="label_smoothing applies to the sigmoid variant only"):
        train_preference(params, CFG, PAIRS, steps=1, batch_size=4, learning_rate=1e-2, beta=0.5,
                         variant="ipo", label_smoothing=0.1, mesh=_mesh())


def _sample(rows: list[list[int]], width: int = 4) -> SampleOutput:
    R = len(rows)
    tokens = np.zeros((R, width), np.int32)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)] = ids
    lengths = np.array([len(ids) for ids in rows], np.int32)
    zeros = np.zeros((R, width), np.float32)
    return SampleOutput(tokens, np.arange(width)[None] < lengths[:, None], zeros, zeros, lengths,
                        np.zeros(R, bool), np.zeros((R, 1), np.int32), np.ones((R, 1), bool), width)


def test_spin_pairs_gold_chosen_previous_sample_rejected():
    prompts, gold = [[1, 2], [3]], [[5, 2], [6, 2]]
    # two samples per prompt, prompt-major: (5 2) equals gold 0, (7 2); (6 2) equals gold 1, (8 8 2)
    sample = _sample([[5, 2], [7, 2], [6, 2], [8, 8, 2]])
    pairs, dropped = spin_pairs(prompts, gold, sample)
    assert dropped == 2
    assert pairs == EncodedPairs(prompts=[[1, 2], [3]], chosen=[[5, 2], [6, 2]], rejected=[[7, 2], [8, 8, 2]])
    kept, dropped = spin_pairs(prompts, gold, sample, drop_identical=False)
    assert dropped == 0 and kept.rejected == [[5, 2], [7, 2], [6, 2], [8, 8, 2]]
    with pytest.raises(ValueError, match="not a multiple of 3 prompts"):
        spin_pairs([[1], [2], [3]], gold * 2, sample)


@pytest.mark.slow  # end to end, 10-35 s on 2 cores: in the slow set, which CI runs too
def test_spin_iterations_train_against_the_previous_model():
    params = init_params(CFG, jax.random.key(3))
    prompts = [[1, 2, 3], [4, 5], [6, 7], [8]]
    gold = [[11, 12, 2], [13, 2], [14, 14, 2], [15, 2]]
    its = run_spin(params, CFG, prompts, gold, iterations=2, rng=jax.random.key(0), max_new_tokens=4,
                   steps=4, batch_size=4, learning_rate=1e-2, beta=0.5, stop_token_ids=(2,), mesh=_mesh(),
                   prompt_len_buckets=(4,), widths=(4, 4))
    assert len(its) == 2
    for it in its:
        assert it.pairs.size + it.dropped == 4
        for prompt, chosen, rejected in zip(*it.pairs, strict=True):
            assert chosen == gold[prompts.index(prompt)] and rejected != chosen
        assert it.history[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # starts from its reference
        assert it.history[-1]["log_ratio_margin"] > 0
    # iteration 2's reference is iteration 1's model: its first step sees the policy equal to it
    b = pack_pairs(its[1].pairs, prompt_width=4, completion_width=4)
    assert _margin(its[1].params, its[0].params, b, 4) > 0
    gold_batch = pack_pairs(EncodedPairs(prompts, gold, gold), prompt_width=4, completion_width=4)
    gold_logp = lambda p: float(_logps(p, gold_batch, "chosen").sum())
    assert gold_logp(its[1].params) > gold_logp(its[0].params) > gold_logp(params)
