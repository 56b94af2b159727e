"""The V2 protocol over gRPC, without a server: the vendored proto against tritonclient's, and the
conversions between its messages and the REST side's typed requests."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from service.errors import PayloadTooLarge, RequestError
from service.protocols import status, v2_grpc
from service.protocols.grpc_v2 import health_pb2
from service.protocols.grpc_v2 import open_inference_pb2 as pb
from service.protocols.v2 import MAX_BATCH, MAX_ELEMENTS, classifications
from service.protocols.v2_tensors import pack_bytes

LIMITS = {"max_batch": MAX_BATCH, "max_elements": MAX_ELEMENTS}


def _layout(descriptor: Descriptor) -> dict:
    """A message's wire layout: field numbers, names, types, repetition and nested layouts."""
    fields = {f.number: (f.name, f.type, f.is_repeated, f.message_type.full_name if f.message_type else None,
                         f.containing_oneof.name if f.containing_oneof else None) for f in descriptor.fields}
    nested = {n.name: _layout(n) for n in descriptor.nested_types}
    return {"fields": fields, "nested": nested}


def test_the_vendored_proto_has_triton_s_wire_layout_for_every_message_and_call() -> None:
    """tritonclient's own generated messages are the reference: every message and call we serve has
    exactly its field numbers and types, so its clients (and perf_analyzer) read and write ours."""
    ours, theirs = pb.DESCRIPTOR, triton.service_pb2.DESCRIPTOR
    assert ours.package == theirs.package == "inference"
    assert len(ours.message_types_by_name) == 22
    for name, message in ours.message_types_by_name.items():
        assert _layout(message) == _layout(theirs.message_types_by_name[name]), name
    service, reference = ours.services_by_name["GRPCInferenceService"], theirs.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        other = reference.methods_by_name[method.name]
        assert (method.input_type.name, method.output_type.name, method.client_streaming, method.server_streaming) == \
            (other.input_type.name, other.output_type.name, other.client_streaming, other.server_streaming)
    assert {m.name for m in service.methods} == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelStreamInfer",
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}


def test_the_health_proto_is_grpc_s_standard_one() -> None:
    request, response = health_pb2.HealthCheckRequest.DESCRIPTOR, health_pb2.HealthCheckResponse.DESCRIPTOR
    assert request.full_name == "grpc.health.v1.HealthCheckRequest"
    assert [(f.number, f.name, f.type) for f in request.fields] == [(1, "service", FieldDescriptor.TYPE_STRING)]
    assert [(f.number, f.name, f.type) for f in response.fields] == [(1, "status", FieldDescriptor.TYPE_ENUM)]
    assert {v.name: v.number for v in response.enum_types_by_name["ServingStatus"].values} == {
        "UNKNOWN": 0, "SERVING": 1, "NOT_SERVING": 2, "SERVICE_UNKNOWN": 3}
    assert [m.name for m in health_pb2.DESCRIPTOR.services_by_name["Health"].methods] == ["Check", "Watch"]


def test_every_error_type_has_a_grpc_code_that_exists() -> None:
    import grpc

    for kind, entry in status.STATUS.items():
        assert grpc.StatusCode[entry.grpc], kind
    assert status.status_for(ValueError) == status.UNEXPECTED == status.Status(500, "INTERNAL")


def _request(name: str = "IMAGE", datatype: str = "BYTES", shape: tuple[int, ...] = (2,), **fields: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id="r7", **fields)
    request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    return request


def test_raw_bytes_in_raw_probabilities_out() -> None:
    """What tritonclient sends: length-prefixed BYTES in raw_input_contents; the answer is raw too."""
    request = _request(raw_input_contents=[pack_bytes([b"one", b"two!"])])
    parsed = v2_grpc.parse_model_infer(request, **LIMITS)
    assert parsed.images == [b"one", b"two!"] and parsed.id == "r7" and parsed.timeout_us is None
    probs = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    answer = v2_grpc.encode_model_infer(model_name="m", model_version="v1", request=parsed, probabilities=probs,
                                        class_names=["a", "b"], parameters={"slot": "stable", "batch_size": 2})
    assert (answer.model_name, answer.model_version, answer.id) == ("m", "v1", "r7")
    assert answer.parameters["slot"].string_param == "stable" and answer.parameters["batch_size"].int64_param == 2
    (output,) = answer.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("PROBABILITIES", "FP32", [2, 2])
    assert not output.HasField("contents")
    np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(2, 2), probs)


def test_typed_contents_in_typed_contents_out_and_classification() -> None:
    request = _request(shape=(1, 1))
    request.inputs[0].contents.bytes_contents.append(b"jpeg")
    request.parameters["timeout"].int64_param = 250_000
    output = request.outputs.add(name="PROBABILITIES")
    output.parameters["classification"].int64_param = 2
    parsed = v2_grpc.parse_model_infer(request, **LIMITS)
    assert parsed.images == [b"jpeg"] and parsed.timeout_s == 0.25 and parsed.top_k == 2
    probs = np.array([[0.1, 0.6, 0.3]], dtype=np.float32)
    answer = v2_grpc.encode_model_infer(model_name="m", model_version="v1", request=parsed, probabilities=probs,
                                        class_names=["a", "b", "c"], parameters={})
    (out,) = answer.outputs
    assert (out.datatype, list(out.shape)) == ("BYTES", [1, 2]) and not answer.raw_output_contents
    assert [s.decode() for s in out.contents.bytes_contents] == classifications(probs, 2, ["a", "b", "c"]) == [
        "0.600000:1:b", "0.300000:2:c"]


def test_pixels_raw_and_typed_read_the_same_tensor() -> None:
    pixels = np.random.default_rng(0).standard_normal((1, 3, 4, 5)).astype(np.float32)
    raw = v2_grpc.parse_model_infer(_request("PIXELS", "FP32", (1, 3, 4, 5), raw_input_contents=[pixels.tobytes()]), **LIMITS)
    typed_request = _request("PIXELS", "FP32", (1, 3, 4, 5))
    typed_request.inputs[0].contents.fp32_contents.extend(pixels.ravel().tolist())
    typed = v2_grpc.parse_model_infer(typed_request, **LIMITS)
    np.testing.assert_array_equal(raw.pixels, pixels)
    np.testing.assert_array_equal(typed.pixels, pixels)
    assert raw.outputs[0].binary and not typed.outputs[0].binary


def test_binary_data_parameter_chooses_the_answer_s_form() -> None:
    request = _request(raw_input_contents=[pack_bytes([b"a", b"b"])])
    request.outputs.add(name="PROBABILITIES").parameters["binary_data"].bool_param = False
    assert not v2_grpc.parse_model_infer(request, **LIMITS).outputs[0].binary


def _typed(request: pb.ModelInferRequest, *items: bytes) -> pb.ModelInferRequest:
    request.inputs[0].contents.bytes_contents.extend(items)
    return request


def _second_input(request: pb.ModelInferRequest) -> pb.ModelInferRequest:
    request.inputs.add(name="PIXELS", datatype="FP32", shape=[1, 3, 2, 2])
    return request


def _with_param(request: pb.ModelInferRequest, key: str, **kind: object) -> pb.ModelInferRequest:
    param = request.parameters[key]
    for field, value in kind.items():
        setattr(param, field, value)
    return request


def _with_output(request: pb.ModelInferRequest, name: str, **params: int) -> pb.ModelInferRequest:
    output = request.outputs.add(name=name)
    for key, value in params.items():
        output.parameters[key].int64_param = value
    return request


@pytest.mark.parametrize(("request_", "reason", "message"), [
    (_second_input(_typed(_request(shape=(1,)), b"x")), "too_many_inputs", "expected exactly 1 input"),
    (_request(name="IMAGES"), "unknown_input", 'unknown input "IMAGES"'),
    (_request(datatype="FP32"), "datatype", "input IMAGE must have datatype BYTES"),
    (_request(shape=(2, 3)), "shape", "IMAGE shape must be [B] or [B, 1]"),
    (_request(shape=(-1,)), "shape", "must be non-negative integers"),
    (_typed(_request(shape=(2,)), b"x"), "shape", "contents.bytes_contents holds 1"),
    (_typed(_request(shape=(1,), raw_input_contents=[pack_bytes([b"x"])]), b"x"), "data_and_binary", "both contents"),
    (_request(shape=(1,), raw_input_contents=[pack_bytes([b"x"]), b""]), "raw_contents", "2 entries for 1 input"),
    (_request(shape=(2,), raw_input_contents=[pack_bytes([b"x"])]), "shape", "its binary data holds 1"),
    (_request("PIXELS", "FP32", (1, 3, 2, 2), raw_input_contents=[b"\0" * 12]), "shape", "4 x 12 = 48"),
    (_request("PIXELS", "FP32", (1, 3, 1, 1), raw_input_contents=[np.array([1, np.nan, 0], "<f4").tobytes()]),
     "not_finite", "element 1 of input PIXELS is nan"),
    (_with_param(_typed(_request(shape=(1,)), b"x"), "timeout", string_param="1s"), "parameters",
     "parameters.timeout of the request must be an int64_param"),
    (_with_param(_typed(_request(shape=(1,)), b"x"), "timeout", int64_param=-5), "parameters", "0 or more microseconds"),
    (_with_output(_typed(_request(shape=(1,)), b"x"), "LOGITS"), "unknown_output", 'unknown output "LOGITS"'),
    (_with_output(_typed(_request(shape=(1,)), b"x"), "PROBABILITIES", classification=-1), "outputs", "0 or more"),
])
def test_malformed_requests_are_refused_with_a_reason(request_: pb.ModelInferRequest, reason: str, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        v2_grpc.parse_model_infer(request_, **LIMITS)
    assert caught.value.reason == reason and message in str(caught.value)
    assert not isinstance(caught.value, PayloadTooLarge)


def test_limits_are_checked_from_the_shape_before_any_data() -> None:
    with pytest.raises(PayloadTooLarge, match="batch of 65 is over the limit of 64"):
        v2_grpc.parse_model_infer(_request(shape=(65,)), **LIMITS)
    with pytest.raises(PayloadTooLarge, match="over the limit of 1000"):
        v2_grpc.parse_model_infer(_request("PIXELS", "FP32", (1, 3, 20, 20)), max_batch=64, max_elements=1000)


def test_repository_config_is_a_string_and_files_are_refused() -> None:
    assert v2_grpc.repository_config({}) is None
    load = pb.RepositoryModelLoadRequest(model_name="m")
    load.parameters["config"].string_param = '{"checkpoint": "a.safetensors"}'
    assert v2_grpc.repository_config(load.parameters) == '{"checkpoint": "a.safetensors"}'
    load.parameters["config"].int64_param = 3
    with pytest.raises(RequestError, match="must be a string_param"):
        v2_grpc.repository_config(load.parameters)
    load.parameters["file:1/model.pt"].bytes_param = b"weights"
    with pytest.raises(RequestError, match="model files in the request"):
        v2_grpc.repository_config(load.parameters)
