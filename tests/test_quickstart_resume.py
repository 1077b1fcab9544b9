"""The quickstart resumed after a crash: says so, skips the warm-start, reports the true step-0 accuracy."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "2",
        "--model.head_dim", "16", "--model.d_ff", "64", "--train.steps", "2", "--train.prompts_per_step", "4",
        "--sampling.group_size", "2", "--train.mini_batch_size", "8", "--train.micro_batch_size", "0",
        "--train.eval_every", "2", "--train.eval_size", "4", "--sampling.eval_num_samples", "2",
        "--checkpoint.save_every", "1", "--checkpoint.no_async_save", "--logging.no_tensorboard",
        "--compilation_cache_dir", ""]


class Preempted(Exception):
    pass


@pytest.mark.slow
def test_a_resumed_quickstart_skips_the_warm_start_and_keeps_step_0(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("quickstart_resume", ROOT / "experiments" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    warm_starts = []
    monkeypatch.setattr(quickstart, "warm_start", lambda cfg, params, mesh: warm_starts.append(1) or params)
    make_task = quickstart.make_task

    def dying_task(cfg):  # the machine goes away during step 2's rollout
        task, calls = make_task(cfg), []
        take = task.train_source.take
        task.train_source.take = lambda n: calls.append(n) or (take(n) if len(calls) < 2 else _die())
        return task

    def _die():
        raise Preempted

    args = [*TINY, "--logging.run_dir", str(tmp_path / "run")]
    monkeypatch.setattr(quickstart, "make_task", dying_task)
    with pytest.raises(Preempted):
        quickstart.main(args)
    step0 = json.loads((tmp_path / "run" / "eval_step0.json").read_text())
    monkeypatch.setattr(quickstart, "make_task", make_task)
    capsys.readouterr()
    quickstart.main(args)
    out = capsys.readouterr().out
    assert warm_starts == [1]  # the resumed run did not warm-start again
    assert "the warm-start is skipped (resuming)" in out
    assert f"resuming from step 1 of {tmp_path / 'run'}" in out
    before = float(re.search(r"held-out accuracy before=([0-9.]+)", out).group(1))
    assert before == pytest.approx(round(step0["eval/pass@1"], 2))
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
