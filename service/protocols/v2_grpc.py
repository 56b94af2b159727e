"""KServe V2 / Open Inference Protocol over gRPC: protobuf messages in, the same typed requests as REST out.

``parse_model_infer`` turns a ``ModelInferRequest`` into the ``v2.InferRequest`` the REST side
builds, with the same checks (``v2.check_input``: name, datatype, shape and limits before any data
is read). An input's data is its ``raw_input_contents`` entry (what tritonclient sends: little-endian,
row-major; BYTES elements length-prefixed) or its typed ``contents`` (``bytes_contents``,
``fp32_contents``), exactly one of them. The answer mirrors the request: raw contents for a raw
input, typed contents otherwise (an output's ``binary_data`` parameter chooses). Framework-free:
the gRPC layer hands over messages and sends back what this returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from service.errors import RequestError
from service.protocols.grpc_v2 import open_inference_pb2 as pb
from service.protocols.v2 import OUTPUT, InferRequest, RequestedOutput, check_input, check_output
from service.protocols.v2_tensors import (
    brief,
    classifications,
    pack_bytes,
    require_finite,
    unpack_bytes,
    unpack_fp32,
)

Scalar = str | int | float | bool


def parse_model_infer(request: pb.ModelInferRequest, *, max_batch: int, max_elements: int) -> InferRequest:
    """A ``ModelInferRequest`` -> InferRequest. Raises RequestError (INVALID_ARGUMENT) for a malformed
    request, PayloadTooLarge (RESOURCE_EXHAUSTED) over ``max_batch`` images or ``max_elements`` elements."""
    if len(request.inputs) != 1:
        raise RequestError(f"expected exactly 1 input (IMAGE or PIXELS), found {len(request.inputs)}",
                           reason="too_many_inputs")
    tensor = request.inputs[0]
    shape = list(tensor.shape)
    check_input(tensor.name, tensor.datatype, shape, max_batch=max_batch, max_elements=max_elements)
    if "shared_memory_region" in tensor.parameters:
        raise RequestError("the shared memory extension is not supported: send the data in the message", reason="shm")
    raw = _raw_section(request, tensor)
    data = _images(tensor, shape[0], raw) if tensor.name == "IMAGE" else _pixels(tensor, shape, raw)
    images, pixels = (data, None) if isinstance(data, list) else (None, data)
    outputs = _requested_outputs(request, raw_default=raw is not None)
    return InferRequest(request.id or None, images, pixels, outputs, _timeout_us(request.parameters))


def _raw_section(request: pb.ModelInferRequest, tensor: pb.ModelInferRequest.InferInputTensor) -> memoryview | None:
    """The input's ``raw_input_contents`` entry; None when it sends typed contents instead."""
    if not request.raw_input_contents:
        return None
    if len(request.raw_input_contents) != 1:
        raise RequestError(f"raw_input_contents holds {len(request.raw_input_contents)} entries for 1 input",
                           reason="raw_contents")
    if tensor.HasField("contents"):
        raise RequestError(f"input {tensor.name} has both contents and raw_input_contents: send one",
                           reason="data_and_binary")
    return memoryview(request.raw_input_contents[0])


def _images(tensor: pb.ModelInferRequest.InferInputTensor, batch: int, raw: memoryview | None) -> list[bytes]:
    if raw is not None:
        return unpack_bytes(raw, "IMAGE", batch)
    items = list(tensor.contents.bytes_contents)
    if len(items) != batch:
        raise RequestError(f"shape of input IMAGE says {batch} elements, contents.bytes_contents holds {len(items)}",
                           reason="shape")
    return items


def _pixels(tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int], raw: memoryview | None) -> np.ndarray:
    count = math.prod(shape)
    if raw is not None:
        flat = unpack_fp32(raw, count, "PIXELS")
    else:
        values = tensor.contents.fp32_contents
        if len(values) != count:
            raise RequestError(f"shape of input PIXELS needs {count} elements, contents.fp32_contents holds "
                               f"{len(values)}", reason="shape")
        flat = np.array(values, dtype=np.float32)
    require_finite(flat, "PIXELS")
    return flat.reshape(shape)


def _requested_outputs(request: pb.ModelInferRequest, *, raw_default: bool) -> tuple[RequestedOutput, ...]:
    if not request.outputs:
        return (RequestedOutput(OUTPUT, raw_default, 0),)
    if len(request.outputs) > 1:
        raise RequestError(f"expected at most 1 output ({OUTPUT}), found {len(request.outputs)}", reason="outputs")
    output = request.outputs[0]
    params = output.parameters
    classification = _integer(params, "classification", f"output {OUTPUT}") if "classification" in params else 0
    check_output(output.name, classification)
    binary = raw_default
    if "binary_data" in params:
        if params["binary_data"].WhichOneof("parameter_choice") != "bool_param":
            raise RequestError(f"parameters.binary_data of output {OUTPUT} must be a bool_param", reason="outputs")
        binary = params["binary_data"].bool_param
    return (RequestedOutput(OUTPUT, binary, classification),)


def _timeout_us(parameters: Mapping[str, pb.InferParameter]) -> int | None:
    """``parameters["timeout"]`` in microseconds, as Triton's (None or 0: none)."""
    if "timeout" not in parameters:
        return None
    timeout = _integer(parameters, "timeout", "the request")
    if timeout < 0:
        raise RequestError(f"parameters.timeout must be 0 or more microseconds, found {timeout}", reason="parameters")
    return timeout or None


def _integer(parameters: Mapping[str, pb.InferParameter], key: str, owner: str) -> int:
    value = parameters[key]
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise RequestError(f"parameters.{key} of {owner} must be an int64_param, found {brief(kind)}",
                           reason="parameters")
    return int(getattr(value, kind))


def encode_model_infer(*, model_name: str, model_version: str, request: InferRequest, probabilities: np.ndarray,
                       class_names: Sequence[str], parameters: Mapping[str, Scalar]) -> pb.ModelInferResponse:
    """The ``ModelInferResponse`` for ``probabilities`` (``[B, C]``): each requested output as raw contents
    (``binary``) or typed contents; a classification output as BYTES ``[B, k]`` of ``score:index:label``.
    Raises ValueError (a server bug) when the shapes disagree."""
    probs = np.ascontiguousarray(probabilities, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[0] != request.batch_size or len(class_names) not in (0, probs.shape[1]):
        raise ValueError(f"probabilities of shape {probs.shape} do not fit a batch of {request.batch_size}"
                         f" and {len(class_names)} class names")
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request.id or "")
    set_parameters(response.parameters, parameters)
    for output in request.outputs:
        tensor = response.outputs.add(name=output.name)
        if output.classification:
            strings = [text.encode() for text in classifications(probs, output.classification, class_names)]
            tensor.datatype, tensor.shape[:] = "BYTES", [probs.shape[0], len(strings) // probs.shape[0]]
            if output.binary:
                response.raw_output_contents.append(pack_bytes(strings))
            else:
                tensor.contents.bytes_contents.extend(strings)
        else:
            tensor.datatype, tensor.shape[:] = "FP32", list(probs.shape)
            if output.binary:
                response.raw_output_contents.append(probs.astype("<f4").tobytes())
            else:
                tensor.contents.fp32_contents.extend(probs.ravel().tolist())
    return response


def set_parameters(target: Mapping[str, pb.InferParameter], values: Mapping[str, Scalar]) -> None:
    """Fill a protobuf parameter map: each value as its kind's field."""
    for key, value in values.items():
        param = target[key]  # type: ignore[index]  # a protobuf map creates the entry
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = str(value)


def server_metadata(doc: Mapping) -> pb.ServerMetadataResponse:
    """``v2.server_metadata()`` as its message."""
    return pb.ServerMetadataResponse(name=doc["name"], version=doc["version"], extensions=doc["extensions"])


def model_metadata(doc: Mapping) -> pb.ModelMetadataResponse:
    """``v2.model_metadata()`` as its message."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=doc["name"], versions=doc["versions"], platform=doc["platform"],
        inputs=[tensor(**t) for t in doc["inputs"]], outputs=[tensor(**t) for t in doc["outputs"]])


def repository_index(entries: Sequence[Mapping[str, str]]) -> pb.RepositoryIndexResponse:
    """``control.repository.Repository.index()`` as its message."""
    return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])


def repository_config(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> str | None:
    """A load's ``config`` parameter (JSON text; None: absent). Raises RequestError for a config of another
    kind, or for model files sent in the request (the checkpoint store is where checkpoints come from)."""
    files = sorted(key for key in parameters if key.startswith("file:"))
    if files:
        raise RequestError(f"model files in the request ({brief(files[0])}) are not supported: put the checkpoint "
                           "in the checkpoint store and name it in parameters.config", reason="body")
    if "config" not in parameters:
        return None
    config = parameters["config"]
    if config.WhichOneof("parameter_choice") != "string_param":
        raise RequestError("parameters.config must be a string_param: JSON text {\"checkpoint\": ..., \"merges\": [...]}",
                           reason="body")
    return config.string_param
