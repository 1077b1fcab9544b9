"""Proposer/solver self-play on the code executor: validation, checks, rewards, advantages, the loop."""

from __future__ import annotations

import dataclasses
import json
import string
import sys

import jax
import numpy as np
import pytest

from ouroboros_jax.config import (
    LOSS_PRESETS,
    ConfigError,
    LossConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    SamplingConfig,
)
from ouroboros_jax.models import Tokenizer, init_params
from ouroboros_jax.sampling import SampleOutput
from ouroboros_jax.selfplay.code_executor import (
    CodeExecutor,
    ExecSettings,
    check_solution,
    run_program,
    validate_proposal,
)
from ouroboros_jax.selfplay.code_selfplay import (
    CodeSelfPlayConfig,
    learnability_reward,
    make_runtime,
    role_advantages,
    rows_to_batch,
    run_code_selfplay,
    selfplay_step,
)
from ouroboros_jax.selfplay.code_tasks import (
    SEED_PROGRAMS,
    CodeTask,
    TaskBuffer,
    TaskError,
    load_seed_programs,
    parse_args,
    solver_prompt,
)
from ouroboros_jax.sharding import make_mesh

TOK = Tokenizer.char_level(string.printable)
EOS = TOK.eos_id
SETTINGS = ExecSettings(timeout_s=1.0)
GRPO = dataclasses.replace(LOSS_PRESETS["grpo"], kl_coef=0.0)


def _mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def _model(max_seq_len: int) -> ModelConfig:
    return ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                       head_dim=16, d_ff=64, max_seq_len=max_seq_len)


def proposal(program: str, *inputs: str) -> str:
    lines = "\n".join(inputs)
    return f"Here it is.\n```python\n{program}```\n```input\n{lines}\n```"


def grpo_by_hand(r) -> np.ndarray:
    """(r - mean) / (Bessel std + 1e-6), 0 for a constant group."""
    r = np.asarray(r, np.float64)
    if np.all(r == r[0]):
        return np.zeros_like(r)
    return (r - r.mean()) / (np.sqrt(((r - r.mean()) ** 2).sum() / (len(r) - 1)) + 1e-6)


# ---------------------------------------------------------------------------
# Rewards and advantages


def test_learnability_reward_by_hand():
    got = learnability_reward(np.array([0.25, 0.75, 0.5, 0.0, 1.0]))
    np.testing.assert_allclose(got, [0.75, 0.25, 0.5, 0.0, 0.0])


def test_advantages_are_normalised_within_each_type_and_role():
    rewards = np.array([0.75, 1.0, 0.75, -0.5, 0.0, -0.5, 0.0, 1.0, 0.0, 0.0])
    groups = [("deduction", "proposer"), ("deduction", "solver"), ("deduction", "proposer"),
              ("deduction", "proposer"), ("deduction", "solver"), ("induction", "proposer"),
              ("deduction", "solver"), ("induction", "proposer"), ("abduction", "solver"),
              ("abduction", "solver")]
    got = role_advantages(rewards, groups, mode="grpo")
    want = np.zeros(10)
    for g in set(groups):
        rows = [i for i, x in enumerate(groups) if x == g]
        want[rows] = grpo_by_hand(rewards[rows])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # by hand: deduction proposer [0.75, 0.75, -0.5] -> mean 1/3, std sqrt(0.520833) -> +-0.57735, -1.1547
    np.testing.assert_allclose(got[[0, 2, 3]], [0.57735, 0.57735, -1.154700], rtol=1e-4)
    # induction proposer [-0.5, 1.0] -> +-1/sqrt(2); the constant abduction solver group -> 0
    np.testing.assert_allclose(got[[5, 7]], [-0.707106, 0.707106], rtol=1e-4)
    assert got[8] == 0 and got[9] == 0
    # one pooled normalisation would give other values
    assert not np.allclose(got, grpo_by_hand(rewards), atol=1e-3)


# ---------------------------------------------------------------------------
# Validation in the sandbox


def test_valid_proposals_become_tasks_with_repr_outputs():
    v = validate_proposal("deduction", proposal("def f(a, b):\n    return [a, b * 2]\n", "3,'ab'"),
                          n_inputs=1, n_visible=1, settings=SETTINGS)
    assert v.valid, v.reason
    assert v.task.inputs == ("3, 'ab'",) and v.task.outputs == ("[3, 'abab']",)
    text = proposal("def f(x):\n    return (x, x > 2)\n", "1", "2", "2", "3", "4.5")
    v = validate_proposal("induction", text, n_inputs=4, n_visible=3, settings=SETTINGS)
    assert v.valid, v.reason
    assert v.task.inputs == ("1", "2", "3", "4.5")  # the duplicate input dropped
    assert v.task.outputs == ("(1, False)", "(2, False)", "(3, True)", "(4.5, True)")
    assert v.task.held_back == (("4.5", "(4.5, True)"),)


@pytest.mark.parametrize("program, inputs, reason", [
    ("def f(x):\n    return x / 0\n", ("1",), "ZeroDivisionError"),
    ("def f(x):\n    while True:\n        x += 1\n", ("1",), "timeout"),
    ("def f(x):\n    return hash(str(x)) % 1000003\n", ("1",), "nondeterministic"),
    ("def f(x):\n    return list({'a%d' % i for i in range(20)})\n", ("1",), "nondeterministic"),
    ("def f(x):\n    return object()\n", ("1",), "not a plain literal"),
    ("def f(x):\n    return float('nan')\n", ("1",), "not a literal"),
    ("def f(x):\n    return 'a' * 10000\n", ("1",), "longer than 200"),
    ("import random\ndef f(x):\n    return random.random()\n", ("1",), "imports random"),
    ("def g(x):\n    return x\n", ("1",), "no top-level function f"),
    ("def f(x) return x\n", ("1",), "does not parse"),
    ("def f(x):\n    return x\n", ("open('/etc/passwd')",), "not a Python literal"),
    ("def f(x):\n    return x\n", ("1", "1", "2"), "2 distinct inputs, 3 needed"),
])
def test_bad_proposals_are_rejected(program, inputs, reason):
    n = len(inputs) if len(inputs) > 1 else 1
    v = validate_proposal("induction" if n > 1 else "deduction", proposal(program, *inputs), n_inputs=n,
                          n_visible=1, settings=SETTINGS)
    assert not v.valid and reason in v.reason, v.reason


def test_proposals_without_blocks_are_rejected():
    def reason(text):
        return validate_proposal("deduction", text, n_inputs=1, n_visible=1, settings=SETTINGS).reason

    assert "no ```python block" in reason("def f(x): return x")
    assert "no ```input block" in reason("```python\ndef f(x):\n    return x\n```")


# ---------------------------------------------------------------------------
# Checks of solver answers


def _task(kind, program, inputs, n_visible=1):
    with CodeExecutor(SETTINGS, workers=2) as ex:
        (v,) = ex.make_tasks(kind, [(program, inputs)], n_visible=n_visible)
    assert v.valid, v.reason
    return v.task


def test_deduction_compares_literal_values_with_types():
    task = _task("deduction", "def f(a, b):\n    return a // b, a % b\n", ("17, 5",))
    assert task.outputs == ("(3, 2)",)
    scores = [check_solution(task, c, settings=SETTINGS).score for c in
              ["```output\n(3, 2)\n```", "(3,2)", "```output\n[3, 2]\n```", "(3.0, 2)", "3, 2, 1", "no idea"]]
    assert scores == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_abduction_runs_f_on_the_predicted_input():
    task = _task("abduction", "def f(x):\n    return x % 3\n", ("4",))
    assert task.outputs == ("1",)
    answers = [f"```input\n{x}\n```" for x in ("4", "7", "3", "'a'")] + ["```input\n```"]
    verdicts = [check_solution(task, c, settings=SETTINGS) for c in answers]
    assert [v.score for v in verdicts] == [1.0, 1.0, 0.0, 0.0, 0.0]  # any input giving 1 counts
    assert "gave 0, not 1" in verdicts[2].reason and "TypeError" in verdicts[3].reason


def test_induction_is_checked_on_held_back_inputs():
    task = _task("induction", "def f(x):\n    return x * x + 1\n", ("1", "2", "3", "10", "-4"), n_visible=3)
    prompt = solver_prompt(task)
    assert "f(1) == 2\nf(2) == 5\nf(3) == 10\n" in prompt and "f(10)" not in prompt and "101" not in prompt
    answers = {
        "general": "```python\ndef f(x):\n    return x ** 2 + 1\n```",
        "table": "```python\ndef f(x):\n    return {1: 2, 2: 5, 3: 10}[x]\n```",
        "visible only": "```python\ndef f(x):\n    return x * x + 1 if x < 5 else 0\n```",
        "no f": "```python\ndef g(x):\n    return x\n```",
    }
    got = {name: check_solution(task, c, settings=SETTINGS) for name, c in answers.items()}
    assert {n: v.score for n, v in got.items()} == {"general": 1, "table": 0, "visible only": 0, "no f": 0}
    assert "KeyError" in got["table"].reason
    assert "wrong on 1 of 2 held-back inputs" in got["visible only"].reason


# ---------------------------------------------------------------------------
# Buffer and seeds


def test_buffer_dedups_and_keeps_seeds_when_full():
    buf = TaskBuffer(capacity=3)
    seed = CodeTask("deduction", "def f(x):\n    return x\n", ("1",), ("1",), origin="seed")
    a = CodeTask("deduction", "def f(x):\n    return x + 1\n", ("1",), ("2",))
    a_again = CodeTask("deduction", "def f(x):\n    # add one\n    return (x+1)\n", ("1",), ("2",))
    assert buf.add(seed) and buf.add(a)
    assert not buf.add(a_again) and a_again in buf  # same program up to formatting and comments
    assert buf.add(dataclasses.replace(a, inputs=("2",), outputs=("3",)))  # another input is another task
    assert buf.add(dataclasses.replace(a, kind="abduction"))  # and another type
    assert buf.add(CodeTask("deduction", "def f(x):\n    return x * 5\n", ("1",), ("5",)))
    assert [t.outputs[0] for t in buf.tasks("deduction")] == ["1", "3", "5"]  # oldest proposed one went
    assert buf.counts() == {"deduction": 3, "abduction": 1}
    picks = buf.sample("deduction", 2, np.random.default_rng(0), exclude=[seed.key])
    assert len(picks) == 2 and all(t.origin == "proposed" for t in picks)


def test_seed_file_loads_and_names_bad_lines(tmp_path):
    good = tmp_path / "seeds.jsonl"
    good.write_text(json.dumps({"program": "def f(x):\n    return -x\n", "inputs": ["1", "2"]}) + "\n\n")
    assert load_seed_programs(good) == (("def f(x):\n    return -x\n", ("1", "2")),)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"program": "x"}) + "\n")
    with pytest.raises(TaskError, match=r"bad.jsonl:1: need"):
        load_seed_programs(bad)
    assert parse_args(" 3 ,'a' ") == "3, 'a'"


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"selfplay.task_types"):
        CodeSelfPlayConfig(task_types=("deduction", "translation"))
    with pytest.raises(ConfigError, match=r"sampling.group_size: must be positive"):
        CodeSelfPlayConfig(sampling=SamplingConfig(group_size=0))
    with pytest.raises(ConfigError, match=r"loss.advantage"):  # the loss section's, which the loop reads
        LossConfig(advantage="ppo")
    # prompt buckets: the sampling section's below max_prompt_len, then max_prompt_len
    assert CodeSelfPlayConfig(max_prompt_len=384).prompt_len_buckets == (32, 64, 128, 256, 384)


# ---------------------------------------------------------------------------
# Batch assembly


def _sample_output(prompts, completions) -> SampleOutput:
    """A SampleOutput holding the given token rows (prompts left-padded, completions right-padded)."""
    P = max(len(p) for p in prompts)
    N = max(len(c) for c in completions)
    R = len(prompts)
    out = dict(tokens=np.zeros((R, N), np.int32), mask=np.zeros((R, N), bool),
               prompt_tokens=np.zeros((R, P), np.int32), prompt_mask=np.zeros((R, P), bool))
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        out["prompt_tokens"][i, P - len(p):] = p
        out["prompt_mask"][i, P - len(p):] = True
        out["tokens"][i, :len(c)] = c
        out["mask"][i, :len(c)] = True
    logp = np.where(out["mask"], -1.0, 0.0).astype(np.float32)
    return SampleOutput(logprobs=logp, policy_logprobs=logp, lengths=out["mask"].sum(1).astype(np.int32),
                        truncated=np.zeros(R, bool), steps=N, **out)


def test_rows_to_batch_aligns_prompts_and_pads_rows():
    a = _sample_output([[5, 6], [7]], [[8, 9, 10], [11]])
    b = _sample_output([[1, 2, 3]], [[4]])
    batch, real = rows_to_batch([a, b], [np.array([0.5, -0.5]), np.array([2.0])], prompt_width=4,
                                completion_width=3, num_rows=4)
    np.testing.assert_array_equal(batch.tokens, [[0, 0, 5, 6, 8, 9, 10], [0, 0, 0, 7, 11, 0, 0],
                                                 [0, 1, 2, 3, 4, 0, 0], [0, 0, 5, 6, 8, 9, 10]])
    np.testing.assert_array_equal(batch.loss_mask[:, 4:], [[1, 1, 1], [1, 0, 0], [1, 0, 0], [0, 0, 0]])
    assert not batch.loss_mask[:, :4].any()
    np.testing.assert_array_equal(batch.attention_mask[3], batch.attention_mask[0])
    np.testing.assert_array_equal(batch.advantages, [0.5, -0.5, 2.0, 0.0])
    np.testing.assert_array_equal(batch.old_logp[0, 4:], [-1, -1, -1])
    np.testing.assert_array_equal(real, [True, True, True, False])
    with pytest.raises(ValueError, match="3 rows for a batch of 2"):
        rows_to_batch([a, b], [np.zeros(2), np.zeros(1)], prompt_width=4, completion_width=3, num_rows=2)


# ---------------------------------------------------------------------------
# One step with chosen completions


def scripted_generate(respond):
    """A `sampling.generate` stand-in: completion j of each prompt is `respond(prompt_text, j)`."""

    def generate(params, model_config, prompt_tokens, *, max_new_tokens, num_samples, **_):
        prompts, completions = [], []
        for ids in prompt_tokens:
            text = TOK.decode(ids)
            for j in range(num_samples):
                completion = TOK.encode(respond(text, j)) + [EOS]
                assert len(completion) <= max_new_tokens, respond(text, j)
                prompts.append(list(ids))
                completions.append(completion)
        return _sample_output(prompts, completions)

    return generate


DEDUCTION_A = "def f(x):\n    return x * 3\n"
ABDUCTION_B = "def f(s):\n    return len(s) * 2\n"
INDUCTION_C = "def f(x):\n    return x * x + 1\n"
INDUCTION_D = "def f(x):\n    return x - 1\n"


def respond(prompt: str, j: int) -> str:
    if prompt.startswith("Propose a new Python deduction task."):
        return [proposal(DEDUCTION_A, "4"),
                proposal("def f(x):\n    # triple it\n    return x*3\n", "4"),  # the same task
                proposal("def f(x):\n    return x / 0\n", "4"),  # fails
                proposal("def f(x):\n    return hash(str(x)) % 1000003\n", "4")][j]  # nondeterministic
    if prompt.startswith("Propose a new Python abduction task."):
        return proposal(ABDUCTION_B, "'abc'") if j == 0 else "def f(s): return s"
    if prompt.startswith("Propose a new Python induction task."):
        return [proposal(INDUCTION_C, "1", "2", "3", "10", "-4"),
                proposal(INDUCTION_C, "1", "2"),  # too few inputs
                proposal(INDUCTION_D, "1", "2", "3", "4", "5"),
                proposal("def f(x):\n    return object()\n", "1", "2", "3", "4", "5")][j]
    if "return x * 3" in prompt:  # deduction of A: f(4) == 12, one sample of four right
        return "```output\n12\n```" if j == 0 else "```output\n13\n```"
    if "return len(s) * 2" in prompt:  # abduction of B: every answer gives 6
        return "```input\n" + ["'xyz'", "'abc'", "[1, 2, 3]", "'qqq'"][j] + "\n```"
    if "f(1) == 2\nf(2) == 5\nf(3) == 10" in prompt:  # induction of C: two of four generalise
        general = "```python\ndef f(x):\n    return x ** 2 + 1\n```"
        table = "```python\ndef f(x):\n    return {1: 2, 2: 5, 3: 10}[x]\n```"
        return [general, general, table, "no idea"][j]
    return "```output\n?\n```"  # everything else (seed tasks, D) is never solved


@pytest.mark.slow  # 8-15 s on 2 cores: in the slow set, which CI runs too
def test_one_step_with_chosen_completions_rewards_and_advantages_by_hand():
    cfg = CodeSelfPlayConfig(steps=1, sampling=SamplingConfig(group_size=4, max_new_tokens=64),
                             solve_per_type=2, max_prompt_len=384, propose_max_new_tokens=112,
                             exec_timeout_s=1.0, workers=2)
    model = _model(512)
    rt, state = make_runtime(cfg, model_config=model, params=init_params(model, jax.random.key(0)),
                             loss=GRPO, optimizer=OptimizerConfig(learning_rate=1e-3), encode=TOK.encode,
                             decode=TOK.decode, stop_token_ids=(EOS,), mesh=_mesh(),
                             generate_fn=scripted_generate(respond))
    seeds = rt.buffer.counts()
    assert seeds == {"deduction": 2 * len(SEED_PROGRAMS), "abduction": 2 * len(SEED_PROGRAMS),
                     "induction": len(SEED_PROGRAMS)}
    try:
        state, metrics, rec = selfplay_step(state, rt, step=0)
    finally:
        rt.executor.close()
    reasons = [v.reason for v in rec.validations]
    assert rec.proposal_task.tolist() == [0, 0, -1, -1, 1, -1, -1, -1, 2, -1, 3, -1]
    assert "ZeroDivisionError" in reasons[2] and "nondeterministic" in reasons[3]
    assert "2 distinct inputs, 5 needed" in reasons[9] and "not a plain literal" in reasons[11]
    # tasks: the four new ones (A, B, C, D), then the buffer tops deduction and abduction up to two
    assert [(t.kind, t.origin) for t in rec.tasks] == [
        ("deduction", "proposed"), ("abduction", "proposed"), ("induction", "proposed"),
        ("induction", "proposed"), ("deduction", "seed"), ("abduction", "seed")]
    assert rec.tasks[0].outputs == ("12",) and rec.tasks[1].outputs == ("6",)
    np.testing.assert_allclose(rec.success_rate, [0.25, 1.0, 0.5, 0.0, 0.0, 0.0])
    # proposer: 1 - success for A (0.25 -> 0.75) and C (0.5 -> 0.5); 0 for B (always) and D (never);
    # -0.5 for the proposals that made no task
    np.testing.assert_allclose(rec.proposer_rewards,
                               [0.75, 0.75, -0.5, -0.5, 0.0, -0.5, -0.5, -0.5, 0.5, -0.5, 0.0, -0.5])
    np.testing.assert_allclose(rec.proposer_advantages[:4], [0.866025] * 2 + [-0.866025] * 2, rtol=1e-4)
    np.testing.assert_allclose(rec.proposer_advantages[4:8], [1.5, -0.5, -0.5, -0.5], rtol=1e-4)
    np.testing.assert_allclose(rec.proposer_advantages[8:], grpo_by_hand([0.5, -0.5, 0.0, -0.5]), rtol=1e-4)
    # solver rows, task-major; deduction group = A's four + the seed's four: [1, 0 x 7]
    G = 4
    rows = lambda t: slice(t * G, (t + 1) * G)
    np.testing.assert_array_equal(rec.solver_rewards[rows(0)], [1, 0, 0, 0])
    np.testing.assert_array_equal(rec.solver_rewards[rows(2)], [1, 1, 0, 0])
    deduction = np.r_[rec.solver_advantages[rows(0)], rec.solver_advantages[rows(4)]]
    np.testing.assert_allclose(deduction, [2.474874] + [-0.353553] * 7, rtol=1e-4)
    induction = rec.solver_advantages[2 * G:4 * G]
    np.testing.assert_allclose(induction, grpo_by_hand([1, 1, 0, 0, 0, 0, 0, 0]), rtol=1e-4)
    abduction = np.r_[rec.solver_advantages[rows(1)], rec.solver_advantages[rows(5)]]
    np.testing.assert_allclose(abduction, grpo_by_hand([1] * 4 + [0] * 4), rtol=1e-4)
    # the buffer grew by exactly the four new tasks
    assert [t.program for t in rec.added] == [DEDUCTION_A, ABDUCTION_B, INDUCTION_C, INDUCTION_D]
    assert rt.buffer.counts() == {k: n + (2 if k == "induction" else 1) for k, n in seeds.items()}
    # one update on 12 proposer + 24 solver rows (60 with padding rows, which carry no loss)
    assert int(state.step) == 1 and metrics["train/finite"] == 1.0
    assert metrics["train/num_sequences"] == 36 and rt.batch_rows == 60
    assert metrics["propose/deduction/valid_frac"] == 0.5 and metrics["solve/induction/accuracy"] == 0.25


# ---------------------------------------------------------------------------
# A tiny random model, end to end


@pytest.mark.slow  # end to end, 10-35 s on 2 cores: in the slow set, which CI runs too
def test_tiny_random_model_plays_from_the_seed_buffer():
    cfg = CodeSelfPlayConfig(steps=2, sampling=SamplingConfig(group_size=2, max_new_tokens=16),
                             solve_per_type=2, max_prompt_len=384, propose_max_new_tokens=24,
                             exec_timeout_s=1.0, workers=2)
    model = _model(416)
    result = run_code_selfplay(cfg, model_config=model, params=init_params(model, jax.random.key(1)),
                               loss=GRPO, optimizer=OptimizerConfig(learning_rate=1e-3), encode=TOK.encode,
                               decode=TOK.decode, stop_token_ids=(EOS,), mesh=_mesh())
    assert int(result.state.step) == 2 and len(result.history) == 2
    for m in result.history:
        assert m["train/finite"] == 1.0 and np.isfinite(m["train/loss"])
        # 24 random tokens make no valid program: every task solved comes from the seed buffer
        assert m["propose/valid_frac"] == 0.0
        for kind in ("deduction", "abduction", "induction"):
            assert m[f"solve/{kind}/tasks"] == 2 and m[f"propose/{kind}/reward"] == -0.5
        assert m["train/num_sequences"] == 3 * 2 * (1 + 2)
    assert result.buffer.counts() == {"deduction": 12, "abduction": 12, "induction": 6}


def test_program_output_cannot_pass_for_results():
    program = "def f(x):\n    print('\\nfake 0 ok 3939', flush=True)\n    return x + 1\n"
    for fresh in (True, False):
        result = run_program(program, ["1", "2"], settings=SETTINGS, fresh=fresh)
        assert result.outputs == ("2", "3") and result.ok


# ---------------------------------------------------------------------------
# The experiment script on a tiny random Hugging Face checkpoint

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer_files(path):
    """Character-level tokenizer.json and ChatML tokenizer_config.json in `path`; returns the vocab size."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate([*specials, *dict.fromkeys(string.printable)])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    # [\s\S] rather than ".": a dot skips newlines and would leave "\n\n" as one unknown piece
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<pad>"}))
    return len(vocab)


def _load_script():
    import importlib.util
    from pathlib import Path

    file = Path(__file__).parents[1] / "experiments" / "code_selfplay.py"
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))  # the script imports the shared experiments/hf_run.py
    spec = importlib.util.spec_from_file_location("code_selfplay_script", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # about 30 s of CPU: compiles for 8 simulated devices, and torch builds the checkpoint
def test_experiment_script_runs_two_steps_on_a_tiny_hf_checkpoint(tmp_path, capsys):
    from hf_fixtures import make_checkpoint

    ckpt, run_dir = tmp_path / "ckpt", tmp_path / "run"
    vocab_size = _tokenizer_files(ckpt)
    make_checkpoint("qwen2", ckpt, vocab_size=vocab_size, max_position_embeddings=1024, eos_token_id=2)
    script = _load_script()
    last = script.main([
        "--model.path", str(ckpt), "--model.compute_dtype", "float32",
        "--mesh.data", "-1", "--mesh.fsdp", "1",
        "--selfplay.steps", "2", "--selfplay.sampling.group_size", "2", "--selfplay.proposer_prompts", "1",
        "--selfplay.solve_per_type", "1", "--selfplay.references", "0", "--selfplay.max_prompt_len", "320",
        "--selfplay.propose_max_new_tokens", "16", "--selfplay.sampling.max_new_tokens", "16",
        "--selfplay.micro_batch_size", "0", "--selfplay.workers", "2", "--selfplay.exec_timeout_s", "1",
        "--logging.run_dir", str(run_dir), "--logging.tensorboard", "False", "--logging.console", "False",
        "--export_dir", str(tmp_path / "export")])
    out = capsys.readouterr().out
    assert "code_selfplay: steps=2 valid proposals first=0.00 last=0.00" in out
    assert "buffer deduction=12 abduction=12 induction=6" in out
    assert last["train/finite"] == 1.0 and last["solve/deduction/tasks"] == 1
    # 3 types x 2 proposals + 3 tasks x 2 answers = 12 rows, padded to 16 for the 8 data shards
    assert last["train/num_sequences"] == 12
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    tasks = [json.loads(x) for x in (run_dir / "tasks.jsonl").read_text().splitlines()]
    assert len(tasks) == 30 and {t["origin"] for t in tasks} == {"seed"}
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["selfplay"]["sampling"]["group_size"] == 2 and saved["model"]["path"] == str(ckpt)
    assert {p.name for p in (tmp_path / "export").iterdir()} >= {"config.json", "tokenizer.json"}


def test_experiment_prompts_use_the_chat_template_and_its_stop_tokens(tmp_path):
    _tokenizer_files(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    script = _load_script()
    tokenizer = Tokenizer.from_dir(tmp_path)
    encode = script.prompt_encoder(tokenizer, chat=True, system_prompt="S")
    assert tokenizer.decode(encode("hi"), skip_special_tokens=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    plain = script.prompt_encoder(tokenizer, chat=False, system_prompt="S")
    assert tokenizer.decode(plain("hi")) == "S\n\nhi"
    assert script.stop_token_ids(str(tmp_path), tokenizer, chat=True) == (2,)
    with pytest.raises(ConfigError, match="model.path: name a Hugging Face checkpoint"):
        script.load_policy(script.parse([]), mesh=None)


def test_experiment_help_lists_the_selfplay_fields(capsys):
    script = _load_script()
    with pytest.raises(SystemExit) as exit_info:
        script.parse(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("--selfplay.sampling.group_size",
                 "--selfplay.buffer_size", "--selfplay.task_types", "--model.path",
                 "--loss.variant", "--export_dir"):
        assert name in out
