"""Hugging Face checkpoints: import `config.json` + `*.safetensors`, and export back.

Supported architectures: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
and their ...ForSequenceClassification (num_labels=1) as reward models.
Weights are read from memory-mapped files straight into their device shards
when a mesh is given: a host reads only the slices its devices hold.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ouroboros_jax.config import ConfigError, ModelConfig
from ouroboros_jax.models.safetensors_io import CheckpointError, SafetensorsFile, save_file
from ouroboros_jax.models.transformer import LAYER_AXES, Params, dtype_of, param_shapes, param_shardings

ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "lm"),
    "Qwen2ForCausalLM": ("qwen2", "lm"),
    "Qwen3ForCausalLM": ("qwen3", "lm"),
    "LlamaForSequenceClassification": ("llama", "score"),
    "Qwen2ForSequenceClassification": ("qwen2", "score"),
    "Qwen3ForSequenceClassification": ("qwen3", "score"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


# ---------------------------------------------------------------------------
# config.json <-> ModelConfig


def config_from_hf(hf: dict[str, Any], *, path: str = "", dtype: str = "float32") -> tuple[ModelConfig, str]:
    """Translate a Hugging Face `config.json` dict; returns (config, head kind).

    Every field read is checked for its JSON type and range first, so that a bad
    value is reported by its config.json name (`"vocab_size": "64"` is an error
    naming `vocab_size` and the file, not a TypeError deep in the model).

    Raises:
        CheckpointError: an unsupported architecture or feature, or a field that is
            missing, of the wrong type or out of range (the message names it).
    """
    where = f"{path}/config.json"
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where}: must be a JSON object, got a {type(hf).__name__}")
    f = _Fields(hf, where)
    archs = hf.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise CheckpointError(f"{where}: field 'architectures' must be a list naming the model class "
                              f"(got {archs!r}); supported: {sorted(ARCHITECTURES)}")
    if archs[0] not in ARCHITECTURES:
        raise CheckpointError(f"{where}: unsupported architecture {archs[0]!r}; "
                              f"supported: {sorted(ARCHITECTURES)}")
    family, head = ARCHITECTURES[archs[0]]
    if head == "score" and f.integer("num_labels", len(hf.get("id2label") or {0: 0}), minimum=0) != 1:
        raise CheckpointError(f"{where}: a reward model needs num_labels=1")
    if f.boolean("mlp_bias", False):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported")
    if f.boolean("use_sliding_window", False):
        raise CheckpointError(f"{where}: use_sliding_window=true is not supported")
    rope, rope_kind = _rope_fields(hf, where)
    n_heads, d_model = f.integer("num_attention_heads"), f.integer("hidden_size")
    n_kv_heads = f.integer("num_key_value_heads", n_heads)
    if n_heads % n_kv_heads:
        raise CheckpointError(f"{where}: field 'num_key_value_heads' ({n_kv_heads}) must divide "
                              f"'num_attention_heads' ({n_heads})")
    if hf.get("head_dim") is None and d_model % n_heads:
        raise CheckpointError(f"{where}: field 'hidden_size' ({d_model}) is not a multiple of "
                              f"'num_attention_heads' ({n_heads}), and no 'head_dim' is given")
    head_dim = f.integer("head_dim", d_model // n_heads)
    if head_dim % 2:
        raise CheckpointError(f"{where}: field 'head_dim' ({head_dim}) must be even "
                              "(rotary embeddings pair dimensions)")
    attention_bias = f.boolean("attention_bias", False)
    try:
        cfg = ModelConfig(
            family=family,
            vocab_size=f.integer("vocab_size"),
            d_model=d_model,
            n_layers=f.integer("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            d_ff=f.integer("intermediate_size"),
            rope_theta=f.number("rope_theta", rope.number("rope_theta", 10_000.0)),
            rope_scaling="" if rope_kind == "default" else rope_kind,
            rope_scaling_factor=rope.number("factor", 1.0),
            rope_low_freq_factor=rope.number("low_freq_factor", 1.0),
            rope_high_freq_factor=rope.number("high_freq_factor", 4.0),
            rope_original_max_position=rope.integer("original_max_position_embeddings", 8192),
            norm_eps=f.number("rms_norm_eps", 1e-6),
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=attention_bias if family == "llama" else False,
            qk_norm=family == "qwen3",
            tie_embeddings=f.boolean("tie_word_embeddings", family != "llama"),
            max_seq_len=f.integer("max_position_embeddings", 2048),
            dtype=dtype,
            compute_dtype=dtype,
            path=path,
        )
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg, head


class _Fields:
    """Typed reads of config.json fields; errors name the field and the file.

    A field that is absent or null takes `default`; without a default it is required.
    """

    def __init__(self, data: dict[str, Any], where: str, prefix: str = ""):
        self.data, self.where, self.prefix = data, where, prefix

    def _get(self, key: str, default: Any) -> Any:
        value = self.data.get(key)
        if value is not None:
            return value
        if default is None:
            raise CheckpointError(f"{self.where}: missing field {self.prefix + key!r}")
        return default

    def _bad(self, key: str, value: Any, want: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: field {self.prefix + key!r} must be {want}, "
                               f"got {value!r} (a JSON {_json_type(value)})")

    def integer(self, key: str, default: int | None = None, *, minimum: int = 1) -> int:
        value = self._get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._bad(key, value, "an integer")
        if value < minimum:
            raise self._bad(key, value, f"an integer >= {minimum}")
        return value

    def number(self, key: str, default: float | None = None) -> float:
        value = self._get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self._bad(key, value, "a number")
        if not math.isfinite(value) or value <= 0:
            raise self._bad(key, value, "a finite number > 0")
        return float(value)

    def boolean(self, key: str, default: bool | None = None) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value


def _rope_fields(hf: dict[str, Any], where: str) -> tuple[_Fields, str]:
    """The rope scaling dict (`rope_parameters`, or the older `rope_scaling`) and its kind."""
    key = "rope_parameters" if hf.get("rope_parameters") is not None else "rope_scaling"
    rope = hf.get(key) or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{where}: field {key!r} must be an object, got {rope!r}")
    fields = _Fields(rope, where, prefix=f"{key}.")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise CheckpointError(f"{where}: rope scaling {kind!r} is not supported "
                              "(supported: default, linear, llama3)")
    return fields, kind


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
             dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def config_to_hf(cfg: ModelConfig, *, head: str = "lm", dtype: str | None = None) -> dict[str, Any]:
    """The `config.json` dict that `transformers` reads back to the same model."""
    arch = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[cfg.family]
    arch += "ForCausalLM" if head == "lm" else "ForSequenceClassification"
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": MODEL_TYPES[cfg.family],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len,
        "torch_dtype": dtype or cfg.dtype,
        "use_sliding_window": False,
    }
    if cfg.family == "llama":
        out["attention_bias"] = cfg.qkv_bias
        out["mlp_bias"] = False
    elif cfg.family == "qwen3":
        out["attention_bias"] = cfg.qkv_bias
    if cfg.rope_scaling:
        scaling: dict[str, Any] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
        if cfg.rope_scaling == "llama3":
            scaling |= {"low_freq_factor": cfg.rope_low_freq_factor,
                        "high_freq_factor": cfg.rope_high_freq_factor,
                        "original_max_position_embeddings": cfg.rope_original_max_position}
        out["rope_scaling"] = scaling
    if head == "score":
        out["num_labels"] = 1
        out["id2label"] = {"0": "LABEL_0"}
        out["label2id"] = {"LABEL_0": 0}
    return out


# ---------------------------------------------------------------------------
# Name and layout mapping: ours -> (HF name template, to_ours, from_ours)


def _hf_layout(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    t = lambda w: w.T
    ident = lambda w: w
    pre = "model.layers.{i}."
    return {
        "attn_norm_LD": (pre + "input_layernorm.weight", ident, ident),
        "q_LDNH": (pre + "self_attn.q_proj.weight", lambda w: w.T.reshape(D, N, H),
                   lambda w: w.reshape(D, N * H).T),
        "k_LDKH": (pre + "self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, H),
                   lambda w: w.reshape(D, K * H).T),
        "v_LDKH": (pre + "self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, H),
                   lambda w: w.reshape(D, K * H).T),
        "o_LNHD": (pre + "self_attn.o_proj.weight", lambda w: w.T.reshape(N, H, D),
                   lambda w: w.reshape(N * H, D).T),
        "q_bias_LNH": (pre + "self_attn.q_proj.bias", lambda w: w.reshape(N, H), lambda w: w.reshape(-1)),
        "k_bias_LKH": (pre + "self_attn.k_proj.bias", lambda w: w.reshape(K, H), lambda w: w.reshape(-1)),
        "v_bias_LKH": (pre + "self_attn.v_proj.bias", lambda w: w.reshape(K, H), lambda w: w.reshape(-1)),
        "o_bias_LD": (pre + "self_attn.o_proj.bias", ident, ident),
        "q_norm_LH": (pre + "self_attn.q_norm.weight", ident, ident),
        "k_norm_LH": (pre + "self_attn.k_norm.weight", ident, ident),
        "mlp_norm_LD": (pre + "post_attention_layernorm.weight", ident, ident),
        "gate_LDF": (pre + "mlp.gate_proj.weight", t, t),
        "up_LDF": (pre + "mlp.up_proj.weight", t, t),
        "down_LFD": (pre + "mlp.down_proj.weight", t, t),
        "embed_VD": ("model.embed_tokens.weight", ident, ident),
        "final_norm_D": ("model.norm.weight", ident, ident),
        "lm_head_DV": ("lm_head.weight", t, t),
        "score_D": ("score.weight", lambda w: w.reshape(-1), lambda w: w.reshape(1, -1)),
    }


class _Reader:
    """Finds each HF tensor across (possibly sharded) files; checks and converts on the host."""

    def __init__(self, directory: Path, cfg: ModelConfig, dtype: np.dtype):
        self.dir = directory
        self.layout = _hf_layout(cfg)
        self.dtype = dtype
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: directory / f for name, f in _weight_map(index).items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: no *.safetensors files found")
            self.files = {}
            for f in files:
                for name in SafetensorsFile(f):
                    self.files[name] = f
        self._open = functools.lru_cache(maxsize=None)(SafetensorsFile)
        self.tensor = functools.lru_cache(maxsize=8)(self._tensor)
        self._warned: set[str] = set()

    def _tensor(self, ours: str, layer: int | None, want: tuple[int, ...]) -> np.ndarray:
        template, to_ours, from_ours = self.layout[ours]
        name = template.format(i=layer)
        if name not in self.files:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        file = self._open(self.files[name])
        if name not in file:
            raise CheckpointError(f"{file.path}: tensor {name!r} is missing (the index names this file)")
        # Compared in the file's layout, before any transpose: both shapes read the same way.
        expected = _hf_shape(from_ours, want)
        if file.shape(name) != expected:
            raise CheckpointError(f"{file.path}: tensor {name!r} has shape {file.shape(name)}, which "
                                  f"does not fit the model's {expected} for {ours}: "
                                  f"{_shape_difference(file.shape(name), expected)}")
        raw = file[name]
        if not np.issubdtype(raw.dtype, np.floating) and raw.dtype.name != "bfloat16":
            raise CheckpointError(f"{file.path}: tensor {name!r} has dtype {raw.dtype}, expected a float")
        if name not in self._warned:
            self._warned.add(name)
            _warn_nonfinite(raw, f"{file.path}: tensor {name!r}")
        out = to_ours(raw)
        assert out.shape == want, (name, out.shape, want)  # the layout's two directions agree
        return np.asarray(out, dtype=self.dtype)

    def read(self, ours: str, shape: tuple[int, ...], index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The (slice of the) stacked tensor `ours`, converted to our layout."""
        index = index or tuple(slice(None) for _ in shape)
        if ours not in LAYER_AXES:
            return self.tensor(ours, None, shape)[index]
        layers = range(shape[0])[index[0]]
        parts = [self.tensor(ours, i, shape[1:])[index[1:]] for i in layers]
        return np.stack(parts)

    def unused(self, shapes: dict[str, Any]) -> list[str]:
        """Tensors in the checkpoint that the model of `shapes` does not read."""
        used = {self.layout[k][0] for k in shapes if k != "layers"}
        for k, shape in shapes.get("layers", {}).items():
            used |= {self.layout[k][0].format(i=i) for i in range(shape[0])}
        # Old Llama checkpoints carry the rotary tables as buffers; they are recomputed.
        return sorted(n for n in self.files if n not in used and not n.endswith("rotary_emb.inv_freq"))


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor -> file map, checked: names of files in the same directory."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: corrupt index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: corrupt index ('weight_map' is not an object)")
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise CheckpointError(f"{index}: tensor {name!r} maps to {file!r}, "
                                  "not the name of a file beside the index")
    return weight_map


@functools.lru_cache(maxsize=256)
def _hf_shape(from_ours: Callable, want: tuple[int, ...]) -> tuple[int, ...]:
    """The shape, in the HF file's layout, of a tensor that is `want` in ours (no data)."""
    return tuple(jax.eval_shape(from_ours, jax.ShapeDtypeStruct(want, jnp.float32)).shape)


def _shape_difference(got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """Which dimensions differ, in words: 'dim 0 is 32, expected 64; ...'."""
    if len(got) != len(want):
        return f"{len(got)} dims where the model has {len(want)}"
    diffs = "; ".join(f"dim {i} is {g}, expected {w}" for i, (g, w) in enumerate(zip(got, want, strict=True))
                      if g != w)
    if len(got) == 2 and got == want[::-1]:
        diffs += " (the tensor is transposed)"
    return diffs


def _warn_nonfinite(array: np.ndarray, what: str) -> None:
    """Warn, naming `what`, if a float array holds NaN or inf."""
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        warnings.warn(f"{what} holds {bad} non-finite values (NaN or inf) among {array.size}",
                      RuntimeWarning, stacklevel=2)


def load_hf_checkpoint(
    path: str | os.PathLike[str], *, dtype: str = "float32", mesh: Mesh | None = None
) -> tuple[ModelConfig, Params]:
    """Load a Hugging Face checkpoint directory into (model_config, params).

    Args:
      path: a directory with `config.json` and `model.safetensors`, or sharded
        `model-0000k-of-0000n.safetensors` files with `model.safetensors.index.json`.
      dtype: parameter dtype, "float32" or "bfloat16" (also the compute dtype;
        change `compute_dtype` on the returned config to mix).
      mesh: when given, every parameter is placed straight into its sharding
        under `sharding.RULES`; each host reads only the slices it holds.
    Returns:
      The architecture config and the params pytree. For a
      ...ForSequenceClassification checkpoint the params carry `score_D`.
    """
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory}: config.json not found")
    try:
        hf = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype: must be 'float32' or 'bfloat16' (got {dtype!r})")
    cfg, head = config_from_hf(hf, path=str(directory), dtype=dtype)
    reader = _Reader(directory, cfg, np.dtype(dtype_of(dtype)))
    shapes = param_shapes(cfg, head=head)
    unused = reader.unused(shapes)
    if unused:
        warnings.warn(f"{directory}: {len(unused)} tensors of the checkpoint are not read by the model "
                      f"that config.json describes, e.g. {unused[:3]}", RuntimeWarning, stacklevel=2)
    is_leaf = lambda x: isinstance(x, tuple)
    if mesh is None:
        def load(path_, shape):
            return jnp.asarray(reader.read(path_[-1].key, shape))
        params = jax.tree_util.tree_map_with_path(load, shapes, is_leaf=is_leaf)
    else:
        shardings = param_shardings(cfg, mesh, head=head)

        def load(path_, shape, sharding):
            ours = path_[-1].key
            return jax.make_array_from_callback(shape, sharding, lambda idx: reader.read(ours, shape, idx))
        params = jax.tree_util.tree_map_with_path(load, shapes, shardings, is_leaf=is_leaf)
    return cfg, params


def export_hf_checkpoint(
    params: Params, cfg: ModelConfig, path: str | os.PathLike[str], *,
    dtype: str | None = None, max_shard_bytes: int = 4 * 1024**3,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write params as a Hugging Face checkpoint that `transformers` loads.

    Files larger than `max_shard_bytes` are split into
    `model-0000k-of-0000n.safetensors` with an index, as Hugging Face does.
    Special token ids (bos/eos/pad) and tokenizer files are carried over from
    the checkpoint `cfg.path` was loaded from; `extra_config` adds keys to
    `config.json` (e.g. `pad_token_id`, which a reward model needs for batches).

    Multi-host: every process must call this (shards that a process does not
    hold are gathered first, a collective); only process 0 writes the files.
    """
    directory = Path(path)
    head = "score" if "score_D" in params else "lm"
    _check_export_shapes(params, cfg, head, directory)
    np_dtype = np.dtype(dtype_of(dtype or cfg.dtype))
    layout = _hf_layout(cfg)
    flat = {k: _to_host(v) for k, v in traverse_util.flatten_dict(params).items()}
    if jax.process_index() != 0:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    # ("layers", name) for a stacked layer parameter, (name,) for the others
    for path, value in flat.items():
        template, _, from_ours = layout[path[-1]]
        host = value.astype(np_dtype)
        if path[0] == "layers":
            for i in range(cfg.n_layers):
                tensors[template.format(i=i)] = np.ascontiguousarray(from_ours(host[i]))
        else:
            tensors[template] = np.ascontiguousarray(from_ours(host))
    for name, tensor in tensors.items():
        _warn_nonfinite(tensor, f"export to {directory}: tensor {name!r}")
    _write_shards(tensors, directory, max_shard_bytes)
    hf_cfg = config_to_hf(dataclasses.replace(cfg, path=""), head=head, dtype=dtype or cfg.dtype)
    source = Path(cfg.path) if cfg.path else None
    if source is not None and (source / "config.json").is_file() and source.resolve() != directory.resolve():
        old = json.loads((source / "config.json").read_text())
        hf_cfg |= {k: old[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in old}
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, directory / name)
    hf_cfg |= extra_config or {}
    (directory / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return directory


def _to_host(value: Any) -> np.ndarray:
    """The whole array on this host; shards held by other processes are gathered (a collective)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)


def _check_export_shapes(params: Params, cfg: ModelConfig, head: str, directory: Path) -> None:
    """Every parameter that `cfg` describes is present with its shape, and no other."""
    want = param_shapes(cfg, head=head)
    is_leaf = lambda x: isinstance(x, tuple)
    want_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(want, is_leaf)}
    got_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    where = f"export to {directory}: params"
    missing, extra = sorted(want_flat.keys() - got_flat.keys()), sorted(got_flat.keys() - want_flat.keys())
    if missing:
        raise CheckpointError(f"{where}{missing[0]} is missing (the config describes it)")
    if extra:
        raise CheckpointError(f"{where}{extra[0]} is not part of the model the config describes")
    for key, shape in want_flat.items():
        got = tuple(np.shape(got_flat[key]))
        if got != shape:
            raise CheckpointError(f"{where}{key} has shape {got}, which does not fit the config's "
                                  f"{shape}: {_shape_difference(got, shape)}")


def _write_shards(tensors: dict[str, np.ndarray], directory: Path, max_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors")
        return
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname)
        weight_map |= {name: fname for name in shard}
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
