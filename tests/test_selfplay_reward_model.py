"""Reward models: Bradley-Terry training, sharding, checkpoints and the reward-hacking tracker
(their use as reward sources is tests/test_rewards.py)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.batch import pack_pairs, pair_widths
from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.models import (
    CheckpointError,
    Tokenizer,
    export_hf_checkpoint,
    init_params,
    param_specs,
    reward_scores,
)
from ouroboros_jax.objectives import bradley_terry
from ouroboros_jax.rewards import responses_as_sample
from ouroboros_jax.selfplay.preference import PreferencePair, encode_pairs, read_preference_pairs
from ouroboros_jax.selfplay.reward_model import (
    RewardHackingTracker,
    hacking_deltas,
    init_reward_model,
    load_reward_model,
    save_reward_model,
    train_reward_model,
)
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.step import TrainState, make_optimizer, make_train_step

TOK = Tokenizer.char_level("abcdefgh0123456789")
# 24 >= the 21 ids of TOK, and divisible by a tensor axis of 2
CFG = ModelConfig(vocab_size=24, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                  d_ff=64, max_seq_len=64)


def _one_device_mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def _rm_params(seed: int = 0):
    return init_reward_model(init_params(CFG, jax.random.key(seed)), jax.random.key(seed + 100))


def _sample():
    # two prompts, two responses each, in the sampler's layout
    prompts = [TOK.encode("12"), TOK.encode("12"), TOK.encode("345"), TOK.encode("345")]
    responses = [TOK.encode("ab"), TOK.encode("bcd"), TOK.encode("a"), TOK.encode("hhhh")]
    return responses_as_sample(prompts, responses)


def _encode(pairs):
    return encode_pairs(pairs, TOK.encode, lambda text: TOK.encode(text) + [TOK.eos_id])


def _synthetic_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Chosen responses contain an 'a' somewhere, rejected ones never: separable, not by the last token."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        prompt = "".join(rng.choice(list("0123456789"), rng.integers(2, 5)))

        def response(good: bool) -> str:
            chars = list(rng.choice(list("bcdefgh"), rng.integers(3, 7)))
            if good:
                chars[rng.integers(0, len(chars))] = "a"
            return "".join(chars)

        pairs.append(PreferencePair(prompt, response(True), response(False)))
    return pairs


# ---------------------------------------------------------------------------
# Training


def test_bradley_terry_training_separates_heldout_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for p in _synthetic_pairs(320, seed=0):
            f.write(json.dumps({"q": p.prompt, "good": p.chosen, "bad": p.rejected}) + "\n")
    pairs = read_preference_pairs(path, prompt_field="q", chosen_field="good", rejected_field="bad")
    train, heldout = _encode(pairs[:256]), _encode(pairs[256:])
    result = train_reward_model(_rm_params(), CFG, train, heldout, steps=40, batch_size=32,
                                learning_rate=3e-3, mesh=_one_device_mesh(), eval_every=20)
    assert [e["step"] for e in result.evals] == [20, 40]
    assert result.evals[-1]["accuracy"] > 0.9
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # scores near 0 at the start


@pytest.mark.slow  # 8-15 s on 2 cores: in the slow set, which CI runs too
def test_reward_model_step_on_8_devices_equals_1_device():
    pairs = _encode(_synthetic_pairs(8, seed=3))
    P, C = pair_widths(pairs)
    batch = pack_pairs(pairs, prompt_width=P, completion_width=C)
    # A large Adam eps: with the default, a near-zero gradient's update is lr * sign(g), and the
    # sign of a rounding-level gradient is not a property of the sharding.
    optimizer = make_optimizer(1e-2, b2=0.99, eps=1e-3)
    out = {}
    meshes = {"one": _one_device_mesh(), "eight": make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))}
    for name, mesh in meshes.items():
        step_fn, shardings = make_train_step(bradley_terry(CFG, center_coef=0.01), optimizer, mesh,
                                             param_specs(CFG, head="score"))
        params = _rm_params()
        state = jax.device_put(TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                                          jax.random.key(0)), shardings)
        metrics = []
        for _ in range(2):
            state, m = step_fn(state, batch)
            metrics.append(m)
        out[name] = (jax.device_get(state.params), jax.device_get(metrics))
        if name == "eight":  # the embedding is really split over fsdp and tensor
            assert len(state.params["embed_VD"].sharding.device_set) == 8
            assert state.params["embed_VD"].addressable_shards[0].data.shape == (12, 16)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, out["one"], out["eight"])
    assert out["one"][1][1]["loss"] < out["one"][1][0]["loss"]


def test_save_and_load_round_trip(tmp_path):
    params = _rm_params()
    save_reward_model(params, CFG, tmp_path / "rm", pad_token_id=0)
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["architectures"] == [
        "Qwen2ForSequenceClassification"]
    cfg, loaded = load_reward_model(tmp_path / "rm")
    tokens, mask = _sample().sequences()
    np.testing.assert_allclose(reward_scores(loaded, cfg, tokens, mask),
                               reward_scores(params, CFG, tokens, mask), rtol=1e-6)
    export_hf_checkpoint(init_params(CFG, jax.random.key(0)), CFG, tmp_path / "lm")
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(tmp_path / "lm")


# ---------------------------------------------------------------------------
# Reward-hacking signal


def test_hacking_deltas_hand_values():
    assert all(math.isnan(x) for x in hacking_deltas([1, 2, 3], [1, 1, 1], window=2))
    d_reward, d_accuracy = hacking_deltas([0, 1, 2, 3, 5], [0.9, 0.8, 0.8, 0.6, 0.4], window=2)
    assert d_reward == pytest.approx((3 + 5) / 2 - (1 + 2) / 2)
    assert d_accuracy == pytest.approx((0.6 + 0.4) / 2 - (0.8 + 0.8) / 2)


def test_tracker_flags_reward_up_accuracy_down():
    tracker = RewardHackingTracker(window=2, reward_rise=0.1, accuracy_drop=0.05)
    # healthy start: reward and accuracy rise together; then reward keeps rising while accuracy falls
    rewards = [0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.2]
    accuracy = [0.50, 0.60, 0.70, 0.72, 0.70, 0.60, 0.45, 0.30]
    points = enumerate(zip(rewards, accuracy, strict=True))
    flags = [tracker.update(10 * i, r, a)["hacking/flag"] for i, (r, a) in points]
    # index 4: reward (0.4 + 0.6)/2 - (0.2 + 0.3)/2 = +0.25, accuracy (0.72 + 0.70)/2 - (0.6 + 0.7)/2 = +0.06
    # index 5: reward (0.6 + 0.8)/2 - (0.3 + 0.4)/2 = +0.35, accuracy (0.7 + 0.6)/2 - (0.7 + 0.72)/2 = -0.06
    assert flags == [0, 0, 0, 0, 0, 1, 1, 1]
    assert tracker.flagged_at == 50
    healthy = RewardHackingTracker(window=2, accuracy_drop=0.05)
    for i in range(8):
        assert healthy.update(i, 0.1 * i, 0.5 + 0.05 * i)["hacking/flag"] == 0
    assert healthy.flagged_at is None
    # reward flat, accuracy falling: a plain regression, not hacking
    flat = RewardHackingTracker(window=2, reward_rise=0.1)
    for i in range(8):
        flat.update(i, 1.0, 0.9 - 0.1 * i)
    assert flat.flagged_at is None
