"""KServe V2 / Open Inference Protocol (REST) for one image classifier: request bytes in, response bytes out.

Inputs: ``IMAGE`` (BYTES ``[B]`` or ``[B, 1]``, encoded images; base64 strings in JSON) or
``PIXELS`` (FP32 ``[B, 3, H, W]``, normalized). Output: ``PROBABILITIES`` (FP32 ``[B, C]``),
or with Triton's classification extension BYTES ``[B, k]`` of ``"score:index:label"``.
Both the binary tensor data extension and plain JSON are read and written. Framework-free:
the HTTP layer hands over bytes and headers and sends back what this returns.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import PayloadTooLarge, RequestError, UnsupportedMediaType
from service.v2_binary import HEADER_LENGTH, binary_section, lower_keys, pack_bytes, split_body, unpack_bytes
from service.v2_binary import unpack_fp32

INPUTS = {"IMAGE": "BYTES", "PIXELS": "FP32"}
OUTPUT = "PROBABILITIES"
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0  # top-k as "score:index:label" strings; 0 = the raw tensor


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields has no single truth value
class InferRequest:
    id: str | None
    images: list[bytes] | None  # IMAGE input, one encoded image per batch element
    pixels: np.ndarray | None  # PIXELS input, float32 [B, 3, H, W]
    outputs: tuple[RequestedOutput, ...]

    @property
    def batch_size(self) -> int:
        return len(self.images) if self.images is not None else int(self.pixels.shape[0])


def parse_infer_request(
    body: bytes, headers: Mapping[str, str], *, max_elements: int, max_batch: int
) -> InferRequest:
    """A V2 inference request body (JSON, or JSON + binary tensor data) -> InferRequest.

    Raises RequestError (400) for any malformed request, PayloadTooLarge (413) when the batch
    passes ``max_batch`` or the input passes ``max_elements`` elements (checked from the shape,
    before any data is decoded), UnsupportedMediaType (415) for a compressed body.
    """
    lowered = lower_keys(headers)
    encoding = lowered.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported: send the body uncompressed", reason="content_encoding"
        )
    header, tail = split_body(body, lowered)
    doc = _load_object(header)
    tensor = _single_input(doc)
    name, shape = _input_signature(tensor)
    _check_limits(name, shape, max_batch=max_batch, max_elements=max_elements)
    outputs = _requested_outputs(doc)
    section = _input_section(name, tensor, tail)
    if name == "IMAGE":
        return InferRequest(_request_id(doc), _images(tensor, shape[0], section), None, outputs)
    return InferRequest(_request_id(doc), None, _pixels(tensor, shape, section), outputs)


def _load_object(header: bytes) -> dict:
    def reject(constant: str) -> float:
        raise ValueError(f"{constant} is not a JSON number")

    try:
        doc = json.loads(header, parse_constant=reject)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(f"request body is not valid JSON: {exc}", reason="not_json") from None
    if not isinstance(doc, dict):
        raise RequestError(f"request body must be a JSON object, found {_kind(doc)}", reason="not_json")
    return doc


def _single_input(doc: dict) -> dict:
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(f"'inputs' must be a non-empty array, found {_brief(inputs)}", reason="no_inputs")
    if len(inputs) != 1:
        raise RequestError(
            f"expected exactly 1 input (IMAGE or PIXELS), found {len(inputs)}", reason="too_many_inputs"
        )
    if not isinstance(inputs[0], dict):
        raise RequestError(f"an input must be a JSON object, found {_kind(inputs[0])}", reason="input")
    return inputs[0]


def _input_signature(tensor: dict) -> tuple[str, list[int]]:
    name = tensor.get("name")
    if not isinstance(name, str) or name not in INPUTS:
        raise RequestError(f"unknown input {_brief(name)}: expected IMAGE or PIXELS", reason="unknown_input")
    if tensor.get("datatype") != INPUTS[name]:
        raise RequestError(
            f"input {name} must have datatype {INPUTS[name]}, found {_brief(tensor.get('datatype'))}",
            reason="datatype",
        )
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise RequestError(
            f"shape of input {name} must be an array of non-negative integers, found {_brief(shape)}", reason="shape"
        )
    if name == "IMAGE" and not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise RequestError(f"IMAGE shape must be [B] or [B, 1], found {shape}", reason="shape")
    if name == "PIXELS" and (len(shape) != 4 or shape[1] != 3 or 0 in shape[2:]):
        raise RequestError(f"PIXELS shape must be [B, 3, H, W] with H, W >= 1, found {shape}", reason="shape")
    if shape[0] < 1:
        raise RequestError(f"batch size of input {name} must be at least 1, found shape {shape}", reason="shape")
    return name, shape


def _check_limits(name: str, shape: list[int], *, max_batch: int, max_elements: int) -> None:
    if shape[0] > max_batch:
        raise PayloadTooLarge(f"batch of {shape[0]} is over the limit of {max_batch}", reason="batch_too_large")
    elements = math.prod(shape)
    if elements > max_elements:
        raise PayloadTooLarge(
            f"input {name} of shape {shape} has {elements} elements, over the limit of {max_elements}",
            reason="too_many_elements",
        )


def _input_section(name: str, tensor: dict, tail: memoryview) -> memoryview | None:
    """The input's binary data, or None when it comes as JSON ``data``."""
    params = tensor.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError(f"parameters of input {name} must be an object, found {_kind(params)}", reason="input")
    if "shared_memory_region" in params:
        raise RequestError("the shared memory extension is not supported: send the data in the body", reason="shm")
    if "binary_data_size" in params:
        if "data" in tensor:
            raise RequestError(
                f"input {name} has both 'data' and parameters.binary_data_size: send one", reason="data_and_binary"
            )
        return binary_section(tail, params["binary_data_size"], name)
    if "data" not in tensor:
        raise RequestError(f"input {name} has neither 'data' nor parameters.binary_data_size", reason="no_data")
    if len(tail):
        raise RequestError(
            f"binary sections add up to 0 bytes but {len(tail)} bytes follow the JSON header", reason="binary_trailing"
        )
    return None


def _images(tensor: dict, batch: int, section: memoryview | None) -> list[bytes]:
    if section is not None:
        return unpack_bytes(section, "IMAGE", batch)
    data = _flat_data(tensor, "IMAGE")
    if len(data) != batch:
        raise RequestError(f"IMAGE shape says {batch} elements, its data holds {len(data)}", reason="shape")
    return [_b64decode(text, index) for index, text in enumerate(data)]


def _b64decode(text: object, index: int) -> bytes:
    if not isinstance(text, str):
        raise RequestError(f"IMAGE element {index} must be a base64 string, found {_kind(text)}", reason="base64")
    try:  # whitespace is dropped: base64 tools wrap lines at 76 columns
        return base64.b64decode("".join(text.split()), validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII text
        raise RequestError(f"IMAGE element {index} is not valid base64: {exc}", reason="base64") from None


def _pixels(tensor: dict, shape: list[int], section: memoryview | None) -> np.ndarray:
    count = math.prod(shape)
    if section is not None:
        flat = unpack_fp32(section, count, "PIXELS")
    else:
        flat = _numbers(_flat_data(tensor, "PIXELS"), count)
    if not np.isfinite(flat).all():
        index = int(np.flatnonzero(~np.isfinite(flat))[0])
        raise RequestError(f"PIXELS element {index} is {flat[index]}, expected a finite number", reason="not_finite")
    return flat.reshape(shape)


def _numbers(values: list, count: int) -> np.ndarray:
    if len(values) != count:
        raise RequestError(f"PIXELS shape needs {count} elements, its data holds {len(values)}", reason="shape")
    bad = next((i for i, value in enumerate(values) if type(value) not in (int, float)), None)
    if bad is not None:
        raise RequestError(
            f"PIXELS element {bad} is {_kind(values[bad])} {_brief(values[bad])}, expected a number", reason="not_number"
        )
    try:
        with np.errstate(over="ignore"):  # out-of-range values become inf and are refused by the caller
            return np.array(values, dtype=np.float64).astype(np.float32)
    except OverflowError:  # an integer literal past float64's range
        return np.array([np.inf], dtype=np.float32)


def _flat_data(tensor: dict, name: str) -> list:
    """The ``data`` array flattened in row-major order (V2 allows flat or nested)."""
    data = tensor["data"]
    if not isinstance(data, list):
        raise RequestError(f"'data' of input {name} must be an array, found {_kind(data)}", reason="data")
    if not any(type(item) is list for item in data):
        return data
    flat: list = []
    stack = [iter(data)]
    while stack:  # iterative: nesting depth is the client's choice
        for item in stack[-1]:
            if type(item) is list:
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _requested_outputs(doc: dict) -> tuple[RequestedOutput, ...]:
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError(f"request parameters must be an object, found {_kind(params)}", reason="parameters")
    default_binary = _flag(params, "binary_data_output", False, "request parameters")
    outputs = doc.get("outputs")
    if outputs is None or outputs == []:
        return (RequestedOutput(OUTPUT, default_binary, 0),)
    if not isinstance(outputs, list):
        raise RequestError(f"'outputs' must be an array, found {_kind(outputs)}", reason="outputs")
    if len(outputs) > 1:
        raise RequestError(f"expected at most 1 output ({OUTPUT}), found {len(outputs)}", reason="outputs")
    entry = outputs[0]
    name = entry.get("name") if isinstance(entry, dict) else None
    if name != OUTPUT:
        raise RequestError(f"unknown output {_brief(name)}: this model has one output, {OUTPUT}", reason="unknown_output")
    out_params = entry.get("parameters", {})
    if not isinstance(out_params, dict) or "shared_memory_region" in out_params:
        raise RequestError(f"parameters of output {OUTPUT} must be an object without shared memory", reason="outputs")
    k = out_params.get("classification", 0)
    if type(k) is not int or k < 0:
        raise RequestError(f"classification must be a non-negative integer, found {_brief(k)}", reason="outputs")
    # an output's own binary_data wins over the request-wide default, as in Triton
    return (RequestedOutput(OUTPUT, _flag(out_params, "binary_data", default_binary, f"output {OUTPUT}"), k),)


def _flag(params: dict, key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if type(value) is not bool:
        raise RequestError(f"{key} in {where} must be true or false, found {_brief(value)}", reason="parameters")
    return value


def _request_id(doc: dict) -> str | None:
    value = doc.get("id")
    if value is not None and not isinstance(value, str):
        raise RequestError(f"request 'id' must be a string, found {_kind(value)}", reason="id")
    return value


def _kind(value: object) -> str:
    return _JSON_TYPES.get(type(value), "null" if value is None else type(value).__name__)


def _brief(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
