"""The oversight experiment scripts at tiny size: they run and end with their summary lines."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_script(name: str):
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    # Under its own name: dataclasses look their module up in sys.modules, and the verifier pool's
    # workers import a script's verifier by module name from the experiments directory.
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_rrm_tasks_are_half_right_and_split_into_halves():
    import numpy as np

    rrm = load_script("recursive_reward_modeling")
    tasks = rrm.make_tasks(4000, 2, np.random.default_rng(0))
    assert tasks.shape == (4000, 4, 3)
    assert abs(rrm.gold(tasks, 2).mean() - 0.5) < 0.03
    np.testing.assert_array_equal(tasks[:, 1:, 0], tasks[:, :-1, 2] % 10)  # each step starts from y mod 10
    first, second = rrm.split(tasks, 2)
    assert np.array_equal(rrm.gold(tasks, 2), rrm.gold(first, 1) & rrm.gold(second, 1))
    assert rrm.describe(tasks[:1, :1], 0)[0] == "{} + {} = {}".format(*tasks[0, 0])


@pytest.mark.slow  # trains 4 small MLPs: ~10 s on 2 cores
def test_rrm_script_tiny_run_with_the_rating_queue(tmp_path, capsys):
    rrm = load_script("recursive_reward_modeling")
    runs = rrm.main(["--levels", "2", "--gold-size", "40", "--train-size", "64", "--anchor-size", "32",
                     "--steps", "20", "--hidden", "8", "--run-dir", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    number = r"(\d\.\d\d|nan)"
    pattern = rf"rrm: level={{}} anchor_accuracy checked={number} unchecked=\d\.\d\d deferred={number}"
    assert re.fullmatch(pattern.format(0), lines[-2]) and re.fullmatch(pattern.format(1), lines[-1])
    assert len(runs["checked"]) == 2 and runs["unchecked"][1].labels == 64
    assert (tmp_path / "ratings.sqlite").exists()


@pytest.mark.slow  # trains 4 small MLPs: ~10 s on 2 cores
def test_weak_to_strong_script_tiny_run(capsys):
    w2s = load_script("weak_to_strong")
    results = w2s.main(["--seeds", "1", "--gold-size", "64", "--pool-size", "128", "--test-size", "64",
                        "--steps", "10"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    number = r"-?\d+\.\d\d|nan"
    assert re.fullmatch(rf"weak_to_strong: weak=\d\.\d\d strong_gold=\d\.\d\d strong_on_weak=\d\.\d\d "
                        rf"pgr=({number}) pgr_confidence=({number})", last), last
    assert len(results) == 1 and f"weak={results[0].weak:.2f}" in last


@pytest.mark.slow  # a warm-start, a reward model retrained per step and two GRPO steps: ~1 min on 2 cores
def test_human_loop_tiny_run(tmp_path, capsys):
    loop = load_script("human_loop")
    result = loop.main(["--train.steps", "2", "--train.eval-every", "1", "--train.eval-size", "8",
                        "--warmstart.steps", "5", "--logging.run-dir", str(tmp_path / "run"), "--noise", "0",
                        "--export_dir", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert re.fullmatch(r"human_loop: ratings=\d+ pairs=\d+ retrainings=\d+ heldout_accuracy first=\d\.\d\d "
                        r"last=\d\.\d\d", out.out.strip().splitlines()[-1])
    assert result["ratings"] > 0 and result["retrainings"] >= 1
    assert "ratings: waiting for" in out.err
    assert (tmp_path / "run" / "ratings.sqlite").exists()
    from ouroboros_jax.models import Tokenizer, load_hf_checkpoint
    model_config, _ = load_hf_checkpoint(tmp_path / "out")  # the trained policy, with the script's tokenizer
    assert model_config.vocab_size == loop.TOKENIZER.vocab_size
    prompt = "What is 3 + 4?"
    assert Tokenizer.from_dir(tmp_path / "out").encode(prompt) == loop.TOKENIZER.encode(prompt)


def test_simulated_rater_prefers_the_nearer_answer():
    from types import SimpleNamespace

    loop = load_script("human_loop")
    decide = loop.simulated_rater(0.0, seed=0)
    item = lambda completions: SimpleNamespace(completions=tuple(completions), metadata={"answer": "7"})
    assert decide(item(["5", "7"])) == {"choice": 1}
    assert decide(item(["8", "x"])) == {"choice": 0}
    assert decide(item(["6", "8"])) == {"skip": True}


@pytest.mark.parametrize("name", ["recursive_reward_modeling", "weak_to_strong"])
def test_classifier_scripts_say_why_they_take_no_export_dir(name, capsys):
    script = load_script(name)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "MLP" in help_text and "so this script takes no --export_dir" in help_text.replace("`", "")
    with pytest.raises(SystemExit) as exit_info:  # refused, not silently ignored
        script.main(["--export_dir", "out"])
    assert exit_info.value.code == 2
