"""The AI-feedback experiment scripts at a tiny size: they run end to end and print their summary lines."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_script(name: str):
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_self_rewarding_toy_task_labels():
    m = load_script("self_rewarding")
    assert m.gold_answer("47+8=") == "55"
    assert m.judge_verdict("47+8=", "55") == "47=1" and m.judge_verdict("47+8=", "54") == "46=0"
    import random
    rng = random.Random(0)
    assert all(m.near_miss("55", rng) in {"45", "54", "56", "65"} for _ in range(20))
    train, heldout, labelled = m.split(0, 200, 200)
    assert len(set(train) | set(heldout) | set(labelled)) == len(m.PROBLEMS) == 900
    assert not set(train) & (set(heldout) | set(labelled))
    labels = m.judging_labels(labelled, 0)
    assert all((r == m.gold_answer(p)) == ok for p, r, ok in zip(labels.prompts, labels.responses,
                                                                 labels.labels, strict=True))


@pytest.mark.slow
def test_self_rewarding_tiny_run_prints_one_line_per_arm(tmp_path, capsys):
    m = load_script("self_rewarding")
    results = m.main(["--run_dir", str(tmp_path), "--model.d_model", "32", "--model.n_heads", "2",
                      "--model.n_kv_heads", "2", "--model.d_ff", "64", "--warmstart.steps", "20",
                      "--warmstart.target_accuracy", "0", "--judge_steps", "10", "--iterations", "3",
                      "--prompts_per_iteration", "8",
                      "--heldout", "16", "--labelled", "16", "--iteration.steps", "2",
                      "--iteration.batch_size", "4", "--export_dir", str(tmp_path / "out")])
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    for line, arm in zip(lines, ("self", "grounded"), strict=True):
        pattern = (rf"self_rewarding: {arm} iterations=3 accuracy first=(\d\.\d\d) last=(\d\.\d\d) "
                   r"judge_agreement first=(\d\.\d\d) last=(\d\.\d\d)")
        match = re.fullmatch(pattern, line)
        assert match, line
        assert float(match[1]) == pytest.approx(results[arm][0]["accuracy"], abs=0.005)
    assert (tmp_path / "self_rewarding.png").is_file()
    # both arms start from the same warm start
    assert results["self"][0]["accuracy"] == results["grounded"][0]["accuracy"]
    from ouroboros_jax.models import Tokenizer, load_hf_checkpoint
    for arm in ("self", "grounded"):  # each arm's last model, with the script's tokenizer
        model_config, _ = load_hf_checkpoint(tmp_path / "out" / arm)
        assert (model_config.d_model, model_config.vocab_size) == (32, m.TOKENIZER.vocab_size)
        assert Tokenizer.from_dir(tmp_path / "out" / arm).encode("47+8=55?") == m.TOKENIZER.encode("47+8=55?")


def test_constitutional_toy_feedback_rows():
    m = load_script("constitutional_ai")
    assert m.pairwise_verdict("47+8=", "54", "55") == "46=0,47=1B"
    assert m.pairwise_verdict("47+8=", "55", "54") == "47=1,46=0A"
    rows = m.FeedbackMix(["47+8="], 0.0, seed=0).take(60)
    kinds = {r.prompt[-1] for r in rows}
    assert kinds == {"?", "|", "!"}  # critiques, revisions, preferences; no answers at fraction 0
    for r in rows:
        if r.prompt.endswith("|"):
            assert r.gold["answer"] == "55"  # a revision is always the right sum
        if r.prompt.endswith("?"):
            shown = r.prompt[len("47+8="):-1]
            assert r.gold["answer"] == m.judge_verdict("47+8=", shown)
    for text in ("47+8=54?46=0|", "47+8=54,55!", "46=0,47=1B"):  # every marker is in the alphabet
        assert m.TOKENIZER.decode(m.TOKENIZER.encode(text)) == text
    assert m.TEMPLATES.revision.format(prompt="47+8=", response="54", critique_request="?", critique="46=0",
                                       revision_request="|") == "47+8=54?46=0|"


@pytest.mark.slow
def test_constitutional_tiny_run_prints_both_phases(tmp_path, capsys):
    m = load_script("constitutional_ai")
    args = ["--run_dir", str(tmp_path), "--model.d_model", "32", "--model.n_heads", "2",
            "--model.n_kv_heads", "2", "--model.d_ff", "64", "--warmstart.steps", "10",
            "--warmstart.target_accuracy", "0", "--feedback_steps", "10", "--heldout", "16",
            "--sft_steps", "2", "--rm_steps", "2", "--rl_steps", "2", "--export_dir", str(tmp_path / "out")]
    sl_line = (r"constitutional_ai: sl first_try=\d\.\d\d revision=\d\.\d\d after_sft=\d\.\d\d "
               r"\(\d+ revisions.*")
    try:
        out = m.main(args)
    except SystemExit as e:  # a judge this untrained may call every pair a tie: said, after the SL phase
        assert "no preference pairs" in str(e)
        assert any(re.fullmatch(sl_line, line) for line in capsys.readouterr().out.splitlines())
        return
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    assert re.fullmatch(r"constitutional_ai: sl first_try=\d\.\d\d revision=\d\.\d\d after_sft=\d\.\d\d",
                        lines[0])
    assert re.fullmatch(r"constitutional_ai: rlaif preference_pairs=\d+ rm_gold_accuracy=\d\.\d\d "
                        r"accuracy before=\d\.\d\d after=\d\.\d\d", lines[1])
    assert out["pairs"] > 0
    from ouroboros_jax.models import Tokenizer, load_hf_checkpoint
    model_config, _ = load_hf_checkpoint(tmp_path / "out")  # the RLAIF policy, with the script's tokenizer
    assert (model_config.d_model, model_config.vocab_size) == (32, m.TOKENIZER.vocab_size)
    assert Tokenizer.from_dir(tmp_path / "out").encode("47+8=54?46=0|") == m.TOKENIZER.encode("47+8=54?46=0|")


@pytest.mark.parametrize("name, flags", [
    ("self_rewarding", ("--iterations", "--judge_fraction", "--iteration.num_candidates",
                        "--iteration.beta", "--export_dir")),
    ("constitutional_ai", ("--feedback_steps", "--sft_steps", "--rm_steps", "--rl_steps", "--model.path",
                           "--prompts", "--rounds", "--hf.undecided", "--hf.rl", "--export_dir")),
])
def test_help_names_the_config_fields(name, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(name).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out


class GoldFirstJudge:
    """A stand-in feedback model: prefers the right sum, else the lexicographically larger text."""

    def __init__(self, gold):
        self.gold, self.decided = gold, []

    def compare(self, prompts, a, b, rng, *, fields=None):
        import numpy as np

        from ouroboros_jax.rewards.judge import JudgeComparisons
        key = lambda p, x: (x == self.gold(p), x)
        outcomes = ["a" if key(p, x) > key(p, y) else "b" for p, x, y in zip(prompts, a, b, strict=True)]
        self.decided += [(p, x, y) if o == "a" else (p, y, x)
                         for p, x, y, o in zip(prompts, a, b, outcomes, strict=True)]
        return JudgeComparisons(outcomes, np.ones(len(prompts), bool), [], [[] for _ in prompts])


@pytest.mark.slow  # ~60 XLA compiles (reward-model and RL steps, sampler): 30-90 s on 2 cores
def test_constitutional_rlaif_phase_trains_the_reward_model_on_the_judged_pairs(tmp_path, monkeypatch):
    import json
    import math

    import jax

    from ouroboros_jax.config import MeshConfig
    from ouroboros_jax.models import init_sharded
    from ouroboros_jax.sharding import make_mesh

    m = load_script("constitutional_ai")
    cfg = m.ConstitutionalExperiment(run_dir=str(tmp_path), rm_steps=2, rl_steps=2, model=dataclasses.replace(
        m.ConstitutionalExperiment().model, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    params = init_sharded(cfg.model, jax.random.key(0), mesh)
    train_prompts, heldout, _ = m.split(0, 16, 0)
    judge = GoldFirstJudge(m.gold_answer)
    trained_on = []
    real = m.train_reward_model
    monkeypatch.setattr(m, "train_reward_model", lambda p, c, pairs, *a, **k: (
        trained_on.append(pairs), real(p, c, pairs, *a, **k))[1])
    out = m.rlaif_phase(cfg, params, params, train_prompts[:32], heldout, mesh, jax.random.key(1),
                        judge=judge)

    # every comparison was decided, and the reward model trained on exactly the judged pairs
    assert out["pairs"] == len(judge.decided) > 0
    enc = m.TOKENIZER.encode
    assert trained_on[0].prompts == [enc(p) for p, _, _ in judge.decided]
    assert trained_on[0].chosen == [enc(c) + [m.EOS] for _, c, _ in judge.decided]
    assert trained_on[0].rejected == [enc(r) + [m.EOS] for _, _, r in judge.decided]
    read = lambda p: [json.loads(x) for x in (tmp_path / p).read_text().splitlines()]
    rm = read("reward_model/metrics.jsonl")
    assert [x["step"] for x in rm[:2]] == [1, 2] and rm[0]["reward_model/pairs"] == out["pairs"]
    assert rm[-1]["reward_model/gold_accuracy"] == out["rm_accuracy"]
    # the RL phase ran its steps against that reward model, with its metrics recorded
    rl = [x for x in read("rlaif/metrics.jsonl") if "train/loss" in x]
    assert [x["step"] for x in rl] == [1, 2]
    assert all(x["train/finite"] == 1.0 and math.isfinite(x["reward/mean"]) for x in rl)
    assert [x["reward/mean"] for x in rl] == [h["reward/mean"] for h in out["rl"]]
