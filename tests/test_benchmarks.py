"""The side-by-side benchmark plumbing (benchmarks/): workload, worker processes, tables, summary line.

Peers (TRL, Tunix) are not needed: the end-to-end run uses ours only, and the
peer workers are exercised by the benchmark scripts themselves.
"""

from __future__ import annotations

import math
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import peers  # noqa: E402
import run_cpu  # noqa: E402
import workload  # noqa: E402

LINE = re.compile(r"^benchmark grpo_step: ours=(\S+) trl=(\S+) tunix=(\S+) "
                  r"ratio_trl=(\S+) ratio_tunix=(\S+)$")
TINY = ["--vocab", "64", "--d-model", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1",
        "--d-ff", "32", "--prompts", "2", "--group", "2", "--prompt-len", "4", "--completion-len", "3"]


def test_reward_and_group_advantages_by_hand():
    assert workload.reward("t2 t3 t4") == pytest.approx(2 / 3)
    assert workload.reward("") == 0.0 and workload.reward("t7") == 0.0
    # Group [1, 0]: mean 0.5, sample std 0.7071 -> +-0.7070 (eps 1e-4 in the denominator).
    adv = workload.group_advantages(np.array([1.0, 0.0, 1.0, 1.0]), group=2)
    np.testing.assert_allclose(adv, [0.5 / (0.5**0.5 + 1e-4), -0.5 / (0.5**0.5 + 1e-4), 0.0, 0.0], rtol=1e-6)


def test_settings_round_trip_and_errors():
    s = workload.Settings(directory="/x", mode="update", work=workload.Workload(2, 4, 8, 16), micro_batch=4)
    assert workload.Settings.from_json(s.to_json()) == s
    assert s.micro == 4 and s.work.rows == 8 and s.work.tokens == 8 * 24
    with pytest.raises(ValueError, match="Settings.mode"):
        workload.Settings(directory="/x", mode="train", work=s.work)
    with pytest.raises(ValueError, match="micro_batch=3"):
        workload.Settings(directory="/x", mode="step", work=s.work, micro_batch=3)
    with pytest.raises(ValueError, match="Workload.group"):
        workload.Workload(2, 1, 8, 16)
    with pytest.raises(ValueError, match="ModelShape.d_model"):
        workload.ModelShape(d_model=30, heads=4)


def test_tokenizer_encodes_the_prompts_to_their_ids(tmp_path):
    pytest.importorskip("transformers")
    w = workload.Workload(3, 2, 5, 4)
    workload.write_tokenizer(tmp_path, vocab=50)
    tok = workload.hf_tokenizer(tmp_path)
    ids = workload.prompt_ids(w, 50, seed=1)
    for text, row in zip(workload.prompt_texts(w, 50, seed=1), ids, strict=True):
        assert tok(text)["input_ids"] == row.tolist()
    assert ids.min() >= 1  # never the pad token t0
    assert tok.eos_token_id == 50 and tok.pad_token_id == 0  # the end token lies outside the model's vocab
    assert tok.decode([3, 8, 50], skip_special_tokens=True) == "t3 t8"


def test_parse_args_quick_and_errors():
    a = run_cpu.parse_args(["--quick"])
    assert a.sections == ["step", "update", "generate"] and a.repeats == 3 and a.warmup == 0
    assert a.work == workload.Workload(2, 4, 32, 32)
    full = run_cpu.parse_args([])
    assert full.sections == list(run_cpu.SECTIONS) and full.work.completion_len == 256
    assert full.scale_completion_lens == [64, 256, 1024] and full.scale_groups == [4, 8, 16]
    with pytest.raises(SystemExit):
        run_cpu.parse_args(["--sections", "step,warp"])
    with pytest.raises(SystemExit):
        run_cpu.parse_args(["--group", "1"])


def test_find_libraries_skips_missing_peers(monkeypatch):
    with pytest.raises(SystemExit, match="unknown"):
        peers.find_libraries("ours,vllm")
    with pytest.raises(SystemExit, match="must include ours"):
        peers.find_libraries("trl")
    with pytest.raises(SystemExit, match="not a file"):
        peers.find_libraries("ours,tunix", tunix_python="/no/such/python")
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    found, notes = peers.find_libraries("ours,trl,tunix")
    assert found == {"ours": sys.executable}
    assert [n.split(":")[0] for n in notes] == ["trl", "tunix"]


def test_worker_env(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_foo=1")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert peers.worker_env("ours") == {"XLA_FLAGS": "--xla_cpu_foo=1", "JAX_PLATFORMS": "cpu"}
    assert peers.worker_env("trl")["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the caller's choice wins
    assert peers.worker_env("trl")["OMP_WAIT_POLICY"] == "ACTIVE"


def test_final_line_format_with_and_without_peers():
    rows = [{"_name": "ours", "tokens/s": 300.0}, {"_name": "trl", "tokens/s": 100.0},
            {"_name": "tunix", "tokens/s": 250.0}]
    line = run_cpu.final_line(rows)
    assert line == "benchmark grpo_step: ours=300.0 trl=100.0 tunix=250.0 ratio_trl=3.00 ratio_tunix=1.20"
    m = LINE.match(run_cpu.final_line(rows[:1]))
    assert m and float(m.group(1)) == 300.0 and all(math.isnan(float(g)) for g in m.groups()[1:])


def test_worker_answers_and_reports_errors(tmp_path):
    script = tmp_path / "echo_worker.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(BENCH)!r})
        from common import serve

        def boom():
            raise ValueError("no such batch")

        serve({{"double": lambda x: 2 * x, "boom": boom}}, ready={{"hello": 1}})
    """))
    ballast = np.ones(40 * 2**20)  # 320 MB touched here: the worker's own peak must not include it
    w = common.Worker("echo", [str(script)], log_path=tmp_path / "echo.log")
    try:
        assert w.ready == {"hello": 1}
        assert w.call("double", 21) == 42
        stats = w.call("stats")
        assert stats["peak_rss_mb"] >= stats["ready_rss_mb"] > 0
        assert common.peak_host_memory_mb() > 320 + ballast[0] and stats["peak_rss_mb"] < 100
        with pytest.raises(common.WorkerError, match="ValueError: no such batch"):
            w.call("boom")
    finally:
        w.close()
    dead = tmp_path / "dead_worker.py"
    dead.write_text("import sys; print('cannot start'); sys.exit(3)\n")
    with pytest.raises(common.WorkerError, match=r"exit code 3[\s\S]*cannot start"):
        common.Worker("dead", [str(dead)], log_path=tmp_path / "dead.log")


@pytest.mark.slow  # end to end, 10-35 s on 2 cores: in the slow set, which CI runs too
def test_run_cpu_step_section_ours_only(capsys, tmp_path):
    results = run_cpu.main(["--sections", "step", "--libraries", "ours", "--repeats", "2", "--warmup", "0",
                            "--work-dir", str(tmp_path), *TINY])
    out = capsys.readouterr().out.strip().splitlines()
    (row,) = results["step"]
    assert row["library"] == "ouroboros-jax" and row["ours x"] == 1.0
    w = workload.Workload(2, 2, 4, 3)
    assert row["tokens/s"] == pytest.approx(w.tokens / row["step s"])
    assert len(row["_times"]) == 2 and row["peak RSS MiB"] >= row["RSS ready MiB"] > 0
    # Every completion ran to its full length, and the reward was computed on it.
    assert row["_last"]["new_tokens"] == w.rows * w.completion_len and 0 <= row["_last"]["reward"] <= 1
    header = next(line for line in out if line.startswith("| ") and "library" in line)
    assert [c.strip() for c in header.strip("|").split("|")] == peers.COLUMNS
    m = LINE.match(out[-1])
    assert m, out[-1]
    assert float(m.group(1)) == pytest.approx(row["tokens/s"], rel=1e-3)
    assert all(math.isnan(float(g)) for g in m.groups()[1:])
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "logs" / "ours-step.log").is_file()


def test_bench_learning_maps_the_quickstart_defaults_onto_trl():
    """The learning comparison accepts the shipped quickstart and names a setting it cannot map."""
    import dataclasses

    import bench_learning

    default = bench_learning.quickstart().DEFAULT
    bench_learning.check_settings(default)  # the shipped quickstart: accepted
    epochs = dataclasses.replace(default, train=dataclasses.replace(default.train, inner_epochs=2))
    with pytest.raises(SystemExit, match="train.inner_epochs is 2"):
        bench_learning.check_settings(epochs)


@pytest.mark.slow
def test_profile_update_cpu_reports_temp_memory_faults_and_matmuls():
    """The CPU update profile (a subprocess: its trace flag must be set before JAX starts)."""
    import subprocess

    out = subprocess.run([sys.executable, str(BENCH / "profile_update_cpu.py"), "--tiny", "--top", "40"],
                         capture_output=True, text=True, timeout=600, check=True).stdout.splitlines()
    tables, rows = [], []
    for line in out + [""]:
        if line.startswith("|-"):  # a header's separator row
            continue
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            tables.append(rows)
            rows = []
    summary, ops, kinds = ({name: value for name, value in zip(t[0], t[1], strict=True)} if i == 0 else t
                           for i, t in enumerate(tables))
    assert float(summary["step s"]) > 0 and float(summary["temp MiB"]) > 0
    assert float(summary["minor faults"].replace(",", "")) >= 0
    assert ops[0] == ["op", "ms/step", "share", "shape", "from"]
    # The tiny model's matmuls show up as operations with their shapes.
    assert any(("dot" in r[0] or "ynn_fusion" in r[0]) and r[3].startswith("f32[") for r in ops[1:])
    assert 0 < sum(float(r[2]) for r in kinds[1:]) <= 1.0 + 1e-3


def test_profile_table_counts_gpu_stream_kernels_once(tmp_path):
    """The MFU profile sums kernels on the device's streams only, by name and by kind."""
    import gzip
    import json

    import bench_mfu_gpu

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}}]
    kernels = [("nvjet_sm90_tst_128x160", 3000), ("nvjet_sm90_tst_128x160", 1000),
               ("loop_multiply_fusion", 500), ("memcpy128", 250), ("input_reduce_fusion", 250)]
    events = meta + [{"ph": "X", "pid": 1, "tid": 7, "name": n, "ts": 0, "dur": d} for n, d in kernels]
    events += [{"ph": "X", "pid": 1, "tid": 8, "name": "dot.1", "ts": 0, "dur": 4000},  # derived line
               {"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction(step)", "ts": 0, "dur": 9000}]
    (tmp_path / "plugins").mkdir()
    with gzip.open(tmp_path / "plugins" / "x.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    rows, kinds, total, source = bench_mfu_gpu.device_op_table(str(tmp_path))
    assert total == 5.0 and "streams" in source
    assert rows[0] == {"op": "nvjet_sm90_tst_128x160", "kind": "matmul", "ms": 4.0, "%": 80.0, "calls": 2}
    assert {k["kind"]: k["ms"] for k in kinds} == {"matmul": 4.0, "fusion (elementwise)": 0.5,
                                                   "copy/transpose": 0.25, "reduction": 0.25}
