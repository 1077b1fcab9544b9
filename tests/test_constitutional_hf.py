"""experiments/constitutional_ai.py --model.path: both phases, two steps each, on a tiny random checkpoint.

A random model writes garbage, so its critiques, revisions and verdicts are
noise and almost no verdict parses: the test checks that the pipeline counts
and reports that, labels the undecided comparisons from the feedback model's
answer log-probabilities, and still trains the reward model on exactly those
pairs and runs the RL phase; and that every stage's metrics are in the run
directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_experiments_ai_feedback import load_script

from ouroboros_jax.config import ConfigError
from ouroboros_jax.data import DataError
from ouroboros_jax.models import Tokenizer, load_hf_checkpoint
from ouroboros_jax.models.tiny import make_tiny_checkpoint
from ouroboros_jax.selfplay.constitutional import load_constitution

SUMS = [(1, 2), (3, 4), (5, 6), (7, 1), (2, 2), (4, 5), (6, 3), (8, 1)]
PROMPTS = [f"What is {a} plus {b}?" for a, b in SUMS]


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def args(ckpt: Path, prompts: Path, run: Path, *extra: str) -> list[str]:
    return ["--model.path", str(ckpt), "--prompts", str(prompts), "--run_dir", str(run), "--rounds", "2",
            "--sft_steps", "2", "--rm_steps", "2", "--rl_steps", "2", "--hf.max_new_tokens", "8",
            "--hf.feedback_max_new_tokens", "8", "--hf.prompt_len_buckets", "256", "512",
            "--hf.batch_size", "8", "--hf.group_size", "2", "--hf.prompts_per_step", "4", *extra]


@pytest.mark.slow
def test_checkpoint_pipeline_two_steps_of_each_stage(tmp_path, monkeypatch):
    ckpt = make_tiny_checkpoint(tmp_path / "qwen2", "qwen2")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    m = load_script("constitutional_ai")
    hf = m.run_checkpoint.__globals__  # the module that runs --model.path
    trained_on = []
    real = hf["train_reward_model"]
    monkeypatch.setitem(hf, "train_reward_model", lambda params, cfg, pairs, *a, **k: (
        trained_on.append(pairs), real(params, cfg, pairs, *a, **k))[1])
    run = tmp_path / "run"
    out = m.main(args(ckpt, prompts, run))

    # SL phase: a first try, then per round a critique and a revision of every prompt
    revisions = read(run / "sl" / "revisions.jsonl")
    assert [r["prompt"] for r in revisions] == PROMPTS
    names = {p.name for p in load_constitution()}  # the shipped constitution
    for r in revisions:
        assert len(r["critiques"]) == len(r["revisions"]) == len(r["principles"]) == 2
        assert set(r["principles"]) <= names
    sl = read(run / "sl" / "metrics.jsonl")[0]
    assert sl["sl/critiques"] == sl["sl/revisions"] == len(PROMPTS) * 2
    sft = read(run / "sft" / "metrics.jsonl")
    assert [x["step"] for x in sft] == [1, 2] and all(math.isfinite(x["sft/loss"]) for x in sft)

    # AI preferences: unparsed verdicts counted, undecided pairs labelled by log-probability
    judged = read(run / "preferences" / "metrics.jsonl")[0]
    compared = len(PROMPTS) - judged["pairs/identical_answers"]
    assert judged["judge/parse_failures"] > 0 and judged["pairs/by_logprob"] > 0  # reported, not fatal
    assert judged["pairs"] == judged["pairs/by_verdict"] + judged["pairs/by_logprob"]
    assert judged["pairs"] + judged["pairs/dropped"] == compared
    pairs = read(run / "preferences" / "pairs.jsonl")
    assert len(pairs) == judged["pairs"] > 0 and all(p["principle"] in names for p in pairs)

    # the reward model trained on exactly those pairs (chat-rendered prompts, responses + EOS)
    tok = Tokenizer.from_dir(ckpt)
    assert len(trained_on) == 1 and trained_on[0].size == len(pairs)
    for k, p in enumerate(pairs):
        assert tok.decode(trained_on[0].chosen[k]).startswith(p["chosen"])
        assert tok.decode(trained_on[0].rejected[k]).startswith(p["rejected"])
        assert p["prompt"] in tok.decode(trained_on[0].prompts[k])
    rm = read(run / "reward_model" / "metrics.jsonl")
    assert [x["step"] for x in rm] == [1, 2] and all(x["reward_model/pairs"] == len(pairs) for x in rm)
    assert all(math.isfinite(x["reward_model/loss"]) for x in rm)
    _, rm_params = load_hf_checkpoint(run / "reward_model" / "checkpoint")
    assert "score_D" in rm_params

    # RL against the reward model: two steps, the policy exported
    rl = [x for x in read(run / "rl" / "metrics.jsonl") if "train/loss" in x]
    assert [x["step"] for x in rl] == [1, 2]
    assert all(x["train/finite"] == 1.0 and math.isfinite(x["reward/mean"]) for x in rl)
    assert [x["reward/mean"] for x in rl] == pytest.approx([h["reward/mean"] for h in out["rl"]])
    cfg, params = load_hf_checkpoint(run / "policy")
    assert "lm_head_DV" in params or cfg.tie_embeddings


def test_checkpoint_pipeline_names_a_missing_prompt_file_or_field(tmp_path):
    m = load_script("constitutional_ai")
    with pytest.raises(ConfigError, match="prompts: with --model.path, name a JSONL file"):
        m.main(["--model.path", str(tmp_path / "ckpt")])
    with pytest.raises(DataError, match="absent.jsonl: no such file"):
        m.main(["--model.path", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "absent.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'prompt'"):
        m.main(["--model.path", str(tmp_path / "ckpt"), "--prompts", str(bad)])
