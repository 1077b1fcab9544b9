"""Mesh construction, the rules table, and sharded placement on 8 simulated devices."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from ouroboros_jax import sharding
from ouroboros_jax.config import ConfigError, MeshConfig, ModelConfig
from ouroboros_jax.models import forward, init_params, init_sharded, load_hf_checkpoint, param_shardings
from ouroboros_jax.sharding import (
    Logical,
    batch_sharding,
    batch_shards,
    logical_shardings,
    logical_to_spec,
    make_mesh,
)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 simulated devices")

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                  tie_embeddings=False)


def test_mesh_shapes_and_fill():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert make_mesh(MeshConfig()).shape["fsdp"] == 8


def test_mesh_that_does_not_divide_devices_names_field():
    with pytest.raises(ConfigError, match=r"mesh\.fsdp: cannot fill.*3 devices.*8"):
        make_mesh(MeshConfig(data=3, fsdp=-1))
    with pytest.raises(ConfigError, match=r"data\*fsdp\*tensor = 4 must equal the device count 8"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))


def test_rules_table_specs():
    spec = logical_to_spec(("layers", "embed", "heads", "head_dim"))
    assert spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert logical_to_spec(("batch", "length")) == PartitionSpec(("data", "fsdp"), None)
    # a mesh axis shards at most one dimension of a tensor
    assert logical_to_spec(("vocab", "heads")) == PartitionSpec("tensor", None)


def test_batch_sharding_and_shards_come_from_the_rules_and_the_module_knows_no_model():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    assert batch_shards(mesh) == 4 and batch_shards(make_mesh(MeshConfig(fsdp=-1))) == 8
    assert batch_shards(None) == 1
    source = Path(sharding.__file__).read_text()
    assert not re.search(r"^\s*(from|import) ouroboros_jax\.models", source, re.M)
    specs = {"w": Logical((8, 6), ("embed", "mlp")), "inner": {"b": Logical((6,), ("norm",))}}
    shardings = logical_shardings(specs, mesh)
    assert shardings["w"].spec == PartitionSpec("fsdp", "tensor")
    assert shardings["inner"]["b"].spec == PartitionSpec(None)
    with pytest.raises(ConfigError, match=r"tensor \['w'\]: dimension 1 \(mlp\) of size 5"):
        logical_shardings({"w": Logical((8, 5), ("embed", "mlp"))}, mesh)


def test_parameters_are_really_split():
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    params = init_sharded(CFG, jax.random.key(0), mesh)
    q = params["layers"]["q_LDNH"]
    assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    shard_shapes = {s.data.shape for s in q.addressable_shards}
    assert shard_shapes == {(2, 32 // 4, 4 // 2, 8)}
    assert len(q.addressable_shards) == 8
    assert params["embed_VD"].addressable_shards[0].data.shape == (64 // 2, 32 // 4)
    # same values as an unsharded init from the same key (jit may fuse the scale: 1 ulp)
    plain = init_params(CFG, jax.random.key(0))
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    jax.tree.map(close, params, plain)


def test_sharded_forward_equals_unsharded():
    params = init_params(CFG, jax.random.key(1))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (8, 16)), jnp.int32)
    expected = forward(params, CFG, tokens)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = jax.device_put(params, param_shardings(CFG, mesh))
    tokens_sh = jax.device_put(tokens, batch_sharding(mesh))
    out = jax.jit(forward, static_argnums=1)(sharded, CFG, tokens_sh)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)


def test_non_dividing_axis_is_a_clear_error():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    expected = r"tensor \['layers'\]\['k_LDKH'\]: dimension 2 \(kv_heads\) of size 2"
    with pytest.raises(ConfigError, match=expected):
        param_shardings(CFG, mesh)


def test_checkpoint_loads_straight_into_shards(tmp_path):
    pytest.importorskip("transformers")
    from hf_fixtures import make_checkpoint

    make_checkpoint("llama", tmp_path, vocab_size=96)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    cfg, params = load_hf_checkpoint(tmp_path, mesh=mesh)
    _, plain = load_hf_checkpoint(tmp_path)
    assert params["layers"]["gate_LDF"].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert params["lm_head_DV"].addressable_shards[0].data.shape == (32 // 4, 96 // 2)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, plain)
