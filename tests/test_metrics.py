"""Metric writers, the console line, phase timers, and plots of a run directory."""

from __future__ import annotations

import io
import json
import math
import runpy
import struct
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouroboros_jax import metrics as M
from ouroboros_jax.config import LoggingConfig


def _read_events(run_dir: Path) -> dict[tuple[str, int], float]:
    """Scalars of every TensorBoard event file under run_dir, read back record by record."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in run_dir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            # TFRecord framing: u64 length, u32 crc of the length, payload, u32 crc of the payload.
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out[(value.tag, event.step)] = value.simple_value
    return out


def test_jsonl_round_trip(tmp_path):
    with M.MetricsLogger(tmp_path, console=False, tensorboard=False) as logger:
        logger.log(1, {"reward": jnp.float32(0.5), "length": np.float64(12.25), "loss": 2})
        logger.log(2, {"reward": jnp.array([0.75]), "kl": jnp.float32(jnp.nan)})
        logger.log(2, {"eval/accuracy": 0.25})  # an eval record for the same step merges in
    lines = (tmp_path / M.METRICS_FILE).read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["step"] in (1, 2) for line in lines)
    with open(tmp_path / M.METRICS_FILE, "a") as f:
        f.write('{"step": 3, "rew')  # the last line of a killed run
    records = M.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert {k: v for k, v in records[0].items() if k != "wall_time"} == \
        {"step": 1, "reward": 0.5, "length": 12.25, "loss": 2.0}
    assert records[1]["reward"] == 0.75 and records[1]["kl"] is None
    assert records[1]["eval/accuracy"] == 0.25


def test_one_host_transfer_per_step(tmp_path, monkeypatch):
    calls = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: calls.append(1) or real(x))
    logger = M.MetricsLogger(tmp_path, console=False, tensorboard=False)
    step_metrics = {name: jnp.float32(i) for i, name in enumerate(["reward", "kl", "entropy", "length"])}
    assert logger.log(1, step_metrics) == {"reward": 0.0, "kl": 1.0, "entropy": 2.0, "length": 3.0}
    assert len(calls) == 1
    with pytest.raises(ValueError, match="'logits' must be a scalar"):
        logger.log(2, {"logits": jnp.ones(3)})
    logger.close()


def test_tensorboard_events_readable(tmp_path):
    with M.MetricsLogger(tmp_path, console=False, jsonl=False) as logger:
        for step in range(1, 4):
            logger.log(step, {"reward": 0.25 * step, "time/update": jnp.float32(0.5)})
    events = _read_events(tmp_path)
    assert events[("reward", 3)] == pytest.approx(0.75)
    assert events[("time/update", 1)] == pytest.approx(0.5)
    assert len(events) == 6


def test_console_line_content():
    scalars = {"reward": 0.41234, "accuracy": 0.375, "kl": 0.0012345, "entropy": 1.5, "length": 34.46,
               "tokens_per_s": 12345.6, "time/step": 2.5, "other": 9.0}
    line = M.format_progress(12, scalars, total_steps=100)
    assert line == ("step 12/100  reward 0.412  acc 0.375  kl 0.00123  ent 1.500  len 34.5  "
                    "tok/s 12,346  s/step 2.50")
    assert M.format_progress(3, {"kl": math.nan}) == "step 3  kl nan"
    trainer_keys = {"reward/mean": 0.5, "accuracy": 0.25, "train/kl_ref": 0.01, "train/entropy": 2.0,
                    "length/mean": 10.0, "throughput/tokens_per_s": 99.5, "eval/pass@1": 0.125}
    assert M.format_progress(4, trainer_keys) == ("step 4  reward 0.500  acc 0.250  kl 0.01  ent 2.000  "
                                                  "len 10.0  tok/s 100  eval acc 0.125")

    plain = io.StringIO()
    writer = M.ConsoleWriter(plain)
    assert not writer.live  # StringIO is no terminal: plain lines
    writer.write(1, {"reward": 0.5})
    writer.write(2, {"reward": 0.25})
    assert plain.getvalue() == "step 1  reward 0.500\nstep 2  reward 0.250\n"

    live = io.StringIO()
    writer = M.ConsoleWriter(live, total_steps=9, live=True)
    writer.write(1, {"reward": 0.5})
    writer.write(2, {"eval/accuracy": 0.75})  # eval results stay on screen
    writer.write(3, {"reward": 0.25})
    writer.close()
    assert live.getvalue() == ("\rstep 1/9  reward 0.500\x1b[K" "\rstep 2/9  eval acc 0.750\x1b[K\n"
                               "\rstep 3/9  reward 0.250\x1b[K\n")


def test_logger_from_config(tmp_path):
    stream = io.StringIO()
    cfg = LoggingConfig(run_dir=str(tmp_path / "run"), tensorboard=False)
    with M.MetricsLogger.from_config(cfg, total_steps=10, stream=stream) as logger:
        assert [type(w) for w in logger.writers] == [M.ConsoleWriter, M.JsonlWriter]
        for step in (5, 10):
            logger.log(step, {"reward": 1.0})
    assert stream.getvalue().splitlines() == ["step 5/10  reward 1.000", "step 10/10  reward 1.000"]
    assert [r["step"] for r in M.read_metrics(tmp_path / "run")] == [5, 10]


def test_phase_timer():
    now = [0.0]
    timer = M.PhaseTimer(clock=lambda: now[0])
    for phase, seconds in [("sample", 1.0), ("verify", 0.5), ("sample", 2.0), ("update", 0.25)]:
        with timer.phase(phase):
            now[0] += seconds
    now[0] += 0.25  # time outside any phase counts only toward the step
    assert timer.lap() == {"time/sample": 3.0, "time/verify": 0.5, "time/update": 0.25, "time/step": 4.0}
    with timer.phase("update"):
        now[0] += 1.0
    assert timer.lap() == {"time/update": 1.0, "time/step": 1.0}
    with timer.phase("sample"):
        now[0] += 2.0
    timer.reset()  # forgets the phases so far and restarts the step's clock
    now[0] += 0.5
    assert timer.lap() == {"time/step": 0.5}


def _fake_run(run_dir: Path, steps: int = 40) -> None:
    rng = np.random.default_rng(0)
    with M.MetricsLogger(run_dir, console=False, tensorboard=False) as logger:
        for step in range(1, steps + 1):
            logger.log(step, {"reward/mean": step / steps + 0.1 * rng.standard_normal(),
                              "accuracy": step / steps, "length/mean": 30 - step / 4,
                              "train/entropy": 2 - step / steps, "train/kl_ref": 1e-3 * step,
                              "train/loss": math.nan, "time/sample": 0.5, "time/update": 0.25})
            if step % 10 == 0:
                logger.log(step, {"eval/pass@1": step / steps, "eval/greedy_acc": step / steps / 2})


def test_plot_run_writes_pngs(tmp_path):
    import matplotlib.image

    _fake_run(tmp_path)
    written = M.plot_run(tmp_path)
    names = [p.name for p in written]
    # loss has no finite value: no panel for it; rollout accuracy and held-out evaluation apart
    assert names == ["reward.png", "accuracy.png", "eval.png", "length.png", "entropy.png", "kl.png",
                     "time.png", "curves.png"]
    for path in written:
        assert path.parent == tmp_path and path.stat().st_size > 5_000
    assert matplotlib.image.imread(tmp_path / "reward.png").shape[:2] == (400, 640)
    assert matplotlib.image.imread(tmp_path / "curves.png").shape[:2] == (1020, 1440)
    keys = ["accuracy", "eval/greedy_acc", "eval/pass@8", "eval/maj@8", "reward/mean", "train/kl_ref",
            "train/kl_loss", "train/pg_loss", "train/clip_frac", "length/max", "eval/length",
            "train/grad_norm",
            "train/ratio_max", "train/kl_old_k3"]
    assert M.panel_keys(keys, "accuracy") == ["accuracy"]
    assert M.panel_keys(keys, "eval") == ["eval/greedy_acc", "eval/maj@8", "eval/pass@8"]
    assert M.panel_keys(keys, "kl") == ["train/kl_loss", "train/kl_old_k3", "train/kl_ref"]
    assert M.panel_keys(keys, "loss") == ["train/kl_loss", "train/pg_loss"]
    assert M.panel_keys(keys, "length") == ["eval/length", "length/max"]
    assert M.panel_keys(keys, "reward") == ["reward/mean"]
    assert M.panel_keys(keys, "grad_norm") == ["train/grad_norm"]
    assert M.panel_keys(keys, "clip") == ["train/clip_frac"]
    assert M.panel_keys(keys, "ratio") == ["train/ratio_max"]


def test_plots_have_labels_words_integer_steps_and_no_flat_zero_lines(tmp_path):
    from matplotlib.figure import Figure

    from ouroboros_jax import plots

    records = [{"step": s, "train/kl_ref": 0.0, "train/kl_old_k3": 1e-3 * s, "eval/pass@8": s / 10,
                "accuracy": s / 10} for s in range(1, 4)]
    keys = [k for k in plots.panel_keys(list(records[0]), "kl") if plots._drawn(records, k)]
    assert keys == ["train/kl_old_k3"]  # the switched-off KL to the reference is not drawn as a flat 0
    ax = Figure().add_subplot()
    plots.draw_panel(ax, records, "kl", keys)
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "nats per token"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["KL to the sampling policy (k3)"]
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert plots.metric_label("eval/pass@8") == "pass@8 (sampled)"
    assert plots.metric_label("train/kl_ref") == "KL to the reference"
    assert plots.metric_label("eval/maj@4") == "majority vote of 4"


def test_plot_command(tmp_path, monkeypatch, capsys):
    _fake_run(tmp_path / "run", steps=5)
    argv = ["ouroboros_jax.metrics", "plot", str(tmp_path / "run"), "--out", str(tmp_path / "png")]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delitem(sys.modules, "ouroboros_jax.metrics")  # run as a fresh __main__
    # The `python -m ouroboros_jax.metrics` entry point, run in this interpreter.
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("ouroboros_jax.metrics", run_name="__main__")
    assert exit_info.value.code == 0
    assert (tmp_path / "png" / "curves.png").stat().st_size > 0
    assert str(tmp_path / "png" / "reward.png") in capsys.readouterr().out.splitlines()
    assert M.main(["plot", str(tmp_path / "missing")]) == 1


def test_the_warm_start_gets_its_own_panel(tmp_path):
    _fake_run(tmp_path, steps=5)
    with M.MetricsLogger(tmp_path / "warmstart", console=False, tensorboard=False) as logger:
        for step in (50, 100, 150):
            logger.log(step, {"warmstart/greedy_acc": step / 200, "warmstart/pass@1": step / 300})
    names = [p.name for p in M.plot_run(tmp_path)]
    assert names[0] == "warmstart.png" and names[-1] == "curves.png"
    assert "warmstart/greedy_acc" not in M.read_metrics(tmp_path)[0]  # the RL metrics stay apart
