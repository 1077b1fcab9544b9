"""Hugging Face checkpoint files: read and written by `safetensors`; bad files and configs named.

The checkpoints here are written by `export_hf_checkpoint` from random weights (no torch);
`test_models.py` checks the same files against `transformers`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from ouroboros_jax.config import ModelConfig
from ouroboros_jax.models import CheckpointError, export_hf_checkpoint, init_params, load_hf_checkpoint
from ouroboros_jax.models.safetensors_io import SafetensorsFile, save_file

CFG = ModelConfig(family="llama", vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=8, d_ff=64, tie_embeddings=False, qkv_bias=False)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@pytest.fixture()
def ckpt(tmp_path, params) -> Path:
    return export_hf_checkpoint(params, CFG, tmp_path / "ckpt")


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _edit_entry(ckpt: Path, name: str, **fields) -> None:
    f = ckpt / "model.safetensors"
    header, data = _split(f)
    header[name] = fields.pop("replace") if "replace" in fields else header[name] | fields
    _write(f, header, data)


def _edit_config(ckpt: Path, **fields) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    for key, value in fields.items():
        if value is _DELETE:
            del cfg[key]
        else:
            cfg[key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))


_DELETE = object()


# ---------------------------------------------------------------------------
# The files are the library's: what we write it reads, and the other way round.


def test_written_files_are_read_by_the_safetensors_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
               "b": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
               "t": rng.standard_normal((4, 6)).astype(np.float32).T,  # not C-contiguous
               "i": np.arange(6, dtype=np.int64).reshape(2, 3), "s": np.float32(2.5)}
    save_file(tensors, tmp_path / "x.safetensors")
    lib_read = safetensors.numpy.load_file(tmp_path / "x.safetensors")
    ours = SafetensorsFile(tmp_path / "x.safetensors")
    assert sorted(ours) == ["a", "b", "i", "s", "t"] and ours.metadata == {"format": "pt"}
    for name, want in tensors.items():
        np.testing.assert_array_equal(ours[name], np.asarray(want))
        assert ours[name].dtype == np.asarray(want).dtype and ours.shape(name) == np.shape(want)
        np.testing.assert_array_equal(lib_read[name], np.asarray(want))
    assert ours.dtype_name("b") == "BF16"
    # A file the library wrote reads back through ours, bit for bit.
    safetensors.numpy.save_file({"w": tensors["a"], "i": tensors["i"]}, tmp_path / "lib.safetensors")
    lib = SafetensorsFile(tmp_path / "lib.safetensors")
    np.testing.assert_array_equal(lib["w"], tensors["a"])
    np.testing.assert_array_equal(lib["i"], tensors["i"])
    with pytest.raises(KeyError, match=r"x\.safetensors: no tensor named 'zz'"):
        ours["zz"]


def test_export_is_read_by_the_library_with_the_same_values(ckpt, params):
    lib = safetensors.numpy.load_file(ckpt / "model.safetensors")
    np.testing.assert_array_equal(lib["model.norm.weight"], np.asarray(params["final_norm_D"]))
    np.testing.assert_array_equal(lib["model.layers.1.mlp.gate_proj.weight"],
                                  np.asarray(params["layers"]["gate_LDF"][1]).T)


def test_unsavable_dtype_names_file_and_tensor(tmp_path):
    with pytest.raises(CheckpointError, match=r"y\.safetensors: tensor 'c' \(complex128\)"):
        save_file({"ok": np.ones(2, np.float32), "c": np.ones(2, np.complex128)}, tmp_path / "y.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written is left


# ---------------------------------------------------------------------------
# Malformed files: refused by the library, the fault named here (file, tensor, field).


def test_negative_offsets_never_read_the_header_as_a_tensor(ckpt):
    # [-128, 0] spans 128 bytes, the size of model.norm.weight: the bytes before the data
    # are the header's JSON. A reader that trusts the offsets loads them as weights.
    _edit_entry(ckpt, "model.norm.weight", data_offsets=[-128, 0])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight': "
                                              r"data_offsets \[-128, 0\] must be two integers"):
        load_hf_checkpoint(ckpt)


def test_missing_offset_is_named(ckpt):
    _edit_entry(ckpt, "model.norm.weight", data_offsets=[0])
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight': data_offsets \[0\]"):
        load_hf_checkpoint(ckpt)


def test_missing_offsets_field_is_named(ckpt):
    _edit_entry(ckpt, "model.norm.weight", replace={"dtype": "F32", "shape": [32]})
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight': header entry has no "
                                              r"'data_offsets'"):
        load_hf_checkpoint(ckpt)


def test_negative_shape_is_named(ckpt):
    _edit_entry(ckpt, "model.norm.weight", shape=[-32])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight': "
                                              r"shape \[-32\] must be a list of non-negative"):
        load_hf_checkpoint(ckpt)


def test_entry_that_is_not_an_object_is_named(ckpt):
    _edit_entry(ckpt, "model.norm.weight", replace=[0, 128])
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight': header entry is a JSON "
                                              r"list, not an object"):
        load_hf_checkpoint(ckpt)


def test_overlapping_tensors_are_named(ckpt):
    header, _ = _split(ckpt / "model.safetensors")
    other = header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    _edit_entry(ckpt, "model.norm.weight", data_offsets=other)  # same size, same bytes
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*': data_offsets .* overlap "
                                              r"tensor '.*'"):
        load_hf_checkpoint(ckpt)


def test_wrong_byte_count_and_unknown_dtype_are_named(ckpt, tmp_path):
    _edit_entry(ckpt, "model.norm.weight", shape=[16])
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight': corrupt entry \(128 bytes "
                                              r"for shape \[16\] of F32\)"):
        load_hf_checkpoint(ckpt)
    _edit_entry(ckpt, "model.norm.weight", shape=[32], dtype="F33")
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight': unsupported dtype 'F33'"):
        load_hf_checkpoint(ckpt)


def test_header_length_past_the_end(tmp_path):
    f = tmp_path / "z.safetensors"
    f.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match=r"z\.safetensors: corrupt safetensors file \(header length "
                                              r"10000 does not fit the file of 10 bytes\)"):
        SafetensorsFile(f)


def test_index_must_name_files_beside_it(ckpt):
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: tensor 'model\.norm\.weight' maps to "
                                              r"'\.\./elsewhere\.safetensors'"):
        load_hf_checkpoint(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(CheckpointError, match="corrupt index"):
        load_hf_checkpoint(ckpt)


# ---------------------------------------------------------------------------
# Tensors that parse but do not fit the model, or hold NaN.


def test_transposed_tensor_names_the_dims_that_differ(ckpt, tmp_path):
    f = SafetensorsFile(ckpt / "model.safetensors")
    tensors = {k: np.array(f[k]) for k in f}
    name = "model.layers.1.mlp.gate_proj.weight"
    assert tensors[name].shape == (64, 32)  # HF layout: (intermediate, hidden)
    tensors[name] = np.ascontiguousarray(tensors[name].T)
    save_file(tensors, ckpt / "model.safetensors")
    expected = (r"tensor 'model\.layers\.1\.mlp\.gate_proj\.weight' has shape \(32, 64\), which does "
                r"not fit the model's \(64, 32\) for gate_LDF: dim 0 is 32, expected 64; dim 1 is 64, "
                r"expected 32 \(the tensor is transposed\)")
    with pytest.raises(CheckpointError, match=expected):
        load_hf_checkpoint(ckpt)


def test_wrong_rank_is_named(ckpt):
    f = SafetensorsFile(ckpt / "model.safetensors")
    tensors = {k: np.array(f[k]) for k in f}
    tensors["model.norm.weight"] = tensors["model.norm.weight"].reshape(4, 8)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(4, 8\), which does not "
                                              r"fit the model's \(32,\) for final_norm_D: 2 dims where "
                                              r"the model has 1"):
        load_hf_checkpoint(ckpt)


def test_nonfinite_weights_warn_naming_the_tensor(ckpt, params):
    f = SafetensorsFile(ckpt / "model.safetensors")
    tensors = {k: np.array(f[k]) for k in f}
    tensors["model.layers.0.self_attn.k_proj.weight"][3, :2] = [np.nan, np.inf]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.warns(RuntimeWarning, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\."
                                            r"k_proj\.weight' holds 2 non-finite values"):
        _, loaded = load_hf_checkpoint(ckpt)
    assert np.isnan(np.asarray(loaded["layers"]["k_LDKH"])).sum() == 1
    # The export of such weights says so too.
    with pytest.warns(RuntimeWarning, match=r"export to .*: tensor 'model\.layers\.0\.self_attn\.k_proj"):
        export_hf_checkpoint(loaded, CFG, ckpt.parent / "again")


def test_unread_tensors_warn(ckpt):
    f = SafetensorsFile(ckpt / "model.safetensors")
    tensors = {k: np.array(f[k]) for k in f}
    tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.warns(RuntimeWarning, match=r"1 tensors of the checkpoint are not read by the model .* "
                                            r"\['model\.layers\.2\.mlp\.up_proj\.weight'\]"):
        load_hf_checkpoint(ckpt)


def test_export_checks_params_against_the_config(params, tmp_path):
    bad = jax.tree.map(lambda x: x, params)
    bad["layers"]["gate_LDF"] = bad["layers"]["gate_LDF"].transpose(0, 2, 1)
    with pytest.raises(CheckpointError, match=r"params\['layers'\]\['gate_LDF'\] has shape \(2, 64, 32\), "
                                              r"which does not fit the config's \(2, 32, 64\): dim 1 is 64, "
                                              r"expected 32; dim 2 is 32, expected 64"):
        export_hf_checkpoint(bad, CFG, tmp_path / "out")
    missing = {k: v for k, v in params.items() if k != "lm_head_DV"}
    with pytest.raises(CheckpointError, match=r"params\['lm_head_DV'\] is missing"):
        export_hf_checkpoint(missing, CFG, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


# ---------------------------------------------------------------------------
# config.json: each field by its name, with the file.


@pytest.mark.parametrize(("fields", "message"), [
    ({"vocab_size": "64"}, r"field 'vocab_size' must be an integer, got '64' \(a JSON string\)"),
    ({"hidden_size": 32.5}, r"field 'hidden_size' must be an integer, got 32\.5"),
    ({"num_hidden_layers": -1}, r"field 'num_hidden_layers' must be an integer >= 1, got -1"),
    ({"num_attention_heads": True}, r"field 'num_attention_heads' must be an integer, got True"),
    ({"intermediate_size": _DELETE}, r"missing field 'intermediate_size'"),
    ({"rms_norm_eps": "1e-6"}, r"field 'rms_norm_eps' must be a number"),
    ({"rope_theta": -1.0}, r"field 'rope_theta' must be a finite number > 0"),
    ({"tie_word_embeddings": "false"}, r"field 'tie_word_embeddings' must be true or false"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "8"}},
     r"field 'rope_scaling\.factor' must be a number, got '8'"),
    ({"num_key_value_heads": 3},
     r"field 'num_key_value_heads' \(3\) must divide 'num_attention_heads' \(4\)"),
    ({"architectures": "LlamaForCausalLM"}, r"field 'architectures' must be a list"),
])
def test_config_fields_are_named(ckpt, fields, message):
    _edit_config(ckpt, **fields)
    with pytest.raises(CheckpointError, match=rf"ckpt/config\.json: {message}"):
        load_hf_checkpoint(ckpt)


def test_config_that_is_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: must be a JSON object, got a list"):
        load_hf_checkpoint(ckpt)


def test_null_optional_fields_take_their_defaults(ckpt, params):
    _edit_config(ckpt, head_dim=None, num_key_value_heads=2, max_position_embeddings=None)
    cfg, loaded = load_hf_checkpoint(ckpt)
    assert (cfg.head_dim, cfg.max_seq_len) == (8, 2048)
    np.testing.assert_array_equal(loaded["final_norm_D"], params["final_norm_D"])
