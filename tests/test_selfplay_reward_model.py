"""Reward models: Bradley-Terry training, sharding, checkpoints, the RL reward hook, PAR,
ensembles and the reward-hacking tracker."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.batch import pack_pairs, pair_widths
from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.data import Example
from ouroboros_jax.models import (
    CheckpointError,
    Tokenizer,
    export_hf_checkpoint,
    init_params,
    param_specs,
    reward_scores,
)
from ouroboros_jax.objectives import bradley_terry
from ouroboros_jax.rollout import RolloutSettings, collect
from ouroboros_jax.selfplay.preference import PreferencePair, encode_pairs, read_preference_pairs
from ouroboros_jax.selfplay.reward_model import (
    ModelReward,
    PARReward,
    RewardHackingTracker,
    ensemble_penalty,
    ensemble_stats,
    gold_reference,
    hacking_deltas,
    init_reward_model,
    load_reward_model,
    par_shaping,
    responses_as_sample,
    save_reward_model,
    train_reward_model,
)
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.step import TrainState, make_optimizer, make_train_step
from verifiers import Verdict

TOK = Tokenizer.char_level("abcdefgh0123456789")
# 24 >= the 21 ids of TOK, and divisible by a tensor axis of 2
CFG = ModelConfig(vocab_size=24, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                  d_ff=64, max_seq_len=64)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _one_device_mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def _rm_params(seed: int = 0):
    return init_reward_model(init_params(CFG, jax.random.key(seed)), jax.random.key(seed + 100))


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
# Hand-computed shaping


def test_par_shaping_hand_values():
    # one reference: sigmoid(r - r_ref)
    got = par_shaping(np.array([[1.0, 3.0], [0.0, -2.0]]), np.array([[1.0], [0.0]]))
    np.testing.assert_allclose(got, [[0.5, _sig(2.0)], [0.5, _sig(-2.0)]], rtol=1e-12)
    # two references 0 and 2: the paper's mean of sigmoids, or a sigmoid of the centred reward
    rewards, refs = np.array([[1.0, 3.0]]), np.array([[0.0, 2.0]])
    each = [(_sig(1) + _sig(-1)) / 2, (_sig(3) + _sig(1)) / 2]
    np.testing.assert_allclose(par_shaping(rewards, refs), [each], rtol=1e-12)
    np.testing.assert_allclose(each, [0.5, (0.9525741268224334 + 0.7310585786300049) / 2], rtol=1e-12)
    np.testing.assert_allclose(par_shaping(rewards, refs, center="mean"), [[0.5, _sig(2)]], rtol=1e-12)
    with pytest.raises(ValueError, match="unknown center"):
        par_shaping(rewards, refs, center="median")
    with pytest.raises(ValueError, match=r"must be \[B, G\] and \[B, M\]"):
        par_shaping(rewards, np.zeros((2, 1)))


def test_ensemble_penalty_hand_values():
    scores = np.array([[1.0, 2.0], [3.0, 2.0], [2.0, 2.0]])  # 3 members, 2 rows
    mean, std = ensemble_stats(scores)
    np.testing.assert_allclose(mean, [2.0, 2.0])
    np.testing.assert_allclose(std, [math.sqrt(2 / 3), 0.0])  # population std: ((1 + 1 + 0) / 3) ** 0.5
    np.testing.assert_allclose(ensemble_penalty(scores, 0.5), [2.0 - 0.5 * math.sqrt(2 / 3), 2.0])
    np.testing.assert_allclose(ensemble_penalty(scores, 0.0), mean)


# ---------------------------------------------------------------------------
# Rewards of sampled rows


def _sample():
    # two prompts, two responses each, in the sampler's layout
    prompts = [TOK.encode("12"), TOK.encode("12"), TOK.encode("345"), TOK.encode("345")]
    responses = [TOK.encode("ab"), TOK.encode("bcd"), TOK.encode("a"), TOK.encode("hhhh")]
    return responses_as_sample(prompts, responses)


def test_responses_as_sample_layout():
    s = _sample()
    tokens, mask = s.sequences()
    assert tokens.shape == (4, 3 + 4)
    np.testing.assert_array_equal(s.lengths, [2, 3, 1, 4])
    np.testing.assert_array_equal(tokens[0], [0, *TOK.encode("12"), *TOK.encode("ab"), 0, 0])
    np.testing.assert_array_equal(mask[0], [False, True, True, True, True, False, False])
    np.testing.assert_array_equal(mask[3], [True] * 7)
    with pytest.raises(ValueError, match="row 1 has an empty response"):
        responses_as_sample([[1], [2]], [[3], []])


def test_model_reward_ensemble_equals_hand_combination():
    members = [_rm_params(0), _rm_params(1), _rm_params(2)]
    sample = _sample()
    tokens, mask = sample.sequences()
    score = jax.jit(lambda p: reward_scores(p, CFG, jnp.asarray(tokens), jnp.asarray(mask)))
    direct = np.stack([np.asarray(score(p)) for p in members])
    reward = ModelReward(members, CFG, penalty=2.0)
    got = reward(sample, [])
    np.testing.assert_allclose(reward.member_scores(sample), direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, direct.mean(0) - 2.0 * direct.std(0), rtol=1e-5, atol=1e-6)
    assert reward.last_stats["reward_model/std"] == pytest.approx(direct.std(0).mean(), rel=1e-4)
    # on an 8-device mesh (4 rows padded to the 4 batch shards and back) the scores are the same
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = ModelReward(members, CFG, penalty=2.0, mesh=mesh)
    np.testing.assert_allclose(sharded(sample, []), got, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="member 0 has no score head"):
        ModelReward([init_params(CFG, jax.random.key(0))], CFG)


def test_par_reward_uses_cached_reference_rewards():
    examples = [Example(id="x", prompt="12", gold={"answer": "ab"}),
                Example(id="y", prompt="345", gold={"answer": "hh"})]
    base = lambda sample, exs: sample.lengths.astype(float)  # reward = response length
    calls = []

    def reference(exs):
        calls.append([e.id for e in exs])
        return gold_reference(lambda es: [TOK.encode(e.prompt) for e in es],
                              lambda e: TOK.encode(e.gold["answer"]))(exs)

    par = PARReward(base, reference)
    got = par(_sample(), examples)
    # references are 2 tokens long: sigmoid(length - 2)
    np.testing.assert_allclose(got, [_sig(0), _sig(1), _sig(-1), _sig(2)], rtol=1e-12)
    assert par.last_stats["par/reference_reward"] == 2.0
    par(_sample(), examples[::-1])  # same ids: served from the cache
    assert calls == [["x", "y"]]


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
# The reward hook of the RL loop


def test_rollout_reward_hook_adds_weighted_model_reward():
    params = init_params(CFG, jax.random.key(0))
    examples = [Example(id=str(i), prompt="p", gold={"i": i}) for i in range(2)]
    score = lambda texts, golds: [Verdict(float(g["i"]), bool(g["i"])) for g in golds]
    settings = RolloutSettings(group_size=3, max_new_tokens=4, prompt_len_buckets=(8,), advantage="dr_grpo")
    kwargs = dict(num_prompts=2, settings=settings, decode=lambda ids: "x", score=score,
                  rng=jax.random.key(2))
    encode = lambda exs: [[1, 2, 3]] * len(exs)
    plain = collect(lambda n: examples[:n], encode, params, CFG, **kwargs)
    length_reward = lambda sample, exs: sample.lengths.astype(np.float64) + 10 * np.repeat(
        [e.gold["i"] for e in exs], 3)
    mixed = collect(lambda n: examples[:n], encode, params, CFG, reward_fn=length_reward, reward_weight=0.5,
                    verifier_weight=2.0, **kwargs)
    lengths = mixed.sample.lengths.reshape(2, 3)
    np.testing.assert_array_equal(mixed.sample.tokens, plain.sample.tokens)  # same draws
    np.testing.assert_array_equal(plain.rewards, [[0, 0, 0], [1, 1, 1]])
    want = 2.0 * np.array([[0.0] * 3, [1.0] * 3]) + 0.5 * (lengths + np.array([[0.0], [10.0]]))
    np.testing.assert_allclose(mixed.rewards, want)
    np.testing.assert_allclose(mixed.advantages, want - want.mean(1, keepdims=True), atol=1e-5)
    np.testing.assert_array_equal(mixed.correct, plain.correct)  # accuracy still from the verifier
    with pytest.raises(ValueError, match=r"expected \(6,\), one reward per sampled row"):
        collect(lambda n: examples[:n], encode, params, CFG, reward_fn=lambda s, e: np.zeros(2), **kwargs)


def test_trainer_task_reward_model_alone(tmp_path):
    """Task.reward_model with verifier_weight=0: the logged reward is exactly the model reward."""
    from ouroboros_jax.config import (
        ExperimentConfig,
        LoggingConfig,
        OptimizerConfig,
        SamplingConfig,
        TrainConfig,
        VerifierConfig,
    )
    from ouroboros_jax.data import arithmetic_source
    from ouroboros_jax.trainer import Task, train

    tok = Tokenizer.char_level("0123456789+-*=? .Whatis")
    model = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                        head_dim=16, d_ff=64, max_seq_len=64)
    cfg = ExperimentConfig(
        seed=3, model=model, mesh=MeshConfig(data=1, fsdp=1, tensor=1),
        sampling=SamplingConfig(group_size=4, max_new_tokens=4, prompt_len_buckets=(24,)),
        optimizer=OptimizerConfig(learning_rate=1e-3),
        train=TrainConfig(steps=2, prompts_per_step=2, mini_batch_size=8, micro_batch_size=8, eval_every=0),
        logging=LoggingConfig(run_dir=str(tmp_path), console=False, tensorboard=False),
        verifier=VerifierConfig(names=("math_any",), weights=(1.0,), num_workers=1))
    seen = []

    class LengthReward:
        last_stats: dict = {}

        def __call__(self, sample, examples):
            seen.append(np.asarray(sample.lengths))
            self.last_stats = {"reward_model/longest": float(np.max(sample.lengths))}
            return 0.25 * sample.lengths + 1.0

    reward_model = LengthReward()

    task = Task(train_source=arithmetic_source(seed=0, digits=1),
                encode=lambda exs: tok.encode_batch([e.prompt for e in exs]),
                decode=lambda ids: tok.decode(list(ids)), verifier="math_any", stop_token_ids=(tok.eos_id,),
                reward_model=reward_model, reward_model_weight=2.0, verifier_weight=0.0)
    result = train(cfg, model_config=model, params=init_params(model, jax.random.key(0)), task=task,
                   mesh=_one_device_mesh())
    assert len(seen) == 2
    for lengths, metrics in zip(seen, result.history, strict=True):
        assert metrics["reward/mean"] == pytest.approx(2.0 * (0.25 * lengths.mean() + 1.0), rel=1e-9)
        assert metrics["length/mean"] == pytest.approx(lengths.mean())
        assert metrics["reward_model/longest"] == lengths.max()  # the reward object's own stats are logged
        assert metrics["time/reward_model"] > 0.0


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
