"""Reward sources: verifier verdicts, learned reward models and ensembles, PAR, weighted sums, and
their use in the rollout and the trainer."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.data import Example
from ouroboros_jax.models import Tokenizer, init_params, reward_scores
from ouroboros_jax.rewards import (
    Completions,
    FnReward,
    ModelReward,
    PARReward,
    Rewards,
    VerifierReward,
    WeightedRewards,
    ensemble_penalty,
    ensemble_stats,
    gold_reference,
    par_shaping,
    responses_as_sample,
)
from ouroboros_jax.rollout import RolloutSettings, collect
from ouroboros_jax.selfplay.reward_model import init_reward_model
from ouroboros_jax.sharding import make_mesh
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
    with pytest.raises(ValueError, match=r"must be \[B, G\] and \[B, A\]"):
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
    out = reward(Completions(sample, None, []))
    got = out.rewards
    np.testing.assert_allclose(reward.member_scores(sample), direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, direct.mean(0) - 2.0 * direct.std(0), rtol=1e-5, atol=1e-6)
    assert out.metrics["reward_model/std"] == pytest.approx(direct.std(0).mean(), rel=1e-4)
    # on an 8-device mesh (4 rows padded to the 4 batch shards and back) the scores are the same
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = ModelReward(members, CFG, penalty=2.0, mesh=mesh)
    np.testing.assert_allclose(sharded(Completions(sample, None, [])).rewards, got, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="member 0 has no score head"):
        ModelReward([init_params(CFG, jax.random.key(0))], CFG)


def test_par_reward_uses_cached_reference_rewards():
    examples = [Example(id="x", prompt="12", gold={"answer": "ab"}),
                Example(id="y", prompt="345", gold={"answer": "hh"})]
    base = FnReward(lambda c: c.sample.lengths.astype(float))  # reward = response length
    calls = []

    def reference(exs):
        calls.append([e.id for e in exs])
        return gold_reference(lambda es: [TOK.encode(e.prompt) for e in es],
                              lambda e: TOK.encode(e.gold["answer"]))(exs)

    par = PARReward(base, reference)
    out = par(Completions(_sample(), None, examples))
    # references are 2 tokens long: sigmoid(length - 2)
    np.testing.assert_allclose(out.rewards, [_sig(0), _sig(1), _sig(-1), _sig(2)], rtol=1e-12)
    assert out.metrics["par/reference_reward"] == 2.0
    par(Completions(_sample(), None, examples[::-1]))  # same ids: served from the cache
    assert calls == [["x", "y"]]


# ---------------------------------------------------------------------------
# The reward hook of the RL loop


def test_rollout_reward_hook_adds_weighted_model_reward():
    params = init_params(CFG, jax.random.key(0))
    examples = [Example(id=str(i), prompt="p", gold={"i": i}) for i in range(2)]
    score = lambda texts, golds: [Verdict(float(g["i"]), bool(g["i"])) for g in golds]
    settings = RolloutSettings(group_size=3, max_new_tokens=4, prompt_len_buckets=(8,), advantage="dr_grpo")
    kwargs = dict(num_prompts=2, settings=settings, decode=lambda ids: "x", rng=jax.random.key(2))
    encode = lambda exs: [[1, 2, 3]] * len(exs)
    verifier = VerifierReward(score)
    plain = collect(lambda n: examples[:n], encode, params, CFG, reward=verifier, **kwargs)
    length_reward = FnReward(lambda c: c.sample.lengths.astype(np.float64) + 10 * np.repeat(
        [e.gold["i"] for e in c.examples], 3))
    mixed = collect(lambda n: examples[:n], encode, params, CFG, **kwargs,
                    reward=WeightedRewards({"verify": (verifier, 2.0), "reward_model": (length_reward, 0.5)}))
    lengths = mixed.sample.lengths.reshape(2, 3)
    np.testing.assert_array_equal(mixed.sample.tokens, plain.sample.tokens)  # same draws
    np.testing.assert_array_equal(plain.rewards, [[0, 0, 0], [1, 1, 1]])
    want = 2.0 * np.array([[0.0] * 3, [1.0] * 3]) + 0.5 * (lengths + np.array([[0.0], [10.0]]))
    np.testing.assert_allclose(mixed.rewards, want)
    np.testing.assert_allclose(mixed.advantages, want - want.mean(1, keepdims=True), atol=1e-5)
    np.testing.assert_array_equal(mixed.correct, plain.correct)  # accuracy still from the verifier
    with pytest.raises(ValueError, match=r"expected \(6,\), one reward per sampled row"):
        collect(lambda n: examples[:n], encode, params, CFG, **kwargs, reward=WeightedRewards(
            {"verify": (verifier, 1.0), "reward_model": (FnReward(lambda c: np.zeros(2)), 1.0)}))


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
        def __call__(self, completions):
            lengths = completions.sample.lengths
            seen.append(np.asarray(lengths))
            return Rewards(0.25 * lengths + 1.0, metrics={"reward_model/longest": float(np.max(lengths))})

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


