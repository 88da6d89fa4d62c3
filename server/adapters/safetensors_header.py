"""Read a safetensors file's header (names, dtypes, shapes) without loading, let alone unpickling, anything."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from quiver.limits import loads_bounded

# A header beyond this is not a LoRA adapter's (and would be a cheap way to exhaust memory).
MAX_HEADER_BYTES = 64 * 1024 * 1024
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


class SafetensorsError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    # Where its bytes are in the file (absolute offsets), for checks that read them.
    start: int = 0
    end: int = 0


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> info; raises SafetensorsError for anything malformed, truncated or inconsistent."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise SafetensorsError("the file is shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise SafetensorsError("the header length is larger than the file")
        raw = file.read(header_len)
    try:
        header = loads_bounded(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SafetensorsError(f"the header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise SafetensorsError("the header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    end_of_data = 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if dtype not in _DTYPE_BYTES or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError
            expected = _DTYPE_BYTES[dtype]
            for dim in shape:
                expected *= dim
            if not (0 <= begin <= end <= data_len) or end - begin != expected:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"tensor {name!r} has a malformed or out-of-bounds entry") from None
        tensors[name] = TensorInfo(dtype, shape, 8 + header_len + begin, 8 + header_len + end)
        end_of_data = max(end_of_data, end)
    if end_of_data != data_len:
        raise SafetensorsError("the data section does not match the header (truncated or padded file)")
    return tensors


def all_zero(path: Path, tensors: list[TensorInfo], chunk: int = 1024 * 1024) -> bool:
    """Whether every byte of these tensors is zero (+0.0 in every float format), read in chunks."""
    with open(path, "rb") as file:
        for info in tensors:
            file.seek(info.start)
            left = info.end - info.start
            while left > 0:
                data = file.read(min(chunk, left))
                if not data:
                    break
                if data.count(0) != len(data):
                    return False
                left -= len(data)
    return True
