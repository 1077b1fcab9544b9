"""Command-line mistakes get a usage error naming what the user typed, never a traceback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import verifiers
from ouroboros_jax.config import ExperimentConfig, TrainConfig, parse_cli

ROOT = Path(__file__).resolve().parents[1]


def _usage_error(capsys, args, default=None) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(default, args=args)
    assert exit_info.value.code == 2
    return " ".join(capsys.readouterr().err.replace("│", " ").split())


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"],
     "error: --preset: must be one of ['dapo', 'dr_grpo', 'grpo', 'gspo', 'ppo'] (got 'nope')"),
    (["--preset"], "error: --preset needs a value: one of ['dapo', 'dr_grpo', 'grpo', 'gspo', 'ppo']"),
    (["--preset", "--seed", "1"], "error: --preset needs a value"),
    (["--config", "/missing.json"],
     "error: --config: cannot read '/missing.json': No such file or directory"),
    (["--config"], "error: --config needs a value"),
])
def test_bad_preset_and_config_are_usage_errors(capsys, args, message):
    assert message in _usage_error(capsys, args)


def test_a_conflict_names_the_flag_that_was_set_and_the_one_it_conflicts_with(capsys):
    default = ExperimentConfig(train=TrainConfig(prompts_per_step=7, mini_batch_size=56, micro_batch_size=8))
    err = _usage_error(capsys, ["--train.mini_batch_size", "7"], default)
    assert ("train.mini_batch_size: 7 (set by --train.mini_batch_size) conflicts with "
            "train.micro_batch_size=8 (not set, from the defaults)") in err
    assert "also set --train.micro_batch_size to a divisor of 7, or 0" in err
    # the flag the user set is the one blamed when it is the micro-batch
    assert "train.micro_batch_size: must divide train.mini_batch_size=56 (got 5)" in _usage_error(
        capsys, ["--train.micro_batch_size", "5"], default)


def test_booleans_take_flag_and_no_flag_and_the_old_true_false_form():
    cfg = parse_cli(args=["--logging.no_console", "--checkpoint.async_save", "False",
                          "--logging.tensorboard=false", "--overwrite"])
    assert not cfg.logging.console and not cfg.checkpoint.async_save and not cfg.logging.tensorboard
    assert cfg.logging.overwrite
    assert parse_cli(args=["--data.chat_template"]).data.chat_template


def test_help_lists_preset_config_and_what_each_preset_sets():
    code = "from ouroboros_jax.config import parse_cli; parse_cli(args=['--help'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}).stdout
    assert "--preset NAME" in out and "--config PATH" in out and "--overwrite" in out
    assert "grpo: loss.kl_coef=0.04 (KL to the reference on)" in out
    assert "dr_grpo: loss.advantage='dr_grpo'" in out and "--logging.console, --logging.no_console" in out
    from verifiers.base import _BUILTIN

    after = out[out.index("--verifier.names"):].split("--verifier.weights")[0]
    help_of_names = " ".join(after.replace("│", " ").split())
    assert all(name in help_of_names for name in _BUILTIN), help_of_names


def test_every_named_verifier_is_used_with_its_weight():
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("quickstart_script", ROOT / "experiments" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    import hf_run

    cfg = parse_cli(quickstart.DEFAULT, args=["--verifier.names", "format", "math_any",
                                              "--verifier.weights", "0.5", "1.0"])
    task = quickstart.make_task(cfg)
    assert task.verifier == {"format": 0.5, "math_any": 1.0}
    assert hf_run.verifier_spec(cfg.verifier) == task.verifier  # the scripts share one function
    combined = verifiers.resolve(task.verifier)
    assert [(label, w) for label, _, w in combined] == [("format", 0.5), ("math_any", 1.0)]
    # a right bare answer: math_any says 1, the format verifier's score is added at weight 0.5
    verdict = combined("132", {"answer": "132"})
    assert verdict.score == pytest.approx(0.5 * verdict.info["scores"]["format"] + 1.0)


def test_a_prompt_too_long_names_the_flags_that_fix_it():
    from ouroboros_jax.data import Example, PromptEncoder, PromptTooLongError

    class Words:
        def encode_batch(self, texts, add_special_tokens=True):
            return [[len(w) for w in t.split()] for t in texts]

    encoder = PromptEncoder(Words(), max_len=3)
    with pytest.raises(PromptTooLongError) as err:
        encoder.encode_batch([Example(id="q1", prompt="What is 12 + 34?", gold={})])
    for flag in ("--sampling.prompt_len_buckets", "--data.system_prompt", "--data.prompt_overflow truncate"):
        assert flag in str(err.value)


def test_checkpoint_scripts_ask_for_model_path_before_loading_data(capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    for name in ("gsm8k_grpo", "math_dapo", "code_gspo", "countdown_dr_grpo"):
        spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "experiments" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(SystemExit) as exit_info:
            module.main([])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "error: --model.path is required: a Hugging Face checkpoint directory" in err
