"""Fingerprints and finiteness of state pytrees: what makes a saved training state trustworthy.

`scan` makes one device pass over a tree's arrays and returns, per leaf, whether it
is finite and a 64-bit fingerprint of its bytes. The checkpoint layer records the
fingerprints when it saves and compares them when it restores, so that bytes changed
on disk after the save (a flipped bit, a same-size overwrite) are caught even when
they decode to finite numbers; orbax's own files carry a checksum for their indexes
only, not for array data.

The fingerprint is a sum over elements of a mix of (element bits, flat position),
in uint32 arithmetic on two independent lanes. Sums commute, so the value depends
only on the logical array, not on its sharding: a state saved on one mesh verifies
when restored onto another. A changed element changes the sum unless its new term
collides on both lanes (odds about 2**-64). It is a corruption check, not a
cryptographic hash.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Shaped, UInt32

from ouroboros_jax.errors import NonFiniteError

__all__ = ["LeafCheck", "NonFiniteError", "assert_finite", "compare", "find_nonfinite", "from_json",
           "scan", "to_json"]

FORMAT = 1


class LeafCheck(NamedTuple):
    """One leaf of a scanned tree.

    Attributes:
        where: the leaf's path as `jax.tree_util.keystr` writes it ("['params']['w']").
        shape, dtype: the array's.
        finite: False when a floating leaf holds NaN or inf (always True otherwise).
        fingerprint: 16 hex digits for a `jax.Array` leaf, or a numpy one of a dtype JAX
            holds as is (float32, not float64 without x64); "" for other host values.
    """

    where: str
    shape: tuple[int, ...]
    dtype: str
    finite: bool
    fingerprint: str


def scan(tree: Any, *, fingerprints: bool = True) -> dict[str, LeafCheck]:
    """Finiteness and fingerprint of every array leaf of `tree`, in one device pass.

    Args:
        tree: any pytree of arrays (jax, numpy) or Python numbers; typed PRNG keys
            are fingerprinted through their key data.
        fingerprints: False checks finiteness only (every fingerprint is ""): the
            integer mixing costs more than the check on CPUs.

    Returns:
        leaf key ("params/layers/w": the path's names joined by "/", the same for a
        NamedTuple field and a dict key of that name) -> LeafCheck, in tree order.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    on_device = [(i, x if isinstance(x, jax.Array) else jnp.asarray(x))
                 for i, (_, x) in enumerate(leaves) if _fingerprintable(x)]
    device_out = _scan_device([x for _, x in on_device], fingerprints)
    by_index = dict(zip((i for i, _ in on_device), device_out, strict=True))
    out = {}
    for i, (path, x) in enumerate(leaves):
        if i in by_index:
            finite, fingerprint = by_index[i]
        else:
            finite, fingerprint = (not _is_floating(x) or bool(np.all(np.isfinite(x)))), ""
        dtype = getattr(x, "dtype", None)
        out[leaf_key(path)] = LeafCheck(jax.tree_util.keystr(path), tuple(np.shape(x)),
                                        str(dtype) if dtype is not None else type(x).__name__,
                                        finite, fingerprint)
    return out


def compare(saved: Mapping[str, LeafCheck], restored: Mapping[str, LeafCheck]) -> list[str]:
    """What differs between fingerprints recorded at save and those of the restored tree.

    Leaves restored into another dtype or shape than they were saved with (a
    deliberate conversion) and leaves without a fingerprint on either side are not
    compared.

    Returns:
        One line per leaf whose bytes differ, e.g. "params/w: its data differs from what
        was saved (fingerprint 0123... at save, 4567... now)"; empty when all match.
    """
    problems = []
    for key, now in restored.items():
        then = saved.get(key)
        if (then is None or not then.fingerprint or not now.fingerprint
                or (then.shape, then.dtype) != (now.shape, now.dtype)):
            continue
        if then.fingerprint != now.fingerprint:
            problems.append(f"{key}: its data differs from what was saved (fingerprint "
                            f"{then.fingerprint} at save, {now.fingerprint} now)")
    return problems


def to_json(checks: Mapping[str, LeafCheck]) -> dict[str, Any]:
    """The record stored beside a checkpoint: format, and shape/dtype/fingerprint per leaf."""
    return {"format": FORMAT,
            "arrays": {k: {"shape": list(c.shape), "dtype": c.dtype, "fingerprint": c.fingerprint}
                       for k, c in checks.items() if c.fingerprint}}


def from_json(record: Mapping[str, Any]) -> dict[str, LeafCheck]:
    """The checks `to_json` stored (`where` is the key; every stored leaf was finite)."""
    if record.get("format") != FORMAT:
        raise ValueError(f"unknown integrity record format {record.get('format')!r} (expected {FORMAT})")
    return {k: LeafCheck(k, tuple(v["shape"]), v["dtype"], True, v["fingerprint"])
            for k, v in record["arrays"].items()}


def find_nonfinite(tree: Any) -> str | None:
    """Path of the first floating leaf holding NaN or inf, or None if all are finite.

    One host transfer for the whole tree; integer and PRNG-key leaves are skipped.

    Args:
        tree: any pytree of arrays or Python numbers.

    Returns:
        The leaf's path as `jax.tree_util.keystr` writes it (e.g. "['params']['w']"), or None.
    """
    return next((c.where for c in scan(tree, fingerprints=False).values() if not c.finite), None)


def assert_finite(tree: Any, step: int, name: str = "state") -> None:
    """Raise NonFiniteError naming `step` and the first non-finite leaf of `tree`.

    Call it on the new state after every update (params and optimizer state, not just
    the loss), so that a NaN never reaches a checkpoint and the last good one stays the
    newest. `Checkpointer.save` makes the same check and refuses to write such a state.

    Args:
        tree: the pytree to check (state, loss metrics, ...).
        step: the training step, for the message.
        name: what `tree` is, for the message.

    Raises:
        NonFiniteError: some floating leaf holds NaN or inf.
    """
    path = find_nonfinite(tree)
    if path is not None:
        raise NonFiniteError(f"step {step}: non-finite value (NaN or inf) in {name}{path}")


def leaf_key(path: tuple[Any, ...]) -> str:
    """A tree path as "a/b/0": stable across dicts, NamedTuples and lists of one layout."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


# ---------------------------------------------------------------------------
# The device pass


def _scan_device(arrays: list[jax.Array], fingerprints: bool) -> list[tuple[bool, str]]:
    """(finite, fingerprint) per array; one program per set of devices the arrays live on."""
    groups: dict[frozenset, list[int]] = {}
    for i, x in enumerate(arrays):
        groups.setdefault(frozenset(x.sharding.device_set), []).append(i)
    # Arrays committed to different device sets cannot enter one program; scalars such
    # as the step counter often sit on one device beside parameters on the mesh.
    pending = [(idx, _scan_jit([arrays[i] for i in idx], fingerprints)) for idx in groups.values()]
    results: list[tuple[bool, str]] = [(True, "")] * len(arrays)
    for idx, (finite, lanes) in jax.device_get(pending):
        for j, i in enumerate(idx):
            fingerprint = f"{int(lanes[j][0]):08x}{int(lanes[j][1]):08x}" if fingerprints else ""
            results[i] = (bool(finite[j]), fingerprint)
    return results


@functools.partial(jax.jit, static_argnums=1)
def _scan_jit(xs: list[jax.Array], fingerprints: bool) -> tuple[jax.Array, jax.Array]:
    finite = [jnp.all(jnp.isfinite(x)) if _is_floating(x) else jnp.bool_(True) for x in xs]
    lanes = [_fingerprint(_words(x)) if fingerprints else jnp.zeros(2, jnp.uint32) for x in xs]
    return jnp.stack(finite), jnp.stack(lanes)


def _words(x: jax.Array) -> UInt32[Array, " ..."]:
    """The array's bits as uint32 words (64-bit dtypes: a trailing axis of two)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _fingerprint(words: Shaped[Array, " ..."]) -> UInt32[Array, " 2"]:
    position = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        position += lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    a = _mix(words ^ _mix(position ^ jnp.uint32(0x9E3779B9)))
    b = _mix((words ^ jnp.uint32(0x7F4A7C15)) + _mix(position * jnp.uint32(0x2545F491) + jnp.uint32(1)))
    return jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)])


def _mix(h: UInt32[Array, " ..."]) -> UInt32[Array, " ..."]:
    """MurmurHash3's 32-bit finaliser: every input bit flips about half the output bits."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _fingerprintable(x: Any) -> bool:
    if isinstance(x, jax.Array):
        return True
    # Numpy leaves go through the device pass too, unless JAX would convert their dtype.
    if not isinstance(x, np.ndarray | np.generic):
        return False
    numeric = x.dtype == np.bool_ or any(jnp.issubdtype(x.dtype, t) for t in (jnp.integer, jnp.floating))
    return numeric and jax.dtypes.canonicalize_dtype(x.dtype) == x.dtype


def _is_floating(x: Any) -> bool:
    if isinstance(x, float):
        return True
    dtype = getattr(x, "dtype", None)
    # Typed PRNG keys have an extended dtype that is not a number at all.
    return dtype is not None and not jax.dtypes.issubdtype(dtype, jax.dtypes.extended) \
        and jnp.issubdtype(dtype, jnp.inexact)
