"""The safetensors file format, read lazily (memory-mapped, one tensor at a time) and written.

A file is an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
raw little-endian tensor bytes (offsets relative to the end of the header). Reading checks every
offset against the file's size, so a truncated file is one error naming the file and tensor.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2 ** 20


class SafetensorsError(ValueError):
    """A safetensors file is malformed or truncated; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorRef:
    """One tensor inside a file; `.array()` maps it without reading the rest of the file."""
    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file

    def array(self) -> np.ndarray:
        dt = np.dtype(DTYPES[self.dtype])
        if math.prod(self.shape) == 0:
            return np.zeros(self.shape, dt)
        return np.memmap(self.path, dtype=dt, mode="r", offset=self.offset, shape=self.shape)


def read_index(path: str | Path) -> dict[str, TensorRef]:
    """{name: TensorRef} of one file, every entry checked against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: truncated (no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: header length {n} exceeds the file ({size} bytes); "
                                   "truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = _entry(path, name, info, 8 + n, size)
    return out


def _entry(path: Path, name: str, info, base: int, size: int) -> TensorRef:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), \
            info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{path}: tensor {name!r}: malformed header entry {info!r}") from None
    if dtype not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r}: unsupported dtype {dtype!r}")
    want = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if end - begin != want:
        raise SafetensorsError(f"{path}: tensor {name!r}: {end - begin} bytes for shape {shape} "
                               f"{dtype} (expected {want})")
    if base + end > size:
        raise SafetensorsError(f"{path}: truncated: tensor {name!r} ends at byte {base + end}, "
                               f"the file has {size}")
    return TensorRef(path, name, dtype, shape, base + begin)


def read_dir(paths: list[Path]) -> dict[str, TensorRef]:
    """Union of several files' indices (a sharded checkpoint); a name twice is an error."""
    out: dict[str, TensorRef] = {}
    for p in paths:
        for name, ref in read_index(p).items():
            if name in out:
                raise SafetensorsError(f"{p}: tensor {name!r} also in {out[name].path}")
            out[name] = ref
    return out


def write(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write `tensors` (written one at a time, in name order) to `path`."""
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    names = sorted(tensors)
    for name in names:
        a = tensors[name]
        dt = NAMES.get(np.dtype(a.dtype))
        if dt is None:
            raise SafetensorsError(f"{path}: tensor {name!r}: dtype {a.dtype} has no safetensors name")
        nbytes = a.size * a.dtype.itemsize
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).astype(tensors[name].dtype.newbyteorder("<"),
                                                              copy=False).tobytes())
