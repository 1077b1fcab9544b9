"""Device mesh, the one rules table, and shardings from logical axis names.

Sharding is stated once: every parameter carries logical axis names (the
models give them as a tree of `Logical` leaves, `models.param_specs`),
activations use the names in `ACTIVATION_AXES`, batches the name "batch", and
`RULES` maps logical names onto the mesh axes (data, fsdp, tensor). A logical
axis whose size the mesh axes do not divide is an error that names the tensor
and the dimension, never a silent replication. This module knows no model.

Multi-host: call `initialize_distributed()` first on every host (it is a no-op
on one host); the mesh then spans all hosts' devices and each host creates or
loads only the shards its devices hold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ouroboros_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or axes, or None for replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,
    # activations and batches
    "batch": ("data", "fsdp"),
    "length": None,
    "cache_length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
}

# Logical axes of the activations the sampler places and constrains.
ACTIVATION_AXES: dict[str, tuple[str, ...]] = {
    "kv_cache_LBKSH": ("layers", "batch", "act_kv_heads", "cache_length", "head_dim"),
}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the (data, fsdp, tensor) mesh; raises ConfigError if it does not fit."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolve(len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, ValueError, NotImplementedError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(
    logical: Sequence[str | None], rules: Mapping[str, Any] = RULES
) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names (None stays replicated)."""
    spec = []
    used: set[str] = set()
    for name in logical:
        target = None if name is None else rules.get(name)
        if target is None:
            spec.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        # A mesh axis can shard only one dimension of a tensor.
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return int(np.prod([mesh.shape[n] for n in names]))


def check_divisible(name: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh,
                    logical: Sequence[str | None] | None = None) -> None:
    """Raise ConfigError if a sharded dimension does not divide by its mesh axes."""
    for dim, (size, entry) in enumerate(zip(shape, spec, strict=False)):
        parts = _axis_size(mesh, entry)
        if size % parts:
            label = f" ({logical[dim]})" if logical else ""
            raise ConfigError(
                f"tensor {name}: dimension {dim}{label} of size {size} does not divide "
                f"into {parts} shards over mesh axis {entry}; change the mesh or the rule"
            )


class Logical(NamedTuple):
    """An array as the sharding rules see it: its shape and one logical axis name per dimension."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]


def _is_logical(x: Any) -> bool:
    return isinstance(x, Logical)


def logical_shardings(specs: Any, mesh: Mesh, rules: Mapping[str, Any] = RULES) -> Any:
    """NamedShardings for a tree of `Logical` leaves (e.g. `models.param_specs`), under the rules table.

    Raises:
      ConfigError: naming the tensor and dimension whose size its mesh axes do not divide.
    """
    def one(path, leaf: Logical):
        spec = logical_to_spec(leaf.axes, rules)
        check_divisible(jax.tree_util.keystr(path), leaf.shape, spec, mesh, leaf.axes)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, specs, is_leaf=_is_logical)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of every batch array: its leading (row) axis over the batch axes, the rest replicated.

    One spec serves arrays of any rank ([B], [B, T], ...), so it also serves a
    whole batch pytree as a `jax.jit` sharding prefix.
    """
    return NamedSharding(mesh, logical_to_spec(("batch",)))


def batch_shards(mesh: Mesh | None) -> int:
    """How many shards the batch axis is split into (1 without a mesh): row counts must divide by it."""
    if mesh is None:
        return 1
    return _axis_size(mesh, logical_to_spec(("batch",))[0])


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a whole copy on every device (scalars, metrics, counters)."""
    return NamedSharding(mesh, PartitionSpec())


def initialize_distributed() -> bool:
    """Start JAX's multi-controller runtime when this process is one of several hosts.

    On Cloud TPU pods JAX discovers the coordinator itself; elsewhere set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Returns True
    when the distributed runtime was started.
    """
    on_tpu_pod = os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    if not (on_tpu_pod or explicit):
        return False
    if explicit:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    return True
