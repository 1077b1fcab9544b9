"""People's ratings as reward sources: direct scores, and a reward model retrained when ratings arrive.

A simulated rater (a thread posting through the same HTTP API as the page)
answers the items the sources put on the queue.
"""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest

from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.models import Tokenizer, init_params
from ouroboros_jax.rate import RatingClient, RatingServer, RatingStore, run_rater
from ouroboros_jax.rewards import Completions, HumanPreferenceReward, HumanScoreReward, responses_as_sample
from ouroboros_jax.selfplay.reward_model import init_reward_model
from ouroboros_jax.sharding import make_mesh

TOK = Tokenizer.char_level("abcdefgh0123456789")
CFG = ModelConfig(vocab_size=24, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                  d_ff=64, max_seq_len=64)
EXAMPLES = [{"prompt": "12", "answer": "ab"}, {"prompt": "345", "answer": "hh"}]
TEXTS = ["ab", "bcd", "a", "hh"]  # rows 0, 1 answer "12"; rows 2, 3 answer "345"


def completions() -> Completions:
    prompts = [TOK.encode(ex["prompt"]) for ex in EXAMPLES for _ in range(2)]
    sample = responses_as_sample(prompts, [TOK.encode(t) + [TOK.eos_id] for t in TEXTS])
    return Completions(sample, TEXTS, EXAMPLES)


def rater(server, decide, stop):
    """Rate whatever is queued until `stop` is set (the simulated person)."""
    client = RatingClient(server.url, server.token)

    def loop():
        while not stop.is_set():
            if run_rater(client, "sim", decide) == 0:
                stop.wait(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_direct_scores_wait_for_the_rater_and_map_onto_0_1(tmp_path):
    store = RatingStore(tmp_path / "ratings.sqlite")
    progress = []
    # the rater gives 5 to the gold answer, 1 to anything else (scale 1..5 -> 1.0 / 0.0)
    decide = lambda item: {"scores": [5 if item.completions[0] == item.metadata["answer"] else 1]}
    stop = threading.Event()
    with RatingServer(store, port=0, quiet=True) as server:
        thread = rater(server, decide, stop)
        source = HumanScoreReward(store, prompt_text=lambda ex: ex["prompt"], timeout_s=30,
                                  metadata_of=lambda ex: {"answer": ex["answer"]},
                                  on_progress=progress.append, poll_s=0.05)
        out = source(completions())
        stop.set()
        thread.join(5)
    np.testing.assert_allclose(out.rewards, [1.0, 0.0, 0.0, 1.0])
    assert out.metrics["human/rated_fraction"] == 1.0
    assert progress[0].min_count == 4 and progress[-1].done and progress[-1].reached


def test_direct_scores_time_out_with_the_missing_reward(tmp_path, capsys):
    store = RatingStore(tmp_path / "ratings.sqlite")
    source = HumanScoreReward(store, prompt_text=lambda ex: ex["prompt"], min_count=2, timeout_s=0.2,
                              missing_reward=-1.0, poll_s=0.05)
    out = source(completions())
    np.testing.assert_allclose(out.rewards, [-1.0] * 4)
    assert out.metrics["human/rated_fraction"] == 0.0
    assert "waiting for 2 more" in capsys.readouterr().err
    with pytest.raises(ValueError, match="min_count"):
        HumanScoreReward(store, prompt_text=str, min_count=-1)


@pytest.mark.slow  # compiles a reward-model update and scorer: ~15 s on 2 cores
def test_preferences_retrain_and_reload_the_reward_model(tmp_path):
    store = RatingStore(tmp_path / "ratings.sqlite")
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    params = init_reward_model(init_params(CFG, jax.random.key(0)), jax.random.key(1))
    # the rater prefers the gold answer
    decide = lambda item: {"choice": item.completions.index(item.metadata["answer"])}
    stop = threading.Event()
    source = HumanPreferenceReward(
        store, params, CFG, encode_prompt=TOK.encode, encode_response=lambda t: TOK.encode(t) + [TOK.eos_id],
        prompt_text=lambda ex: ex["prompt"], pairs_per_step=2, min_count=2, timeout_s=30, train_steps=30,
        batch_size=2, learning_rate=3e-3, mesh=mesh, metadata_of=lambda ex: {"answer": ex["answer"]},
        on_progress=None, poll_s=0.05)
    before = source.scores(completions())
    with RatingServer(store, port=0, quiet=True) as server:
        thread = rater(server, decide, stop)
        out = source(completions())
        stop.set()
        thread.join(5)
    assert source.retrainings == 1 and out.metrics["human/new_pairs"] == 2.0
    # after retraining, the preferred answers score above the others, in each group
    assert out.rewards[0] > out.rewards[1] and out.rewards[3] > out.rewards[2]
    assert not np.allclose(before, out.rewards)
    # no new ratings: the next call keeps the reward model as it is
    source.pairs_per_step, source.min_count = 0, 0
    out2 = source(completions())
    assert source.retrainings == 1 and out2.metrics["human/new_pairs"] == 0.0
    np.testing.assert_allclose(out2.rewards, out.rewards, rtol=1e-6)


def test_uncertain_pairs_put_the_closest_scores_first(tmp_path):
    store = RatingStore(tmp_path / "ratings.sqlite")
    params = init_reward_model(init_params(CFG, jax.random.key(0)), jax.random.key(1))
    source = HumanPreferenceReward(store, params, CFG, TOK.encode, TOK.encode, lambda ex: ex["prompt"],
                                   pairs_per_step=1)
    items = source.uncertain_pairs(completions(), np.array([0.0, 2.0, 1.0, 1.1]))
    assert len(items) == 1 and items[0].prompt == "345" and set(items[0].completions) == {"a", "hh"}
    assert items[0].judge_confidence == pytest.approx(1 / (1 + np.exp(-0.1)))
