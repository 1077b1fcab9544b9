"""experiments/instructgpt.py: SFT -> Bradley-Terry reward model -> PPO, two steps each, tiny checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_experiments import load_script, make_hf_dir, tiny_args, write_jsonl

from ouroboros_jax.ppo import PPOState


@pytest.mark.slow
def test_instructgpt_three_stages_two_steps_each(tmp_path):
    ckpt = make_hf_dir(tmp_path / "qwen2", "qwen2")
    sums = [(1, 2), (3, 4), (5, 6), (7, 1), (2, 2), (4, 5), (6, 3), (8, 1)]
    demos = write_jsonl(tmp_path / "demos.jsonl", [
        {"prompt": f"What is {a} plus {b}?", "response": f"{a + b}"} for a, b in sums])
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}", "rejected": f"{a * b + 1}"}
        for a, b in sums])
    module = load_script("instructgpt")
    run = tmp_path / "run"
    args = ["--demonstrations", str(demos), "--preferences", str(prefs), "--sft-steps", "2",
            "--sft-batch", "8", "--rm-steps", "2", "--rm-batch", "8",
            "--prompts", str(demos), *tiny_args(ckpt, run, "--train.inner_epochs", "1",
                                                "--ppo.ptx_coef", "0.1", "--ppo.ptx_data", str(demos))]
    result = module.main(args)
    read = lambda p: [json.loads(x) for x in Path(p).read_text().splitlines()]
    sft = read(run / "sft" / "metrics.jsonl")
    assert [x["step"] for x in sft] == [1, 2] and all(math.isfinite(x["sft/loss"]) for x in sft)
    rm = read(run / "reward_model" / "metrics.jsonl")
    assert [x["step"] for x in rm] == [1, 2] and all(math.isfinite(x["reward_model/loss"]) for x in rm)
    ppo = [x for x in read(run / "metrics.jsonl") if "train/loss" in x]
    assert [x["step"] for x in ppo] == [1, 2]
    for x in ppo:
        assert x["train/finite"] == 1.0 and math.isfinite(x["train/critic_value_loss"])
        assert math.isfinite(x["ppo/kl_ref_k1"])
        assert x["train/ptx_loss"] > 0  # PPO-ptx on the demonstrations (chat-rendered prompts)
    assert isinstance(result.state, PPOState) and result.state.critic is not None
