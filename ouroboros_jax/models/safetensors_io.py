"""Reading and writing the safetensors format with numpy memory maps.

A small reader of our own, rather than `safetensors.numpy`, for two reasons:
bfloat16 tensors (numpy has no bfloat16; `ml_dtypes` provides it) and errors
that name the file and the tensor when a checkpoint is truncated or corrupt.
Tensors are memory-mapped views, so a host reads only the bytes of the shards
it asks for.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, corrupt or does not fit the model."""


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A read-only mapping from tensor name to a memory-mapped numpy array."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: safetensors file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: corrupt safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: corrupt safetensors file (header length {n} "
                                      f"does not fit the file of {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries = header
        data_len = size - self._start
        for name, entry in header.items():
            self._check_entry(name, entry, data_len)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._start else None

    def _check_entry(self, name: str, entry: dict, data_len: int) -> None:
        where = f"{self.path}: tensor {name!r}"
        if entry.get("dtype") not in DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        nbytes = int(np.prod(entry["shape"], dtype=np.int64)) * DTYPES[entry["dtype"]].itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{where}: corrupt entry ({end - begin} bytes for shape "
                                  f"{entry['shape']} of {entry['dtype']})")
        if end > data_len:
            raise CheckpointError(f"{where}: file is truncated (tensor ends at byte {end}, "
                                  f"data has {data_len})")

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            entry = self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        if begin == end:
            return np.zeros(entry["shape"], dtype)
        assert self._mmap is not None
        buf = self._mmap[self._start + begin:self._start + end]
        return buf.view(dtype).reshape(entry["shape"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike[str],
              metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors in the safetensors layout (8-byte aligned, sorted by name)."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in NAMES:
            raise CheckpointError(f"tensor {name!r}: dtype {arr.dtype} cannot be saved")
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)
