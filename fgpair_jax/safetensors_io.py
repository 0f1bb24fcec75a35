"""The `.safetensors` format, read and written without the `safetensors` package or torch.

The format (huggingface/safetensors, "Format" in its README): an 8-byte little-endian unsigned header
length N, N bytes of UTF-8 JSON `{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]},
"__metadata__": {str: str}}` (padded with spaces), then the tensors' bytes, little-endian, row-major, at
those offsets from the end of the header. It holds a flat {name: tensor} dict and no code, which is why
hubs ship ResNet weights this way. Written here by `write` (export.py); the tests check both directions
against the `safetensors` package when it is installed.
"""
import dataclasses
import json
import os
import struct
from typing import Any, Dict, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np

from fgpair_jax.errors import UserError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the reference implementation's limit


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor's shape and numpy dtype, read without its data (`with_data=False` here and in
    `pretrained.read_checkpoint`): what the preflight checks a checkpoint with."""
    shape: Tuple[int, ...]
    dtype: Any

    @property
    def ndim(self) -> int:
        return len(self.shape)


class SafetensorsError(UserError, ValueError):
    """A `.safetensors` file whose header or data is damaged (one line)."""


def is_safetensors(path: str) -> bool:
    """Whether `path` starts like a `.safetensors` file: a plausible header length, then a JSON object."""
    with open(path, "rb") as stream:
        head = stream.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return length <= min(_MAX_HEADER, os.path.getsize(path) - 8)


def read_header(path: str) -> dict:
    """The parsed JSON header of `path` (entries and `__metadata__`); `SafetensorsError` if malformed."""
    with open(path, "rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        raw = stream.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsError(f"{path!r} has a damaged .safetensors header ({error}); re-download it.") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path!r} has a .safetensors header that is not a JSON object; re-download it.")
    return header


def read(path: str, with_data: bool = True) -> Dict[str, object]:
    """{name: array} of a `.safetensors` file (header order), or {name: `TensorSpec`} without
    reading the data when `with_data` is False. Raises `SafetensorsError` (one line) for an unknown dtype,
    a shape that does not fit its byte range, or a file cut short."""
    header = read_header(path)
    size = os.path.getsize(path)
    with open(path, "rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
    start = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(DTYPES[entry["dtype"]])
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path!r}: entry {name!r} has an unsupported dtype or a malformed record "
                                   f"{entry!r}.") from None
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or end < begin:
            raise SafetensorsError(f"{path!r}: entry {name!r} of shape {shape} does not fill its byte range.")
        if start + end > size:
            raise SafetensorsError(f"{path!r} is truncated: entry {name!r} ends past the end of the file; "
                                   "re-download it.")
        if not with_data:
            tensors[name] = TensorSpec(shape, dtype)
            continue
        with open(path, "rb") as stream:
            stream.seek(start + begin)
            data = stream.read(end - begin)
        tensors[name] = np.frombuffer(data, dtype).reshape(shape).copy()  # little-endian hosts (x86, ARM)
    return tensors


def write(path: str, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write {name: array} (any dtype of `DTYPES`) to `path` as `.safetensors`, names sorted; `metadata`
    becomes the header's `__metadata__` (strings only). Raises ValueError for an unsupported dtype."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {array.dtype} has no .safetensors name")
        data = array.tobytes()  # little-endian hosts (x86, ARM): the format's byte order
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as stream:
        stream.write(struct.pack("<Q", len(raw)))
        stream.write(raw)
        for data in blobs:
            stream.write(data)
