"""PNG curves of a run's metrics.jsonl that a newcomer can read.

Each panel answers one question, with a title, axis labels, integer step ticks
and legend names in words (`metric_label`; docs/metrics.md explains every key):

    reward      what the reward sources gave the training rollouts
    accuracy    how often the training rollouts were right (the verifier's `correct`)
    eval        held-out evaluation: sampled pass@k, majority@k, greedy accuracy
    length      completion lengths, in tokens
    entropy     the policy's token entropy on its own samples
    kl          KL to the sampling policy (how far one update moved) and to the reference
    loss        the loss and its terms
    grad_norm   the gradient's global norm, before clipping
    clip        the fraction of tokens whose probability ratio was clipped
    ratio       the probability ratio new / sampling policy (min, mean, max)
    time        seconds per step and per phase
    warmstart   a supervised warm-start's checks, from RUN_DIR/warmstart/metrics.jsonl

A key goes to the panel one of whose aliases matches one of its "/"-separated parts
(the part equals the alias, starts with alias + "_", ends with "_" + alias, or, for an
alias ending in "@", starts with it); "accuracy" takes no `eval/` key and "eval" only
`eval/` keys. A series whose every value is 0 (a KL term that is off) is not drawn,
and a panel with nothing to draw is left out.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ouroboros_jax import paths

# panel -> (aliases, title, y-axis label)
PANELS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "reward": (("reward",), "Reward of the training rollouts", "reward"),
    "accuracy": (("accuracy", "acc"), "Training-rollout accuracy", "fraction correct"),
    "eval": (("accuracy", "acc", "pass@", "maj@"), "Held-out evaluation", "fraction correct"),
    "length": (("length",), "Completion length", "tokens"),
    "entropy": (("entropy",), "Policy entropy", "nats per token"),
    "kl": (("kl",), "KL divergence", "nats per token"),
    "loss": (("loss",), "Loss", "loss"),
    "grad_norm": (("grad_norm",), "Gradient norm (before clipping)", "global L2 norm"),
    "clip": (("clip_frac",), "Clipped tokens", "fraction of tokens"),
    "ratio": (("ratio",), "Probability ratio new / sampling policy", "ratio"),
    "time": (("time",), "Time", "seconds"),
    "warmstart": (("warmstart",), "Supervised warm-start (before RL)", "fraction correct"),
}
# A warm-start logs its checks here, beside the run's own metrics.jsonl (its steps are its own).
WARMSTART_DIR = "warmstart"
_SCOPE = {"accuracy": "train", "eval": "eval"}  # panels that take only (or no) eval/ keys

_LABELS = {
    "reward/mean": "mean reward", "reward/std": "reward std (over the batch)",
    "reward/non_finite": "non-finite rewards (scored 0)",
    "accuracy": "rollout accuracy", "train/accuracy": "rollout accuracy",
    "eval/greedy_acc": "greedy accuracy", "eval/accuracy": "accuracy",
    "length/mean": "mean length", "length/max": "longest", "eval/length": "held-out mean length",
    "train/entropy": "entropy", "train/entropy_loss": "entropy bonus term",
    "train/kl_ref": "KL to the reference", "train/kl_loss": "KL penalty term",
    "train/kl_old_k1": "KL to the sampling policy (k1)", "train/kl_old_k3": "KL to the sampling policy (k3)",
    "train/loss": "total loss", "train/pg_loss": "policy-gradient term",
    "train/grad_norm": "gradient norm",
    "train/clip_frac": "clipped (either side)", "train/clip_frac_low": "clipped below 1 - clip_low",
    "train/clip_frac_high": "clipped above 1 + clip_high", "train/clip_frac_dual": "dual-clipped",
    "train/ratio_mean": "mean ratio", "train/ratio_min": "smallest ratio", "train/ratio_max": "largest ratio",
    "time/step": "whole step", "time/sample": "sampling", "time/verify": "verifiers",
    "time/update": "update", "time/reward_model": "reward model",
    "warmstart/greedy_acc": "greedy accuracy (training problems)",
    "warmstart/pass@1": "sampled pass@1 (training problems)",
}


def metric_label(key: str) -> str:
    """The legend name of a metric key ("eval/pass@8" -> "pass@8 (sampled)"); the key if unknown."""
    if key in _LABELS:
        return _LABELS[key]
    if match := re.fullmatch(r"eval/pass@(\d+)", key):
        return f"pass@{match.group(1)} (sampled)"
    if match := re.fullmatch(r"eval/maj@(\d+)", key):
        return f"majority vote of {match.group(1)}"
    return key


def panel_keys(keys: Sequence[str], panel: str) -> list[str]:
    """The keys drawn in `panel` (the matching rule is in the module docstring), sorted.

    Args:
        keys: metric names.
        panel: a key of PANELS.

    Returns:
        e.g. for "eval": ["eval/greedy_acc", "eval/pass@1"].
    """
    def matches(part: str, alias: str) -> bool:
        if alias.endswith("@"):
            return part.startswith(alias)
        return part == alias or part.startswith(alias + "_") or part.endswith("_" + alias)

    aliases, scope = PANELS[panel][0], _SCOPE.get(panel)
    chosen = [k for k in keys if any(matches(p, a) for p in k.split("/") for a in aliases)]
    if scope == "train":
        chosen = [k for k in chosen if not k.startswith("eval/")]
    elif scope == "eval":
        chosen = [k for k in chosen if k.startswith("eval/") and k != "eval/length"]
    return sorted(chosen)


def series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`'s finite values."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def _drawn(records: Sequence[Mapping[str, Any]], key: str) -> bool:
    """Whether `key` has a finite value that is not 0 (all-zero series are switched-off terms)."""
    return any(v != 0 for v in series(records, key)[1])


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def draw_panel(ax: Any, records: Sequence[Mapping[str, Any]], panel: str, keys: list[str]) -> None:
    """Draw `keys` on the matplotlib axes `ax` as panel `panel` (title, labels, integer steps)."""
    from matplotlib.ticker import MaxNLocator

    for key in keys:
        steps, values = series(records, key)
        window = max(1, len(values) // 20)
        if window > 1:  # noisy RL curves: the raw line faint, a moving average on top
            line, = ax.plot(steps, values, alpha=0.3, linewidth=1)
            ax.plot(steps, _smooth(values, window), color=line.get_color(),
                    label=f"{metric_label(key)} (mean of {window})")
        else:
            ax.plot(steps, values, marker="." if len(values) < 50 else None, label=metric_label(key))
    _, title, ylabel = PANELS[panel]
    ax.set_title(title)
    ax.set_xlabel("warm-start step" if panel == "warmstart" else "training step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> list[Any]:
    """PNG curves of a run's metrics.jsonl: one file per panel with data, and curves.png.

    Args:
        run_dir: the run directory (or its metrics.jsonl), local or a URL (gs://...).
        out_dir: where the PNGs go; default: next to metrics.jsonl.

    Returns:
        The written files (`pathlib.Path`, or `epath.Path` for a URL), panels first, then
        curves.png (the overview of all panels).
    """
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend state

    from ouroboros_jax.metrics import METRICS_FILE, read_metrics

    remote = paths.is_remote(out_dir if out_dir is not None else run_dir)
    as_path = paths.as_path if remote else (lambda p: Path(paths.check(p)))
    source = paths.as_path(run_dir)
    source = source / METRICS_FILE if source.is_dir() else source
    out = as_path(out_dir) if out_dir is not None else as_path(os.fspath(source.parent))
    out.mkdir(parents=True, exist_ok=True)
    records = read_metrics(os.fspath(source))
    keys = sorted({k for r in records for k in r} - {"step", "wall_time"})
    panels = {p: (records, [k for k in panel_keys(keys, p) if _drawn(records, k)])
              for p in PANELS if p != "warmstart"}
    warm = source.parent / WARMSTART_DIR / METRICS_FILE
    if warm.exists():
        warm_records = read_metrics(os.fspath(warm))
        warm_keys = sorted({k for r in warm_records for k in r} - {"step", "wall_time"})
        panels = {"warmstart": (warm_records, [k for k in panel_keys(warm_keys, "warmstart")
                                               if _drawn(warm_records, k)])} | panels
    panels = {p: (recs, ks) for p, (recs, ks) in panels.items() if ks}

    def save(fig: Any, name: str) -> None:
        with (out / name).open("wb") as f:
            fig.savefig(f, format="png")
        written.append(out / name)

    written: list[Any] = []
    for panel, (recs, panel_ks) in panels.items():
        fig = Figure(figsize=(6.4, 4.0), dpi=100)
        FigureCanvasAgg(fig)
        fig.subplots_adjust(left=0.13, right=0.97, top=0.92, bottom=0.13)
        draw_panel(fig.add_subplot(), recs, panel, panel_ks)
        save(fig, f"{panel}.png")
    if panels:
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig = Figure(figsize=(4.8 * cols, 3.4 * rows), dpi=100)
        FigureCanvasAgg(fig)
        # Fixed margins: a tight layout would draw every figure twice.
        fig.subplots_adjust(left=0.06, right=0.98, top=0.94, bottom=0.1, hspace=0.5, wspace=0.25)
        for i, (panel, (recs, panel_ks)) in enumerate(panels.items()):
            draw_panel(fig.add_subplot(rows, cols, i + 1), recs, panel, panel_ks)
        save(fig, "curves.png")
    return written
