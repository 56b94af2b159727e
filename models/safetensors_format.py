"""Reader and writer for the safetensors file format, with nothing but the standard library.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a UTF-8 JSON header mapping tensor names to ``{"dtype", "shape", "data_offsets"}`` plus an
optional ``"__metadata__"`` object of string values, then the raw little-endian tensor bytes.
The reader treats the file as hostile: every size, offset and dtype is checked before a
byte of tensor data is interpreted, and no code is ever executed.
"""

from __future__ import annotations

import json
import math
import struct
from typing import BinaryIO

import torch

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit


class SafetensorsFormatError(ValueError):
    """The bytes are not a well-formed safetensors file; the message says what is wrong."""


def dump(tensors: dict[str, torch.Tensor], metadata: dict[str, str], fh: BinaryIO) -> None:
    """Write ``tensors`` (any device, contiguous or not) and string ``metadata`` to ``fh``."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        if tensor.dtype not in _NAMES:
            raise SafetensorsFormatError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors code")
        blob = _tensor_bytes(tensor)
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    fh.write(struct.pack("<Q", len(raw)))
    fh.write(raw)
    for blob in blobs:
        fh.write(blob)


def loads(data: bytes | bytearray | memoryview) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a whole safetensors file; returns ``(tensors, metadata)``.

    Raises SafetensorsFormatError for anything malformed: short file, oversized or non-JSON
    header, unknown dtype, negative or overflowing shapes, offsets outside the data section,
    overlapping or gappy tensors, or a size that disagrees with dtype and shape.
    """
    view = memoryview(data)
    if len(view) < 8:
        raise SafetensorsFormatError(f"file is {len(view)} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(view):
        raise SafetensorsFormatError(
            f"header length {header_len} does not fit a file of {len(view)} bytes"
        )
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsFormatError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsFormatError("__metadata__ must map strings to strings")
    body = view[8 + header_len :]
    spans = sorted((_check_entry(name, entry), name) for name, entry in header.items())
    expected_start = 0
    tensors: dict[str, torch.Tensor] = {}
    for (start, end, dtype, shape), name in spans:
        if start != expected_start or end > len(body):
            raise SafetensorsFormatError(
                f"tensor {name!r}: data_offsets [{start}, {end}] leave a gap, overlap or run past "
                f"the {len(body)}-byte data section"
            )
        expected_start = end
        chunk = bytearray(body[start:end])  # a private, writable copy the tensor can own
        flat = torch.frombuffer(chunk, dtype=dtype) if chunk else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(shape)
    if expected_start != len(body):
        raise SafetensorsFormatError(f"{len(body) - expected_start} trailing bytes after the last tensor")
    return tensors, metadata


def _check_entry(name: str, entry: object) -> tuple[int, int, torch.dtype, list[int]]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsFormatError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
    dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise SafetensorsFormatError(
            f"tensor {name!r}: dtype {entry['dtype']!r} is not one of {', '.join(_DTYPES)}"
        )
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise SafetensorsFormatError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise SafetensorsFormatError(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes != offsets[1] - offsets[0]:
        raise SafetensorsFormatError(
            f"tensor {name!r}: {entry['dtype']}{shape} needs {nbytes} bytes, offsets give "
            f"{offsets[1] - offsets[0]}"
        )
    return offsets[0], offsets[1], dtype, shape


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()
