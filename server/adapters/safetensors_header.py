"""Read a safetensors file's header (names, dtypes, shapes, byte ranges) with safetensors' own reader, without loading,
let alone unpickling, any tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

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
    # The length prefix is checked here first, although safe_open checks it too: its own limit is 100 MB, and
    # it would map the file and parse a header that large before refusing it. These 8 bytes are all we read.
    with open(path, "rb") as file:
        prefix = file.read(8)
    if len(prefix) < 8:
        raise SafetensorsError("the file is shorter than a safetensors header")
    header_len = int.from_bytes(prefix, "little")
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise SafetensorsError("the header length is larger than the file")
    # safe_open reads only the header: bad JSON (serde's recursion limit refuses deep nesting), a non-string
    # metadata value, a size that does not match dtype x shape, overlapping or gapped offsets, and a data
    # section the tensors do not exactly cover are all a SafetensorError.
    try:
        with safe_open(path, framework="numpy") as header:
            names = header.offset_keys()  # in file order: their byte ranges are contiguous from the data start
            entries = [(name, header.get_slice(name)) for name in names]
            tensors: dict[str, TensorInfo] = {}
            start = 8 + header_len
            for name, entry in entries:
                dtype, shape = entry.get_dtype(), tuple(entry.get_shape())
                if dtype not in _DTYPE_BYTES:
                    raise SafetensorsError(f"tensor {name!r} has a malformed or out-of-bounds entry")
                end = start + _DTYPE_BYTES[dtype] * math.prod(shape)
                tensors[name] = TensorInfo(dtype, shape, start, end)
                start = end
    except (SafetensorError, OSError) as exc:
        raise SafetensorsError(f"the header is invalid ({exc})") from None
    if start != size:  # safe_open has checked this; the offsets all_zero reads depend on it
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
