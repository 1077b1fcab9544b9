"""Fingerprints and finiteness of state trees (what checkpoints record and verify)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ouroboros_jax import integrity


def _reference_fingerprint(words: np.ndarray) -> str:
    """The documented formula in numpy uint64 arithmetic, reduced mod 2**32 by hand."""
    m = 2**32

    def mix(h):
        h = h ^ (h >> 16)
        h = (h * 0x85EBCA6B) % m
        h = h ^ (h >> 13)
        h = (h * 0xC2B2AE35) % m
        return h ^ (h >> 16)

    w = words.astype(np.uint64).reshape(-1)
    i = np.arange(w.size, dtype=np.uint64)
    a = mix(w ^ mix(i ^ 0x9E3779B9))
    b = mix(((w ^ 0x7F4A7C15) + mix((i * 0x2545F491 + 1) % m)) % m)
    return f"{int(a.sum() % m):08x}{int(b.sum() % m):08x}"


def test_fingerprint_matches_the_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    h = rng.standard_normal(7).astype(ml_dtypes.bfloat16)
    out = integrity.scan({"x": jnp.asarray(x), "h": jnp.asarray(h), "flag": jnp.array([True, False])})
    assert out["x"].fingerprint == _reference_fingerprint(x.view(np.uint32))
    assert out["h"].fingerprint == _reference_fingerprint(h.view(np.uint16))
    assert out["flag"].fingerprint == _reference_fingerprint(np.array([1, 0], np.uint32))


def test_every_small_change_changes_the_fingerprint():
    x = np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)
    variants = [x]
    for position in (0, 7, 100, 255):  # one low bit at a time
        y = x.copy().view(np.uint32)
        y.reshape(-1)[position] ^= 1
        variants.append(y.view(np.float32))
    swapped = x.copy()
    swapped[0, 0], swapped[0, 1] = x[0, 1], x[0, 0]
    variants += [swapped, np.ascontiguousarray(x.T)]  # same values, other places
    prints = [integrity.scan(jnp.asarray(v))[""].fingerprint for v in variants]
    assert len(set(prints)) == len(prints)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 simulated devices")
def test_fingerprint_does_not_depend_on_sharding():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32))
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    layouts = [PartitionSpec("a", "b"), PartitionSpec(("a", "b"), None), PartitionSpec(None, "b"),
               PartitionSpec()]
    prints = {integrity.scan(jax.device_put(x, NamedSharding(mesh, spec)))[""].fingerprint
              for spec in layouts}
    assert prints == {integrity.scan(x)[""].fingerprint}


class _State(NamedTuple):
    params: dict
    rng: jax.Array
    step: jax.Array


def test_scan_names_leaves_the_same_for_namedtuples_and_dicts():
    key = jax.random.key(3)
    state = _State({"w": jnp.array([1.0, jnp.inf])}, key, jnp.int32(4))
    as_dict = {"params": {"w": jnp.array([1.0, jnp.inf])}, "rng": key, "step": jnp.int32(4)}
    a, b = integrity.scan(state), integrity.scan(as_dict)
    assert list(a) == list(b) == ["params/w", "rng", "step"]
    assert [c.fingerprint for c in a.values()] == [c.fingerprint for c in b.values()]
    assert a["params/w"].where == ".params['w']" and b["params/w"].where == "['params']['w']"
    assert [c.finite for c in a.values()] == [False, True, True]
    # A typed key is fingerprinted through its key data.
    assert a["rng"].fingerprint == integrity.scan(jax.random.key_data(key))[""].fingerprint
    assert integrity.find_nonfinite(state) == ".params['w']"


def test_compare_skips_converted_leaves_and_names_changed_ones():
    saved = integrity.scan({"a": jnp.ones(3), "b": jnp.ones(3)})
    record = integrity.from_json(integrity.to_json(saved))
    assert integrity.compare(record, saved) == []
    # "a" restored as bfloat16 on purpose: not compared; "b" changed: named.
    now = integrity.scan({"a": jnp.ones(3, jnp.bfloat16), "b": jnp.array([1.0, 1.0, 2.0])})
    problems = integrity.compare(record, now)
    assert len(problems) == 1 and problems[0].startswith("b: its data differs from what was saved")
    # Numpy leaves JAX holds as they are get one; float64 (x64 off) and Python numbers do not.
    host = integrity.scan({"n32": np.ones(2, np.float32), "n64": np.ones(2), "f": 1.5})
    assert host["n32"].fingerprint == integrity.scan(jnp.ones(2))[""].fingerprint
    assert list(integrity.to_json(host)["arrays"]) == ["n32"]
