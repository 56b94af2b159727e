"""KServe V2 / Open Inference Protocol (REST) for one image classifier: request bytes in, response bytes out.

Inputs: ``IMAGE`` (BYTES ``[B]`` or ``[B, 1]``, encoded images; base64 strings in JSON) or
``PIXELS`` (FP32 ``[B, 3, H, W]``, normalized). Output: ``PROBABILITIES`` (FP32 ``[B, C]``), or
with Triton's classification extension BYTES ``[B, k]`` of ``"score:index:label"``. Requests and
responses may use the binary tensor data extension or plain JSON, per tensor. Framework-free:
the HTTP layer hands over bytes and headers and sends back what this returns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import PayloadTooLarge, RequestError, UnsupportedMediaType
from service.protocols.v2_tensors import (
    HEADER_LENGTH,
    base64_elements,
    binary_section,
    brief,
    classifications,
    flat_data,
    json_kind,
    json_numbers,
    lower_keys,
    pack_bytes,
    require_finite,
    split_body,
    unpack_bytes,
    unpack_fp32,
)

INPUTS = {"IMAGE": "BYTES", "PIXELS": "FP32"}
OUTPUT = "PROBABILITIES"
EXTENSIONS = ("binary_tensor_data", "classification")


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
    timeout_us: int | None = None  # parameters.timeout, as Triton's: answer within this many microseconds

    @property
    def timeout_s(self) -> float | None:
        return self.timeout_us / 1e6 if self.timeout_us else None

    @property
    def batch_size(self) -> int:
        return len(self.images) if self.images is not None else int(self.pixels.shape[0])


def parse_infer_request(body: bytes, headers: Mapping[str, str], *, max_elements: int, max_batch: int) -> InferRequest:
    """A V2 inference request (JSON, or JSON + binary tensor data) -> InferRequest.

    Raises RequestError (400) for a malformed request; PayloadTooLarge (413) when the batch passes
    ``max_batch`` or the input passes ``max_elements`` elements (checked from the shape, before any
    data is decoded); UnsupportedMediaType (415) for a compressed body.
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
    request_id, outputs, timeout_us = _request_id(doc), _requested_outputs(doc), _timeout_us(doc)
    section = _input_section(name, tensor, tail)
    if name == "IMAGE":
        return InferRequest(request_id, _images(tensor, shape[0], section), None, outputs, timeout_us)
    return InferRequest(request_id, None, _pixels(tensor, shape, section), outputs, timeout_us)


def _load_object(header: bytes) -> dict:
    def reject(constant: str) -> float:
        raise ValueError(f"{constant} is not a JSON number")

    try:
        doc = json.loads(header, parse_constant=reject)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(f"request body is not valid JSON: {exc}", reason="not_json") from None
    if not isinstance(doc, dict):
        raise RequestError(f"request body must be a JSON object, found {json_kind(doc)}", reason="not_json")
    return doc


def _single_input(doc: dict) -> dict:
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(f"'inputs' must be a non-empty array, found {brief(inputs)}", reason="no_inputs")
    if len(inputs) != 1:
        raise RequestError(f"expected exactly 1 input (IMAGE or PIXELS), found {len(inputs)}", reason="too_many_inputs")
    if not isinstance(inputs[0], dict):
        raise RequestError(f"an input must be a JSON object, found {json_kind(inputs[0])}", reason="input")
    return inputs[0]


def _input_signature(tensor: dict) -> tuple[str, list[int]]:
    name = tensor.get("name")
    if not isinstance(name, str) or name not in INPUTS:
        raise RequestError(f"unknown input {brief(name)}: expected IMAGE or PIXELS", reason="unknown_input")
    if tensor.get("datatype") != INPUTS[name]:
        found = brief(tensor.get("datatype"))
        raise RequestError(f"input {name} must have datatype {INPUTS[name]}, found {found}", reason="datatype")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise RequestError(
            f"shape of input {name} must be an array of non-negative integers, found {brief(shape)}", reason="shape"
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
        raise RequestError(f"parameters of input {name} must be an object, found {json_kind(params)}", reason="input")
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
    data = flat_data(tensor["data"], "IMAGE")
    if len(data) != batch:
        raise RequestError(f"shape of input IMAGE says {batch} elements, its data holds {len(data)}", reason="shape")
    return base64_elements(data, "IMAGE")


def _pixels(tensor: dict, shape: list[int], section: memoryview | None) -> np.ndarray:
    count = math.prod(shape)
    if section is not None:
        flat = unpack_fp32(section, count, "PIXELS")
    else:
        data = flat_data(tensor["data"], "PIXELS")
        if len(data) != count:
            raise RequestError(
                f"shape of input PIXELS needs {count} elements, its data holds {len(data)}", reason="shape"
            )
        flat = json_numbers(data, "PIXELS")
    require_finite(flat, "PIXELS")
    return flat.reshape(shape)


def _requested_outputs(doc: dict) -> tuple[RequestedOutput, ...]:
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError(f"request parameters must be an object, found {json_kind(params)}", reason="parameters")
    default_binary = _flag(params, "binary_data_output", False, "request parameters")
    outputs = doc.get("outputs")
    if outputs is None or outputs == []:
        return (RequestedOutput(OUTPUT, default_binary, 0),)
    if not isinstance(outputs, list):
        raise RequestError(f"'outputs' must be an array, found {json_kind(outputs)}", reason="outputs")
    if len(outputs) > 1:
        raise RequestError(f"expected at most 1 output ({OUTPUT}), found {len(outputs)}", reason="outputs")
    name = outputs[0].get("name") if isinstance(outputs[0], dict) else None
    if name != OUTPUT:
        raise RequestError(
            f"unknown output {brief(name)}: this model has one output, {OUTPUT}", reason="unknown_output"
        )
    out_params = outputs[0].get("parameters", {})
    if not isinstance(out_params, dict) or "shared_memory_region" in out_params:
        raise RequestError(f"parameters of output {OUTPUT} must be an object, without shared memory", reason="outputs")
    k = out_params.get("classification", 0)
    if type(k) is not int or k < 0:
        raise RequestError(f"classification must be a non-negative integer, found {brief(k)}", reason="outputs")
    # the output's own binary_data wins over the request-wide binary_data_output, as in Triton
    return (RequestedOutput(OUTPUT, _flag(out_params, "binary_data", default_binary, f"output {OUTPUT}"), k),)


def _timeout_us(doc: dict) -> int | None:
    """parameters.timeout: microseconds to answer within (0 or absent: the server's --timeout-s)."""
    value = doc.get("parameters", {}).get("timeout")
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise RequestError(f"parameters.timeout must be a non-negative integer (microseconds), found {brief(value)}",
                           reason="parameters")
    return value or None


def _flag(params: dict, key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if type(value) is not bool:
        raise RequestError(f"{key} in {where} must be true or false, found {brief(value)}", reason="parameters")
    return value


def _request_id(doc: dict) -> str | None:
    value = doc.get("id")
    if value is not None and not isinstance(value, str):
        raise RequestError(f"request 'id' must be a string, found {json_kind(value)}", reason="id")
    return value


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request: InferRequest,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    parameters: Mapping[str, object],
) -> tuple[bytes, dict[str, str]]:
    """The V2 response body for ``probabilities`` (``[B, C]``) and its headers.

    Outputs follow ``request.outputs``. When any is binary the body is the JSON header plus the
    binary data, with ``Content-Type: application/octet-stream`` and Inference-Header-Content-Length;
    otherwise it is JSON alone. ``class_names`` is empty (no labels) or has C names. Raises
    ValueError (a server bug, not a client error) when the shapes disagree.
    """
    probs = np.ascontiguousarray(probabilities, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[0] != request.batch_size or len(class_names) not in (0, probs.shape[1]):
        raise ValueError(
            f"probabilities of shape {probs.shape} do not fit a batch of {request.batch_size}"
            f" and {len(class_names)} class names"
        )
    tensors = [_output_tensor(output, probs, class_names) for output in request.outputs]
    doc: dict[str, object] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    doc["parameters"] = dict(parameters)
    doc["outputs"] = [tensor for tensor, _ in tensors]
    header = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()  # ASCII: len is the byte count
    blobs = [blob for _, blob in tensors if blob is not None]
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def _output_tensor(output: RequestedOutput, probs: np.ndarray, class_names: Sequence[str]) -> tuple[dict, bytes | None]:
    if output.classification:
        strings = classifications(probs, output.classification, class_names)
        tensor = {"name": output.name, "datatype": "BYTES", "shape": [probs.shape[0], len(strings) // probs.shape[0]]}
        blob = pack_bytes(text.encode() for text in strings) if output.binary else None
        data: list = strings
    else:
        tensor = {"name": output.name, "datatype": "FP32", "shape": list(probs.shape)}
        blob = probs.astype("<f4").tobytes() if output.binary else None
        data = probs.ravel().tolist()  # float32 -> float is exact, so clients read back the same bits
    if blob is None:
        tensor["data"] = data
    else:
        tensor["parameters"] = {"binary_data_size": len(blob)}
    return tensor, blob


def server_metadata(*, version: str) -> dict:
    """GET /v2: the server's name, version and supported protocol extensions."""
    return {"name": "headswap", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(*, name: str, versions: Sequence[str], num_classes: int, input_size: int) -> dict:
    """GET /v2/models/{name}: the model's inputs (IMAGE or PIXELS, batch first) and output."""
    return {
        "name": name,
        "versions": list(versions),
        "platform": "pytorch_torchvision",
        "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [-1]},
            {"name": "PIXELS", "datatype": "FP32", "shape": [-1, 3, input_size, input_size]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, num_classes]}],
    }
