"""Reader and writer for the safetensors file format, with nothing but the standard library.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a UTF-8 JSON header mapping tensor names to ``{"dtype", "shape", "data_offsets"}`` plus an
optional ``"__metadata__"`` object of string values, then the raw little-endian tensor bytes.
The reader treats the file as hostile: every size, offset and dtype is checked before a
byte of tensor data is interpreted, and no code is ever executed.

``parse`` checks a file and lists its tensors without torch (``headswap inspect`` reads a
checkpoint with it alone); ``loads`` and ``dump`` turn the same into torch tensors and back,
importing torch when first called.
"""

from __future__ import annotations

import json
import math
import struct
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit


class TensorEntry(NamedTuple):
    """One tensor of a parsed file: its bytes are ``body[start:end]``; ``dtype`` is torch's name."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class Parsed(NamedTuple):
    """A checked file: its tensors in the order of their bytes, its metadata, its data section."""

    entries: list[TensorEntry]
    metadata: dict[str, str]
    body: memoryview


class SafetensorsFormatError(ValueError):
    """The bytes are not a well-formed safetensors file; the message says what is wrong."""


def looks_like_safetensors(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` starts like a safetensors file rather than a ``torch.save`` one."""
    # torch.save writes a zip (PK\x03\x04) or legacy pickle (\x80); safetensors starts with a
    # u64 length followed by '{'.
    return len(data) > 9 and bytes(data[8:9]) == b"{"


def dump(tensors: dict[str, torch.Tensor], metadata: dict[str, str], fh: BinaryIO) -> None:
    """Write ``tensors`` (any device, contiguous or not) and string ``metadata`` to ``fh``."""
    codes = {f"torch.{torch_name}": code for code, (torch_name, _) in DTYPES.items()}
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        if str(tensor.dtype) not in codes:
            raise SafetensorsFormatError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors code")
        blob = _tensor_bytes(tensor)
        header[name] = {
            "dtype": codes[str(tensor.dtype)],
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

    Raises SafetensorsFormatError for anything malformed (see ``parse``).
    """
    import torch  # here, not at the top: ``parse`` alone must not cost a torch import

    entries, metadata, body = parse(data)
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        dtype = getattr(torch, entry.dtype)
        chunk = bytearray(body[entry.start:entry.end])  # a private, writable copy the tensor can own
        flat = torch.frombuffer(chunk, dtype=dtype) if chunk else torch.empty(0, dtype=dtype)
        tensors[entry.name] = flat.reshape(entry.shape)
    return tensors, metadata


def parse(data: bytes | bytearray | memoryview) -> Parsed:
    """Check a whole safetensors file and list its tensors, without reading them as tensors.

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
    entries = sorted((_check_entry(name, entry) for name, entry in header.items()), key=lambda e: (e.start, e.end, e.name))
    expected_start = 0
    for entry in entries:
        if entry.start != expected_start or entry.end > len(body):
            raise SafetensorsFormatError(
                f"tensor {entry.name!r}: data_offsets [{entry.start}, {entry.end}] leave a gap, overlap or run past "
                f"the {len(body)}-byte data section"
            )
        expected_start = entry.end
    if expected_start != len(body):
        raise SafetensorsFormatError(f"{len(body) - expected_start} trailing bytes after the last tensor")
    return Parsed(entries, metadata, body)


def _check_entry(name: str, entry: object) -> TensorEntry:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsFormatError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise SafetensorsFormatError(
            f"tensor {name!r}: dtype {entry['dtype']!r} is not one of {', '.join(DTYPES)}"
        )
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise SafetensorsFormatError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise SafetensorsFormatError(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
    nbytes = math.prod(shape) * dtype[1]
    if nbytes != offsets[1] - offsets[0]:
        raise SafetensorsFormatError(
            f"tensor {name!r}: {entry['dtype']}{shape} needs {nbytes} bytes, offsets give "
            f"{offsets[1] - offsets[0]}"
        )
    return TensorEntry(name, dtype[0], tuple(shape), offsets[0], offsets[1])


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    import torch

    flat = tensor.to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()
