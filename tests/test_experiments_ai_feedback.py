"""The AI-feedback experiment scripts at a tiny size: they run end to end and print their summary lines."""

from __future__ import annotations

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
                      "--iteration.batch_size", "4"])
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
            "--sft_steps", "2", "--rm_steps", "2", "--rl_steps", "2"]
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


@pytest.mark.parametrize("name, flags", [
    ("self_rewarding", ("--iterations", "--judge_fraction", "--iteration.num_candidates",
                        "--iteration.beta")),
    ("constitutional_ai", ("--feedback_steps", "--sft_steps", "--rm_steps", "--rl_steps")),
])
def test_help_names_the_config_fields(name, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(name).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out
