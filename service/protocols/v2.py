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

from pydantic import ValidationError

from service.errors import PayloadTooLarge, RequestError, UnsupportedMediaType
from service.protocols import v2_models
from service.protocols.v2_tensors import (
    HEADER_LENGTH,
    brief,
    classifications,
    lower_keys,
    pack_bytes,
    read_input,
    split_body,
)
from service.protocols.wire import explain, load_object

INPUTS = {"IMAGE": "BYTES", "PIXELS": "FP32"}
OUTPUT = "PROBABILITIES"
EXTENSIONS = ("binary_tensor_data", "classification")
# The limits of one request, over HTTP and gRPC alike:
MAX_BATCH = 64                            # images in one request
MAX_ELEMENTS = MAX_BATCH * 3 * 512 * 512  # PIXELS numbers in one request
BODY_FACTOR = 4                           # a request may hold several images: its body (message) up to 4x --max-image-bytes


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

    @property
    def top_k(self) -> int:
        """How many top classes each answer needs: the largest classification asked for, at least 1."""
        return max([o.classification for o in self.outputs] + [1])


def parse_infer_request(body: bytes, headers: Mapping[str, str], *, max_elements: int, max_batch: int) -> InferRequest:
    """A V2 inference request (JSON, or JSON + binary tensor data) -> InferRequest.

    The JSON header is checked once against ``v2_models.InferenceRequest``; then the one input's
    name, datatype and shape, the limits (from the shape, before any data is decoded) and the
    requested output; then ``v2_tensors.read_input`` decodes the data. Raises RequestError (400)
    for a malformed request; PayloadTooLarge (413) when the batch passes ``max_batch`` or the input
    passes ``max_elements`` elements; UnsupportedMediaType (415) for a compressed body.
    """
    lowered = lower_keys(headers)
    encoding = lowered.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported: send the body uncompressed", reason="content_encoding"
        )
    header, tail = split_body(body, lowered)
    doc = _header(header)
    if len(doc.inputs) != 1:
        raise RequestError(f"expected exactly 1 input (IMAGE or PIXELS), found {len(doc.inputs)}", reason="too_many_inputs")
    tensor = doc.inputs[0]
    check_input(tensor.name, tensor.datatype, tensor.shape, max_batch=max_batch, max_elements=max_elements)
    outputs = _requested_outputs(doc)
    data = read_input(tensor.name, tensor.shape, tensor.parameters.model_dump(), tensor.data,
                      has_data="data" in tensor.model_fields_set, tail=tail)
    images, pixels = (data, None) if isinstance(data, list) else (None, data)
    return InferRequest(doc.id, images, pixels, outputs, doc.parameters.timeout or None)


def _header(header: bytes) -> v2_models.InferenceRequest:
    doc = load_object(header)
    try:
        return v2_models.InferenceRequest.model_validate(doc)
    except ValidationError as exc:
        reason = _reason(exc.errors()[0]["loc"])
        raise RequestError(explain(exc, v2_models.InferenceRequest), reason=reason) from None


def _reason(loc: tuple) -> str:
    """The metrics label of a header refusal at ``loc``."""
    if loc[:1] != ("inputs",):
        return {"outputs": "outputs", "parameters": "parameters", "id": "id"}.get(loc[0] if loc else "", "invalid")
    if len(loc) < 3:
        return "no_inputs" if len(loc) == 1 else "input"
    return {"name": "unknown_input", "datatype": "datatype", "shape": "shape"}.get(loc[2], "input")


def check_input(name: str, datatype: str, shape: Sequence[int], *, max_batch: int, max_elements: int) -> None:
    """The one input's name, datatype and shape, then the limits (from the shape, before any data is read).
    Raises RequestError (400), or PayloadTooLarge (413) over ``max_batch`` images or ``max_elements`` elements."""
    shape = list(shape)
    if name not in INPUTS:
        raise RequestError(f"unknown input {brief(name)}: expected IMAGE or PIXELS", reason="unknown_input")
    if datatype != INPUTS[name]:
        raise RequestError(f"input {name} must have datatype {INPUTS[name]}, found {brief(datatype)}",
                           reason="datatype")
    if any(size < 0 for size in shape):
        raise RequestError(f"shape of input {name} must be non-negative integers, found {shape}", reason="shape")
    if name == "IMAGE" and not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise RequestError(f"IMAGE shape must be [B] or [B, 1], found {shape}", reason="shape")
    if name == "PIXELS" and (len(shape) != 4 or shape[1] != 3 or 0 in shape[2:]):
        raise RequestError(f"PIXELS shape must be [B, 3, H, W] with H, W >= 1, found {shape}", reason="shape")
    if shape[0] < 1:
        raise RequestError(f"batch size of input {name} must be at least 1, found shape {shape}", reason="shape")
    if shape[0] > max_batch:
        raise PayloadTooLarge(f"batch of {shape[0]} is over the limit of {max_batch}", reason="batch_too_large")
    elements = math.prod(shape)
    if elements > max_elements:
        raise PayloadTooLarge(
            f"input {name} of shape {shape} has {elements} elements, over the limit of {max_elements}",
            reason="too_many_elements",
        )


def check_image_sizes(images: Sequence[bytes] | None, max_image_bytes: int) -> None:
    """Raises PayloadTooLarge (413) for an IMAGE element over ``max_image_bytes``."""
    for data in images or ():
        if len(data) > max_image_bytes:
            raise PayloadTooLarge(f"an IMAGE element is {len(data)} bytes, over the limit of {max_image_bytes}",
                                  reason="too_large")


def check_output(name: str, classification: int) -> None:
    """A requested output: PROBABILITIES, with a classification top-k of 0 (the tensor) or more. Raises RequestError."""
    if name != OUTPUT:
        raise RequestError(f"unknown output {brief(name)}: this model has one output, {OUTPUT}", reason="unknown_output")
    if classification < 0:
        raise RequestError(f"parameters.classification of output {OUTPUT} must be 0 or more, found {classification}",
                           reason="outputs")


def _requested_outputs(doc: v2_models.InferenceRequest) -> tuple[RequestedOutput, ...]:
    default_binary = doc.parameters.binary_data_output
    if not doc.outputs:
        return (RequestedOutput(OUTPUT, default_binary, 0),)
    if len(doc.outputs) > 1:
        raise RequestError(f"expected at most 1 output ({OUTPUT}), found {len(doc.outputs)}", reason="outputs")
    output = doc.outputs[0]
    check_output(output.name, output.parameters.classification)
    params = output.parameters
    if "shared_memory_region" in params.model_fields_set | set(params.model_extra or {}):
        raise RequestError(f"parameters of output {OUTPUT} must be an object, without shared memory", reason="outputs")
    # the output's own binary_data wins over the request-wide binary_data_output, as in Triton
    binary = default_binary if params.binary_data is None else params.binary_data
    return (RequestedOutput(OUTPUT, binary, params.classification),)


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
    # v2_models.InferenceResponse describes this header; it is built as plain data (a batch's
    # probabilities can be thousands of floats) and held to the model by the protocol tests.
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
    return v2_models.ServerMetadata(name="headswap", version=version, extensions=list(EXTENSIONS)).model_dump()


def model_metadata(*, name: str, versions: Sequence[str], num_classes: int, input_size: int) -> dict:
    """GET /v2/models/{name}: the model's inputs (IMAGE or PIXELS, batch first) and output."""
    tensor = v2_models.TensorMetadata
    return v2_models.ModelMetadata(
        name=name, versions=list(versions), platform="pytorch_torchvision",
        inputs=[tensor(name="IMAGE", datatype="BYTES", shape=[-1]),
                tensor(name="PIXELS", datatype="FP32", shape=[-1, 3, input_size, input_size])],
        outputs=[tensor(name=OUTPUT, datatype="FP32", shape=[-1, num_classes])],
    ).model_dump()
