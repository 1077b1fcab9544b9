"""Remote run directories stay remote: gs://bucket/run never becomes the local gs:/bucket/run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from ouroboros_jax import checkpoint, paths
from ouroboros_jax.config import CheckpointConfig
from ouroboros_jax.metrics import JsonlWriter, MetricsLogger, read_metrics


@pytest.fixture()
def bucket(monkeypatch, tmp_path):
    """gs:// and s3:// served from memory (fsspec) for epath, the layer orbax lists and reads with.

    The test runs in an empty working directory, so that any local "gs:" folder shows.
    """
    import fsspec  # noqa: F401  (etils.epath depends on it)
    from etils.epath import backend, gpath
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeBucket(MemoryFileSystem):
        protocol = ("gs", "gcs", "s3")
        root_marker = ""
        store: dict = {}
        pseudo_dirs = [""]

        def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's keyword
            super().__init__(*args, **kwargs)

    registry = sys.modules["fsspec.registry"]._registry
    for name in ("gs", "gcs", "s3"):
        monkeypatch.setitem(registry, name, FakeBucket)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # epath's fsspec backend, not tf
    backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.chdir(tmp_path)
    yield FakeBucket
    backend.fsspec_backend._get_filesystem.cache_clear()
    assert os.listdir(tmp_path) == []  # nothing landed on the local disk


def test_join_keeps_the_double_slash():
    assert paths.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"
    assert paths.join("gs://bucket/run/", "a", "b.json") == "gs://bucket/run/a/b.json"
    assert paths.join("runs/x", "checkpoints") == os.path.join("runs/x", "checkpoints")
    assert paths.is_remote("s3://b/x") and not paths.is_remote("runs/x")
    assert not paths.is_remote(Path("gs://bucket/run"))  # what pathlib made of it
    assert str(paths.as_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"


def test_collapsed_and_unknown_urls_are_refused():
    with pytest.raises(ValueError, match=r"gs:/bucket/run: looks like the URL gs://bucket/run with its '//' "
                                         r"collapsed"):
        paths.check(Path("gs://bucket/run"))
    with pytest.raises(ValueError, match=r"unsupported URL scheme 'ftp'"):
        paths.join("ftp://host/run", "x")
    assert paths.check("runs/gs-like:name") == "runs/gs-like:name"


def test_checkpointer_refuses_a_collapsed_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="looks like the URL gs://bucket/run/checkpoints"):
        checkpoint.Checkpointer(Path("gs://bucket/run") / "checkpoints")
    assert os.listdir(tmp_path) == []  # no local "gs:" directory


def test_checkpoint_directory_reaches_orbax_unchanged(monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, directory, **kwargs):
            seen.append(directory)

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", Recorder)
    run_dir = "gs://bucket/run"
    ckpt = checkpoint.Checkpointer.from_config(CheckpointConfig(), paths.join(run_dir, "checkpoints"))
    assert str(ckpt.directory) == "gs://bucket/run/checkpoints"
    assert [os.fspath(d) for d in seen] == ["gs://bucket/run/checkpoints"]


def test_checkpointer_lists_steps_in_the_bucket(bucket):
    # Orbax lists and reads a remote directory through epath (array data goes through
    # tensorstore's own drivers, which need the real service). gs:// also asks Google's
    # API whether the bucket is hierarchical, so the listing is shown on s3://.
    step = paths.as_path("s3://bucket/run/checkpoints/7")
    step.mkdir(parents=True)
    (step / "commit_success.txt").write_text("done")
    ckpt = checkpoint.Checkpointer("s3://bucket/run/checkpoints", async_save=False)
    assert ckpt.all_steps() == [7] and os.fspath(ckpt.directory) == "s3://bucket/run/checkpoints"
    ckpt.close()


def test_metrics_go_to_the_bucket(bucket):
    run_dir = "gs://bucket/run"
    with MetricsLogger(run_dir, console=False, tensorboard=False) as logger:
        logger.log(1, {"reward": 0.5})
        logger.log(2, {"reward": float("nan")})
        assert logger.run_dir == run_dir
    # A resumed run appends to the same object (object stores cannot append: rewritten whole).
    writer = JsonlWriter(paths.join(run_dir, "metrics.jsonl"), flush_secs=3600)
    writer.write(3, {"reward": 0.75})
    writer.close()
    records = read_metrics(run_dir)
    assert [(r["step"], r["reward"]) for r in records] == [(1, 0.5), (2, None), (3, 0.75)]
    assert list(bucket.store) == ["gs://bucket/run/metrics.jsonl"]  # the one object, in the bucket
