"""Safetensors files, read and written by the `safetensors` library.

The library parses and validates every file (offsets, shapes, dtypes, coverage of
the data) and reads tensors into numpy, bfloat16 included (as `ml_dtypes.bfloat16`,
which must be imported for numpy to know the name). This module adds what
a user needs when a file is bad: the library reports only that the header is
invalid, so on a refused file the header is inspected here to name the file, the
tensor and what is wrong with its entry. Nothing is read on the strength of that
inspection: a file the library refuses is never loaded.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors reads it as)
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from ouroboros_jax.errors import CheckpointError

__all__ = ["CheckpointError", "SafetensorsFile", "save_file"]

# Bytes per element of the safetensors dtypes, for naming a bad entry's size; sub-byte
# formats (F4, F6_*) are left to the library's own check.
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
            "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "C64": 8, "F64": 8, "I64": 8, "U64": 8}
SUB_BYTE = ("F4", "F6_E2M3", "F6_E3M2")
MAX_HEADER = 100 * 1024 * 1024  # the library's own limit


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A read-only mapping from tensor name to numpy array, for one `.safetensors` file.

    The file is opened (memory-mapped) by `safetensors.safe_open`; a tensor is read
    when it is looked up.

    Args:
        path: the file.

    Raises:
        CheckpointError: the file is missing, or the library refuses it; the message
            names the file and, when one entry is at fault, the tensor.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: safetensors file not found")
        try:
            self._file = safe_open(str(self.path), framework="numpy")
        except SafetensorError as err:
            raise CheckpointError(diagnose(self.path, err)) from None
        self.metadata: dict[str, str] = dict(self._file.metadata() or {})
        self._names = frozenset(self._file.keys())

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        try:
            return self._file.get_tensor(name)
        except Exception as err:  # the library raises several types (e.g. dtypes numpy lacks)
            raise CheckpointError(f"{self.path}: tensor {name!r} cannot be read as a numpy array "
                                  f"({self.dtype_name(name)}: {err})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the header (no data is read)."""
        return tuple(self._file.get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        """The tensor's safetensors dtype ("F32", "BF16", ...), from the header."""
        return str(self._file.get_slice(name).get_dtype())

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike[str],
              metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to `path` with `safetensors.numpy.save_file`, atomically.

    The file is written beside `path` and renamed over it, so a crash leaves either
    the old file or the new one.

    Args:
        tensors: name -> array (any layout; copied to C order where needed).
        path: the `.safetensors` file.
        metadata: the header's `__metadata__` (default {"format": "pt"}, which
            `transformers` expects).

    Raises:
        CheckpointError: a tensor's dtype has no safetensors equivalent (names it).
    """
    arrays = {}
    for name, value in tensors.items():
        arr = np.asarray(value)
        arrays[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    tmp = Path(str(path) + ".tmp")
    try:
        safetensors.numpy.save_file(arrays, tmp, metadata=dict(metadata or {"format": "pt"}))
    except (SafetensorError, ValueError, TypeError, AttributeError) as err:
        tmp.unlink(missing_ok=True)
        bad = [f"{n!r} ({a.dtype})" for n, a in arrays.items() if a.dtype.name not in _SAVABLE]
        what = f"tensor {bad[0]} has a dtype safetensors cannot store" if bad else str(err)
        raise CheckpointError(f"{path}: {what}") from err
    os.replace(tmp, path)


_SAVABLE = frozenset(("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                      "uint64", "float16", "float32", "float64", "bfloat16", "complex64"))


# ---------------------------------------------------------------------------
# Naming what is wrong in a file the library refused


def diagnose(path: Path, err: Exception) -> str:
    """The message for a file `safetensors` refused: file, tensor and the fault.

    Args:
        path: the file.
        err: the library's error (quoted at the end of the message).

    Returns:
        e.g. "ckpt/model.safetensors: tensor 'model.norm.weight': data_offsets [-128, 0]
        must be two integers 0 <= begin <= end (safetensors: ...)".
    """
    cause = f"(safetensors: {err})"
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return f"{path}: corrupt safetensors file (shorter than its header) {cause}"
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            return (f"{path}: corrupt safetensors file (header length {n} does not fit the file "
                    f"of {size} bytes) {cause}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return f"{path}: corrupt safetensors header ({e}) {cause}"
    if not isinstance(header, dict):
        return f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object) {cause}"
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, entry in header.items():
        fault = _entry_fault(entry, data_len)
        if fault:
            return f"{path}: tensor {name!r}: {fault} {cause}"
    fault = _coverage_fault(header, data_len)
    return f"{path}: {fault or 'not a valid safetensors file'} {cause}"


def _entry_fault(entry: Any, data_len: int) -> str:
    """What is wrong with one header entry, or "" if it reads as valid."""
    if not isinstance(entry, dict):
        return (f"header entry is a JSON {type(entry).__name__}, not an object with "
                "dtype, shape and data_offsets")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            return f"header entry has no {key!r}"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or (dtype not in ITEMSIZE and dtype not in SUB_BYTE):
        return f"unsupported dtype {dtype!r}"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"shape {shape!r} must be a list of non-negative integers"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        return f"data_offsets {offsets!r} must be two integers [begin, end] with 0 <= begin <= end"
    begin, end = offsets
    if dtype in ITEMSIZE and end - begin != math.prod(shape) * ITEMSIZE[dtype]:
        return f"corrupt entry ({end - begin} bytes for shape {shape} of {dtype})"
    if end > data_len:
        return f"file is truncated (tensor ends at byte {end}, data has {data_len})"
    return ""


def _coverage_fault(header: dict[str, dict], data_len: int) -> str:
    """Overlaps, gaps or trailing bytes between valid entries (the library wants none)."""
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in header.items())
    position, previous = 0, None
    for begin, end, name in spans:
        if begin < position:
            return (f"tensor {name!r}: data_offsets [{begin}, {end}] overlap tensor {previous!r}, "
                    f"which ends at byte {position}")
        if begin > position:
            return f"tensor {name!r}: data_offsets [{begin}, {end}] leave bytes {position}-{begin} unused"
        position, previous = end, name
    if position != data_len:
        return f"{data_len - position} bytes of data follow the last tensor {previous!r}"
    return ""


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
