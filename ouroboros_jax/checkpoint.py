"""Orbax checkpoints of the training state: save, restore, resume after preemption.

The state is any pytree of arrays (step, params, optax state, typed PRNG key,
reference params or None). Beside it every checkpoint carries a small JSON
metadata dict: whatever the trainer needs to resume (data position, config as
`config.to_dict`, last metrics). On disk, under `directory`:

    <step>/state/                   the pytree (orbax StandardSave: tensorstore, sharded)
    <step>/meta/metadata            the metadata dict, as JSON
    <step>/integrity/metadata       a fingerprint per array leaf (see `integrity`), as JSON
    <step>/metrics/metrics          the ranking metric (when best_metric is set; {} if unranked)
    <step>/commit_success.txt       written last, inside the temporary directory
    <step>.orbax-checkpoint-tmp*    a save in flight, or one a crash cut short
    <step>.unreadable               a committed step that failed to restore, moved aside

What is kept: after each successful save, the `keep` most recent steps and,
when `best_metric` is set, the one step with the best value of that metric
among the steps saved with a finite value of it (ties go to the most recent).
Everything else is deleted, and only once the newer checkpoint has committed.

Crash safety: orbax writes a step into `<step>.orbax-checkpoint-tmp*` and
renames it to `<step>` only after every file is written, so a process killed
mid-save leaves at most a temporary directory: restore never reads it and the
next `Checkpointer` on the directory removes it. A save that fails (a full disk)
raises `CheckpointError` naming the step and the cause, removes its temporary
directory and leaves every older checkpoint in place.

Only finite, verified state: `save` refuses a state with a NaN or inf in any floating
leaf (NonFiniteError naming the leaf; nothing is written and the newest checkpoint
stays the last good one). `restore` recomputes every array's fingerprint and checks
finiteness; a step whose bytes changed on disk after its save, or that holds NaN/inf
(e.g. one written before fingerprints existed), is rejected with a CheckpointError
naming the leaf, and `restore_latest` falls back to the previous step, logging which
step it rejected and why.

Paths: `directory` may be a URL (gs://bucket/run/checkpoints); pass it as a string
(`paths.join(run_dir, "checkpoints")`), since `pathlib.Path` turns "gs://" into the
local "gs:/". A directory that looks like such a collapsed URL is refused.

Resume contract: `restore_latest(abstract_state(state))` returns the newest
step that restores, with its state placed in the requested shardings and
bit-equal to what was saved (typed PRNG keys included), and the metadata dict
as saved; None when the directory holds no checkpoint. A resumed run that
reaches a step the earlier run had saved replaces that step.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from ouroboros_jax import integrity, paths
from ouroboros_jax.config import CheckpointConfig
from ouroboros_jax.errors import CheckpointError, NonFiniteError
from ouroboros_jax.integrity import assert_finite, find_nonfinite

__all__ = ["CheckpointError", "Checkpointer", "NonFiniteError", "Restored", "abstract_state",
           "assert_finite", "find_nonfinite"]

log = logging.getLogger(__name__)

_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_UNREADABLE_SUFFIX = ".unreadable"
_barrier_ids = itertools.count()


class Restored(NamedTuple):
    """One restored checkpoint: its step, the state pytree and the metadata dict.

    `rejected` holds one line per newer step that `restore_latest` tried and set aside
    (which step, and why), for the caller to show; empty when the newest step restored.
    """

    step: int
    state: Any
    metadata: dict[str, Any]
    rejected: tuple[str, ...] = ()


class Checkpointer:
    """Saves and restores (state pytree, JSON metadata) pairs under one directory.

    Args:
        directory: where the step directories live (local path or a gs:// URL).
        keep: how many of the most recent steps to keep (>= 1).
        best_metric: name of a metric passed to `save(metrics=...)`; the step with its
            best value is kept beside the `keep` most recent. Empty: no best tracking.
        best_mode: "max" or "min": which end of `best_metric` is best.
        async_save: write in a background thread; `save` returns once the arrays are
            copied off the device, `wait` blocks until the write has committed.
    """

    def __init__(self, directory: str | epath.PathLike, *, keep: int = 3, best_metric: str = "",
                 best_mode: str = "max", async_save: bool = True) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (got {keep})")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min' (got {best_mode!r})")
        path = paths.as_path(directory)
        # Orbax wants absolute paths; URLs (gs://...) already are.
        self.directory = path if paths.is_remote(directory) else path.absolute()
        self.keep, self.best_metric, self.best_mode = keep, best_metric, best_mode
        self.async_save = async_save
        self._pending: int | None = None  # step of the save in flight
        self._saved_here: set[int] = set()
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta", "integrity"),
            options=_manager_options(keep, best_metric, best_mode, async_save))

    @classmethod
    def from_config(cls, cfg: CheckpointConfig, default_directory: str = "") -> Checkpointer | None:
        """A Checkpointer for `cfg`, or None when it names no directory.

        Args:
            cfg: the experiment's checkpoint section. `best_metric` may carry a "min:" or
                "max:" prefix ("min:eval/loss"); without one, larger is better.
            default_directory: used when `cfg.directory` is empty (e.g. RUN_DIR/checkpoints).

        Returns:
            The Checkpointer, or None if neither directory is set.
        """
        directory = cfg.directory or default_directory
        if not directory:
            return None
        mode, metric = "max", cfg.best_metric
        if metric.startswith(("min:", "max:")):
            mode, metric = metric[:3], metric[4:]
        return cls(directory, keep=cfg.keep, best_metric=metric, best_mode=mode,
                   async_save=cfg.async_save)

    # -- saving ---------------------------------------------------------------

    def save(self, step: int, state: Any, metadata: Mapping[str, Any] | None = None,
             metrics: Mapping[str, Any] | None = None) -> bool:
        """Start saving `state` and `metadata` as checkpoint `step`.

        With async_save the call returns once the arrays are on the host (so the caller
        may donate or overwrite them); the files are written in the background. A save
        still in flight is finished first, and its failure is raised here.

        Args:
            step: the training step; checkpoint directories are named by it.
            state: any pytree of arrays (None subtrees allowed).
            metadata: JSON-able dict (numpy scalars are converted) restored with the state.
            metrics: scalars for ranking; only `best_metric` is used, and only when finite.

        Returns:
            True if a save was started; False if this Checkpointer already saved `step`.

        Raises:
            NonFiniteError: a floating leaf of `state` holds NaN or inf (named); nothing
                is written, and the newest checkpoint stays the last good one.
            CheckpointError: this or the previous save failed (older checkpoints are intact).
            TypeError: metadata is not JSON-serialisable.
        """
        self.wait()
        step = int(step)
        checks = integrity.scan(state)
        bad = next((c.where for c in checks.values() if not c.finite), None)
        if bad is not None:
            latest = self._manager.latest_step()
            raise NonFiniteError(
                f"step {step}: non-finite value (NaN or inf) in state{bad}; not saved, so the "
                f"newest checkpoint in {self.directory} stays "
                f"{'step ' + str(latest) if latest is not None else 'none'} (the last good one)")
        if step in self._manager.all_steps():
            if step in self._saved_here:
                return False
            # Left by an earlier run that this one resumed before: this run's state wins.
            log.warning("checkpoint step %d in %s is from an earlier run; replacing it",
                        step, self.directory)
            self._manager.delete(step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(_plain_json(metadata or {})),
                                  integrity=ocp.args.JsonSave(integrity.to_json(checks)))
        try:
            self._manager.save(step, args=args, metrics=self._ranking(metrics), force=True)
        except Exception as err:  # orbax surfaces I/O errors of any type
            self._fail(step, err)
        self._saved_here.add(step)
        self._pending = step if self.async_save else None
        return True

    def wait(self) -> None:
        """Block until the save in flight (if any) has committed.

        Raises:
            CheckpointError: the background save failed; older checkpoints are intact.
        """
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            self._fail(step, err)

    def _ranking(self, metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
        if not self.best_metric:
            return None
        # An unranked step gets {} (ranked worst), not None: orbax warns on every save without metrics.
        if not metrics or self.best_metric not in metrics:
            return {}
        value = float(np.asarray(jax.device_get(metrics[self.best_metric])))
        # A NaN eval must not win (or block) the best slot: the step is just not ranked.
        return {self.best_metric: value} if math.isfinite(value) else {}

    def _fail(self, step: int | None, err: BaseException) -> None:
        # Orbax drops steps from its in-memory list on a failed save; the disk is the truth.
        self._manager.reload()
        if step is not None:
            self._saved_here.discard(step)
            if jax.process_index() == 0:
                for tmp in self.directory.glob(f"{step}{_TMP_SUFFIX}*"):
                    tmp.rmtree(missing_ok=True)  # frees the space a full disk needs back
        previous = self._manager.latest_step()
        hint = " (disk full: free space or lower checkpoint.keep)" if _is_enospc(err) else ""
        kept = f"step {previous}" if previous is not None else "none"
        raise CheckpointError(
            f"saving checkpoint step {step} to {self.directory} failed: {err!r}{hint}; "
            f"older checkpoints are intact (latest: {kept})") from err

    # -- restoring ------------------------------------------------------------

    def restore(self, step: int, abstract_state: Any = None) -> Restored:
        """Restore checkpoint `step`.

        Args:
            step: a step in `all_steps()`.
            abstract_state: a pytree of `jax.ShapeDtypeStruct` with shardings (see
                `abstract_state`) giving the structure (NamedTuples included), dtypes and
                target placement. None restores the saved structure as plain containers.

        Returns:
            Restored(step, state, metadata).

        Raises:
            CheckpointError: no such step; it does not restore into `abstract_state`; its
                data differs from what was saved (fingerprints), or it holds NaN or inf.
                The message names the step and the leaf.
        """
        self.wait()
        step = int(step)
        if step not in self._manager.all_steps():
            raise CheckpointError(f"no checkpoint step {step} in {self.directory} "
                                  f"(available: {list(self._manager.all_steps())})")
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        # Steps saved before fingerprints existed have no record: checked for finiteness only.
        recorded = (self.directory / str(step) / "integrity").exists()
        if recorded:
            items["integrity"] = ocp.args.JsonRestore()
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
            saved = integrity.from_json(out.integrity) if recorded else {}
        except Exception as err:
            raise CheckpointError(f"cannot restore checkpoint step {step} from {self.directory}: "
                                  f"{err!r}") from err
        self._verify(step, out.state, saved)
        return Restored(int(step), out.state, dict(out.meta or {}))

    def _verify(self, step: int, state: Any, saved: dict[str, integrity.LeafCheck]) -> None:
        checks = integrity.scan(state)
        changed = integrity.compare(saved, checks)
        if changed:
            more = f" (and {len(changed) - 1} more arrays)" if len(changed) > 1 else ""
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: "
                                  f"{changed[0]}{more}")
        bad = next((c.where for c in checks.values() if not c.finite), None)
        if bad is not None:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} holds non-finite "
                                  f"values (NaN or inf) in state{bad}")

    def restore_latest(self, abstract_state: Any = None) -> Restored | None:
        """Restore the newest checkpoint that restores; None if there is none.

        A committed step that fails to restore (files damaged after the commit, data that
        differs from its fingerprints, NaN or inf) is rejected: logged as a warning naming
        the step and the reason, moved aside to `<step>.unreadable`, and the next older
        step is tried, so that later saves of this run are not ranked behind it.

        Args:
            abstract_state: as for `restore`.

        Returns:
            Restored(step, state, metadata, rejected), or None for an empty directory;
            `rejected` says which newer steps were set aside and why.

        Raises:
            CheckpointError: every step failed (the newest step's error is raised).
        """
        self.wait()
        failed: list[tuple[int, CheckpointError]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self.restore(step, abstract_state)
            except CheckpointError as err:
                log.warning("rejected checkpoint step %d: %s; trying the previous checkpoint", step, err)
                failed.append((step, err))
                continue
            self._set_aside([s for s, _ in failed])
            if failed:
                log.warning("restored checkpoint step %d of %s after rejecting step(s) %s",
                            step, self.directory, ", ".join(str(s) for s, _ in failed))
            return restored._replace(rejected=tuple(f"step {s}: {err}" for s, err in failed))
        if failed:
            raise failed[0][1]
        return None

    def _set_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        # Every host has finished reading before the primary renames.
        ocp.multihost.sync_global_processes(f"ouroboros_set_aside_{next(_barrier_ids)}")
        if jax.process_index() == 0:
            for step in steps:
                target = self.directory / f"{step}{_UNREADABLE_SUFFIX}"
                n = 1
                while target.exists():
                    target, n = self.directory / f"{step}{_UNREADABLE_SUFFIX}{n}", n + 1
                (self.directory / str(step)).rename(target)
                log.warning("moved unreadable checkpoint step %d to %s", step, target)
        ocp.multihost.sync_global_processes(f"ouroboros_set_aside_{next(_barrier_ids)}")
        self._manager.reload()

    # -- queries and lifetime -------------------------------------------------

    def all_steps(self) -> list[int]:
        """Committed steps on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best `best_metric`, or None (no tracking, or no ranked step)."""
        step = self._manager.best_step() if self.best_metric else None
        if step is None:
            return None
        ranked = self._manager.metrics(step) or {}
        return step if self.best_metric in ranked else None

    def close(self) -> None:
        """Finish the save in flight, then release orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _manager_options(keep: int, best_metric: str, best_mode: str,
                     async_save: bool) -> ocp.CheckpointManagerOptions:
    policies: list[ocm.PreservationPolicy] = [ocm.LatestN(n=keep)]
    best_fn = None
    if best_metric:
        worst = -math.inf if best_mode == "max" else math.inf
        # Unranked steps sort as the worst; ties keep step order, so they never take the best slot
        # from a ranked step, and among themselves the newest (already kept by LatestN) wins.
        best_fn = lambda metrics: float((metrics or {}).get(best_metric, worst))
        # BestN sorts ascending and keeps the tail: reverse for "min".
        policies.append(ocm.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                  keep_checkpoints_without_metrics=False))
    return ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        # best_fn makes orbax store and reload the metrics; retention is the policy below.
        best_fn=best_fn, best_mode=best_mode,
        preservation_policy=ocm.AnyPreservationPolicy(policies),
    )


def _plain_json(metadata: Mapping[str, Any]) -> dict[str, Any]:
    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic | np.ndarray | jax.Array) and np.ndim(obj) == 0:
            return np.asarray(obj).item()
        raise TypeError(f"checkpoint metadata must be JSON-serialisable; got {type(obj).__name__}")

    return json.loads(json.dumps(dict(metadata), default=default))


def _is_enospc(err: BaseException | None) -> bool:
    seen = 0
    while err is not None and seen < 20:  # walk the cause chain: orbax wraps I/O errors
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


# ---------------------------------------------------------------------------
# Helpers for the trainer


def abstract_state(state: Any) -> Any:
    """The restore target for `state`: shape, dtype and sharding of each array leaf.

    Args:
        state: a pytree of arrays as the trainer builds it (or `jax.eval_shape`'s output
            with shardings attached).

    Returns:
        The same pytree with every array replaced by a `jax.ShapeDtypeStruct` carrying
        its sharding; other leaves are kept.
    """
    def one(x: Any) -> Any:
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, np.ndarray | np.generic):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return x

    return jax.tree.map(one, state)
