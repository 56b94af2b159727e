"""KServe V2 codec: requests built and responses read by tritonclient's own HTTP classes, and every refusal."""

from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image

from service.errors import PayloadTooLarge, RequestError, UnsupportedMediaType
from service.http.errors import status_of
from service.protocols import v2_models
from service.protocols.v2 import (
    EXTENSIONS,
    InferRequest,
    RequestedOutput,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
    server_metadata,
)

HLEN = "Inference-Header-Content-Length"
SHAPES = ["square", "triangle", "circle", "star"]
PROBS = np.array([[0.1, 0.2, 0.6, 0.1], [0.5, 0.25, 0.125, 0.125]], dtype=np.float32)


def jpeg(color: str, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "JPEG")
    return buffer.getvalue()


JPEG1, JPEG2 = jpeg("red"), jpeg("blue", 12)


def from_triton(inputs: list, outputs: list | None = None, **kwargs) -> tuple[bytes, dict[str, str]]:
    """Body and headers exactly as tritonclient's InferenceServerClient.infer would send them."""
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kwargs)
    return body, ({} if json_size is None else {HLEN: str(json_size)})


def raw(doc: object, tail: bytes = b"", *, header: bool | None = None) -> tuple[bytes, dict[str, str]]:
    """A hand-made body: JSON, then ``tail``; the length header is sent when there is a tail."""
    head = json.dumps(doc).encode()
    send = bool(tail) if header is None else header
    return head + tail, ({HLEN: str(len(head))} if send else {})


def parse(body: bytes, headers: dict[str, str], *, max_elements: int = 10_000, max_batch: int = 8) -> InferRequest:
    return parse_infer_request(body, headers, max_elements=max_elements, max_batch=max_batch)


def image(shape: list, data: object = None, **params: object) -> dict:
    """A request document with one IMAGE input; ``data`` and ``parameters`` only when given."""
    tensor: dict = {"name": "IMAGE", "datatype": "BYTES", "shape": shape}
    if data is not None:
        tensor["data"] = data
    if params:
        tensor["parameters"] = params
    return {"inputs": [tensor]}


def pixels(shape: list, data: object = None, **params: object) -> dict:
    """A request document with one PIXELS input."""
    doc = image(shape, data, **params)
    doc["inputs"][0].update(name="PIXELS", datatype="FP32")
    return doc


def prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def image_input(shape: list[int], items: list[bytes], *, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", shape, "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=np.object_).reshape(shape), binary_data=binary)
    return tensor


def pixels_input(array: np.ndarray, *, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("PIXELS", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def request(*outputs: RequestedOutput, id: str | None = "req-7", batch: int = 2) -> InferRequest:  # noqa: A002
    return InferRequest(id=id, images=[JPEG1] * batch, pixels=None, outputs=outputs)


def encode(req: InferRequest, probs: np.ndarray = PROBS, names: list[str] = SHAPES) -> tuple[bytes, dict[str, str]]:
    return encode_infer_response(
        model_name="shapes", model_version="v3", request=req, probabilities=probs, class_names=names,
        parameters={"slot": "stable", "batch_size": 4},
    )


def read_back(body: bytes, headers: dict[str, str]) -> triton.InferResult:
    length = headers.get(HLEN)
    return triton.InferResult.from_response_body(body, header_length=None if length is None else int(length))


# --- requests, as tritonclient sends them -------------------------------------------------------------


def test_image_binary_request_from_tritonclient():
    out = triton.InferRequestedOutput("PROBABILITIES", binary_data=True, class_count=3)
    body, headers = from_triton([image_input([2], [JPEG1, JPEG2], binary=True)], [out], request_id="abc")
    parsed = parse(body, headers)
    assert parsed.id == "abc"
    assert parsed.images == [JPEG1, JPEG2]
    assert parsed.pixels is None
    assert parsed.batch_size == 2
    assert parsed.outputs == (RequestedOutput("PROBABILITIES", binary=True, classification=3),)


def test_image_json_request_from_tritonclient_carries_base64():
    # tritonclient's JSON BYTES are str(element, "utf-8"): a client base64-encodes images itself
    items = [base64.b64encode(JPEG1), base64.b64encode(JPEG2)]
    out = triton.InferRequestedOutput("PROBABILITIES", binary_data=False)
    body, headers = from_triton([image_input([2], items, binary=False)], [out])
    assert headers == {}
    parsed = parse(body, headers)
    assert parsed.images == [JPEG1, JPEG2]
    assert parsed.id is None
    assert parsed.outputs == (RequestedOutput("PROBABILITIES", binary=False, classification=0),)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_image_shape_b_by_1_from_tritonclient(binary: bool):
    items = [JPEG1, JPEG2] if binary else [base64.b64encode(JPEG1), base64.b64encode(JPEG2)]
    body, headers = from_triton([image_input([2, 1], items, binary=binary)])
    assert parse(body, headers).images == [JPEG1, JPEG2]


def test_image_nested_json_data():
    b64 = [base64.b64encode(JPEG1).decode(), base64.b64encode(JPEG2).decode()]
    body, headers = raw(image([2, 1], [[b64[0]], [b64[1]]]))
    assert parse(body, headers).images == [JPEG1, JPEG2]


def test_image_base64_wrapped_in_lines_is_accepted():
    wrapped = base64.encodebytes(JPEG1).decode()  # MIME style: a newline every 76 characters
    assert "\n" in wrapped
    body, headers = raw({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [wrapped]}]})
    assert parse(body, headers).images == [JPEG1]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_pixels_request_from_tritonclient(binary: bool):
    pixels = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    body, headers = from_triton([pixels_input(pixels, binary=binary)])
    parsed = parse(body, headers)
    assert parsed.images is None
    assert parsed.pixels.dtype == np.float32
    assert parsed.pixels.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(parsed.pixels, pixels)
    assert parsed.batch_size == 2


def test_pixels_nested_json_data_and_integers():
    nested = [[[[1, 2.5], [3, 4]], [[5, 6], [7, 8]], [[9, 10], [11, -12.25]]]]
    body, headers = raw({"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": nested}]})
    np.testing.assert_array_equal(parse(body, headers).pixels, np.array(nested, dtype=np.float32))


def test_tritonclient_without_outputs_asks_for_binary():
    body, headers = from_triton([image_input([1], [JPEG1], binary=True)])
    assert json.loads(body[: int(headers[HLEN])])["parameters"] == {"binary_data_output": True}
    assert parse(body, headers).outputs == (RequestedOutput("PROBABILITIES", binary=True, classification=0),)


def test_plain_json_without_outputs_gets_json():
    body, headers = raw({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}]})
    assert parse(body, headers).outputs == (RequestedOutput("PROBABILITIES", binary=False, classification=0),)


@pytest.mark.parametrize(("output_params", "binary"), [({}, True), ({"binary_data": False}, False)])
def test_binary_data_output_is_the_default_an_output_may_override(output_params: dict, binary: bool):
    doc = {
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "PROBABILITIES", "parameters": output_params}],
    }
    assert parse(*raw(doc)).outputs == (RequestedOutput("PROBABILITIES", binary=binary, classification=0),)


@pytest.mark.parametrize("name", [HLEN, HLEN.lower(), HLEN.upper()])
def test_header_lookup_ignores_case(name: str):
    body, headers = from_triton([image_input([1], [JPEG1], binary=True)])
    assert parse(body, {name: headers[HLEN]}).images == [JPEG1]


# --- responses, as tritonclient reads them --------------------------------------------------------------


def test_probabilities_binary_response_reads_back_exactly():
    body, headers = encode(request(RequestedOutput("PROBABILITIES", binary=True)))
    assert headers == {"Content-Type": "application/octet-stream", HLEN: str(len(body) - 32)}  # 2 x 4 float32
    result = read_back(body, headers)
    np.testing.assert_array_equal(result.as_numpy("PROBABILITIES"), PROBS)
    assert result.as_numpy("PROBABILITIES").dtype == np.float32
    assert result.get_response() == {
        "model_name": "shapes",
        "model_version": "v3",
        "id": "req-7",
        "parameters": {"slot": "stable", "batch_size": 4},
        "outputs": [
            {"name": "PROBABILITIES", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}}
        ],
    }
    assert body[int(headers[HLEN]) :] == PROBS.astype("<f4").tobytes()


def test_probabilities_json_response_reads_back_exactly():
    probs = np.random.default_rng(1).random((2, 4), dtype=np.float32)
    body, headers = encode(request(RequestedOutput("PROBABILITIES", binary=False)), probs)
    assert headers == {"Content-Type": "application/json"}
    doc = json.loads(body)
    assert doc["outputs"][0]["shape"] == [2, 4] and len(doc["outputs"][0]["data"]) == 8  # flat, row-major
    np.testing.assert_array_equal(read_back(body, headers).as_numpy("PROBABILITIES"), probs)


def test_classification_binary_response():
    body, headers = encode(request(RequestedOutput("PROBABILITIES", binary=True, classification=3)))
    result = read_back(body, headers)
    assert result.get_output("PROBABILITIES")["datatype"] == "BYTES"
    assert result.as_numpy("PROBABILITIES").tolist() == [
        [b"0.600000:2:circle", b"0.200000:1:triangle", b"0.100000:0:square"],
        [b"0.500000:0:square", b"0.250000:1:triangle", b"0.125000:2:circle"],
    ]


def test_classification_json_response():
    body, headers = encode(request(RequestedOutput("PROBABILITIES", binary=False, classification=2)))
    assert headers == {"Content-Type": "application/json"}
    assert json.loads(body)["outputs"] == [
        {
            "name": "PROBABILITIES",
            "datatype": "BYTES",
            "shape": [2, 2],
            "data": ["0.600000:2:circle", "0.200000:1:triangle", "0.500000:0:square", "0.250000:1:triangle"],
        }
    ]
    assert read_back(body, headers).as_numpy("PROBABILITIES").shape == (2, 2)


def test_classification_formats_scores_as_triton_and_ties_by_index():
    # %f of the float32 itself: float32(0.0123455) is 0.01234550010..., which prints as 0.012346
    probs = np.array([[0.04, 0.0123455, 0.035, 0.912345, 1e-7]], dtype=np.float32)
    names = ["square", "triangle", "star", "circle", "dot"]
    body, headers = encode(request(RequestedOutput("PROBABILITIES", True, 5), batch=1), probs, names)
    assert read_back(body, headers).as_numpy("PROBABILITIES").tolist() == [
        [b"0.912345:3:circle", b"0.040000:0:square", b"0.035000:2:star", b"0.012346:1:triangle", b"0.000000:4:dot"]
    ]
    ties = np.array([[0.25, 0.25, 0.25, 0.25]], dtype=np.float32)
    body, headers = encode(request(RequestedOutput("PROBABILITIES", False, 4), batch=1), ties)
    assert json.loads(body)["outputs"][0]["data"] == [f"0.250000:{i}:{SHAPES[i]}" for i in range(4)]


def test_classification_count_is_capped_at_num_classes():
    body, headers = encode(request(RequestedOutput("PROBABILITIES", binary=True, classification=10)))
    assert read_back(body, headers).as_numpy("PROBABILITIES").shape == (2, 4)


def test_classification_without_class_names_has_no_label():
    body, headers = encode(request(RequestedOutput("PROBABILITIES", False, 1)), names=[])
    assert json.loads(body)["outputs"][0]["data"] == ["0.600000:2", "0.500000:0"]


def test_response_without_request_id_has_no_id():
    body, _ = encode(request(RequestedOutput("PROBABILITIES", False), id=None))
    assert "id" not in json.loads(body)


def test_encoder_refuses_probabilities_that_do_not_fit_the_request():
    with pytest.raises(ValueError, match=r"do not fit a batch of 3") as info:
        encode(request(RequestedOutput("PROBABILITIES", False), batch=3))
    assert not isinstance(info.value, RequestError)  # a server bug: 500, not the client's 400
    with pytest.raises(ValueError, match=r"and 3 class names"):
        encode(request(RequestedOutput("PROBABILITIES", False)), names=SHAPES[:3])


def test_full_loop_through_tritonclient():
    outputs = [triton.InferRequestedOutput("PROBABILITIES", binary_data=True, class_count=1)]
    body, headers = from_triton([image_input([2], [JPEG1, JPEG2], binary=True)], outputs, request_id="loop")
    parsed = parse(body, headers)
    answer, answer_headers = encode(parsed)
    result = read_back(answer, answer_headers)
    assert result.get_response()["id"] == "loop"
    assert result.as_numpy("PROBABILITIES").tolist() == [[b"0.600000:2:circle"], [b"0.500000:0:square"]]


# --- metadata and errors ------------------------------------------------------------------------------


def test_server_metadata():
    assert server_metadata(version="0.1.0") == {
        "name": "headswap",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "classification"],
    }


def test_model_metadata():
    assert model_metadata(name="shapes", versions=["v3", "v2"], num_classes=4, input_size=224) == {
        "name": "shapes",
        "versions": ["v3", "v2"],
        "platform": "pytorch_torchvision",
        "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [-1]},
            {"name": "PIXELS", "datatype": "FP32", "shape": [-1, 3, 224, 224]},
        ],
        "outputs": [{"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, 4]}],
    }


# --- refusals -----------------------------------------------------------------------------------------


B64 = base64.b64encode(JPEG1).decode()
FLOATS = struct.pack("<12f", *range(12))
ONE_IMAGE = image([1], [B64])["inputs"][0]

REFUSALS = {
    # id: (body and headers, error type, reason, part of the message)
    "not-json": ((b"{inputs: []", {}), RequestError, "not_json", "request body is not valid JSON"),
    "not-utf8": ((b'{"inputs": "\xff"}', {}), RequestError, "not_json", "request body is not valid JSON"),
    "nan-constant": (
        (b'{"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 3, 1, 1], "data": [NaN, 0, 0]}]}', {}),
        RequestError, "not_json", "NaN is not a JSON number",
    ),
    "not-object": (raw([ONE_IMAGE]), RequestError, "not_json", "must be a JSON object, found array"),
    "no-inputs": (raw({"id": "x"}), RequestError, "no_inputs", "inputs must be a non-empty array of input tensors"),
    "empty-inputs": (raw({"inputs": []}), RequestError, "no_inputs", "inputs must be a non-empty array of input tensors, found []"),
    "two-inputs": (raw({"inputs": [ONE_IMAGE, ONE_IMAGE]}), RequestError, "too_many_inputs", "exactly 1 input"),
    "unknown-input": (
        raw({"inputs": [dict(ONE_IMAGE, name="INPUT__0")]}),
        RequestError, "unknown_input", 'unknown input "INPUT__0": expected IMAGE or PIXELS',
    ),
    "wrong-datatype": (
        raw({"inputs": [dict(ONE_IMAGE, datatype="UINT8")]}),
        RequestError, "datatype", 'input IMAGE must have datatype BYTES, found "UINT8"',
    ),
    "pixels-as-fp16": (
        raw({"inputs": [dict(pixels([1, 3, 1, 1], [0, 0, 0])["inputs"][0], datatype="FP16")]}),
        RequestError, "datatype", 'input PIXELS must have datatype FP32, found "FP16"',
    ),
    "image-shape-vs-json-data": (
        raw(image([2], [B64, B64, B64])), RequestError, "shape", "IMAGE says 2 elements, its data holds 3"
    ),
    "image-shape-vs-binary-data-fewer": (
        raw(image([2], binary_data_size=len(prefixed(JPEG1))), prefixed(JPEG1)),
        RequestError, "shape", "IMAGE says 2 elements, its binary data holds 1",
    ),
    "image-shape-vs-binary-data-more": (
        raw(image([2], binary_data_size=len(prefixed(*[JPEG1] * 4))), prefixed(*[JPEG1] * 4)),  # stops reading at 3
        RequestError, "shape", "IMAGE says 2 elements, its binary data holds more than 2",
    ),
    "image-2d-not-b-by-1": (raw(image([1, 2], [B64, B64])), RequestError, "shape", "IMAGE shape must be [B] or [B, 1]"),
    "pixels-count-vs-json-data": (
        raw(pixels([1, 3, 2, 2], [0.5] * 11)), RequestError, "shape", "PIXELS needs 12 elements, its data holds 11"
    ),
    "pixels-count-vs-binary-data": (
        raw(pixels([1, 3, 2, 2], binary_data_size=44), FLOATS[:44]),
        RequestError, "shape", "PIXELS is 44 bytes, its shape needs 4 x 12 = 48",
    ),
    "pixels-3d": (raw(pixels([3, 2, 2], [0] * 12)), RequestError, "shape", "PIXELS shape must be [B, 3, H, W]"),
    "pixels-4-channels": (raw(pixels([1, 4, 1, 1], [0] * 4)), RequestError, "shape", "found [1, 4, 1, 1]"),
    "pixels-zero-height": (raw(pixels([1, 3, 0, 1], [])), RequestError, "shape", "H, W >= 1"),
    "negative-dim": (raw(image([-1], [B64])), RequestError, "shape", "inputs.shape must be an array of non-negative integers, found -1"),
    "float-dim": (raw(image([1.0], [B64])), RequestError, "shape", "inputs.shape must be an array of non-negative integers, found 1.0"),
    "string-dim": (raw(image(["1"], [B64])), RequestError, "shape", "inputs.shape must be an array of non-negative integers, found '1'"),
    "bool-dim": (raw(image([True], [B64])), RequestError, "shape", "inputs.shape must be an array of non-negative integers, found True"),
    "shape-not-array": (raw(image(2, [B64, B64])), RequestError, "shape", "non-negative integers, found 2"),
    "empty-batch": (raw(image([0], [])), RequestError, "shape", "batch size of input IMAGE must be at least 1"),
    "batch-over-limit": (
        raw(image([9], [B64] * 9)), PayloadTooLarge, "batch_too_large", "batch of 9 is over the limit of 8"
    ),
    "elements-over-limit": (
        raw(pixels([1, 3, 100, 100], [0.0])),  # refused from the shape, before the data is looked at
        PayloadTooLarge, "too_many_elements", "has 30000 elements, over the limit of 10000",
    ),
    "header-length-not-int": (
        (raw(image([1], [B64]))[0], {HLEN: "12abc"}), RequestError, "header_length", "must be an integer byte count",
    ),
    "header-length-underscore": (
        (raw(image([1], [B64]))[0], {HLEN: "1_0"}), RequestError, "header_length", "found '1_0'"
    ),
    "header-length-negative": (
        (raw(image([1], [B64]))[0], {HLEN: "-5"}), RequestError, "header_length", "must be 0 or more, found -5"
    ),
    "header-length-past-body": (
        (b'{"inputs": []}', {HLEN: "15"}), RequestError, "header_length", "is 15 but the body has only 14 bytes"
    ),
    "binary-size-missing": (
        raw(image([1]), prefixed(JPEG1)), RequestError, "no_data", "neither 'data' nor parameters.binary_data_size"
    ),
    "binary-size-negative": (
        raw(image([1], binary_data_size=-4), prefixed(JPEG1)),
        RequestError, "binary_size", "must be a non-negative integer, found -4",
    ),
    "binary-size-string": (
        raw(image([1], binary_data_size="12"), prefixed(JPEG1)),
        RequestError, "binary_size", 'must be a non-negative integer, found "12"',
    ),
    "binary-size-past-end": (
        raw(image([1], binary_data_size=len(JPEG1) + 5), prefixed(JPEG1)),
        RequestError, "binary_size", f"is {len(JPEG1) + 5} bytes but only {len(JPEG1) + 4} bytes follow",
    ),
    "binary-without-header-length": (
        raw(image([1], binary_data_size=8), header=False),
        RequestError, "binary_size", "is the Inference-Header-Content-Length header set?",
    ),
    "bytes-prefix-past-section": (
        raw(image([1], binary_data_size=10), struct.pack("<I", 100) + b"abcdef"),
        RequestError, "bytes_prefix", "element 0 of input IMAGE declares 100 bytes but only 6 remain",
    ),
    "bytes-prefix-truncated": (
        raw(image([2], binary_data_size=9), prefixed(b"abc") + b"\x01\x00"),
        RequestError, "bytes_prefix", "4-byte length prefix is needed at byte 7 but only 2 bytes remain",
    ),
    "binary-sections-short-of-body": (
        raw(image([1], binary_data_size=len(JPEG1) + 4), prefixed(JPEG1) + b"extra"),
        RequestError, "binary_trailing", f"add up to {len(JPEG1) + 4} bytes but {len(JPEG1) + 9} bytes follow",
    ),
    "bytes-after-json-data": (
        raw(image([1], [B64]), b"junk"), RequestError, "binary_trailing", "add up to 0 bytes but 4 bytes follow"
    ),
    "bad-base64": (raw(image([1], ["not base64!"])), RequestError, "base64", "element 0 of input IMAGE is not valid"),
    "non-ascii-base64": (raw(image([1], ["\u00ff" * 4])), RequestError, "base64", "element 0 of input IMAGE is not"),
    "image-element-not-string": (
        raw(image([2], [B64, 7])), RequestError, "base64", "element 1 of input IMAGE must be a base64 string, found"
    ),
    "pixels-string": (
        raw(pixels([1, 3, 1, 1], [0.5, "0.5", 1])),
        RequestError, "not_number", 'element 1 of input PIXELS is string "0.5", expected a number',
    ),
    "pixels-bool": (
        raw(pixels([1, 3, 1, 1], [0.5, 1, True])), RequestError, "not_number", "element 2 of input PIXELS is boolean"
    ),
    "pixels-null": (
        raw(pixels([1, 3, 1, 1], [[[None]], [[1]], [[2]]])),
        RequestError, "not_number", "element 0 of input PIXELS is null",
    ),
    "pixels-overflow-json": (
        raw(pixels([1, 3, 1, 1], [0, 1e39, 0])), RequestError, "not_finite", "element 1 of input PIXELS is inf"
    ),
    "pixels-nan-binary": (
        raw(pixels([1, 3, 1, 1], binary_data_size=12), struct.pack("<3f", 0, 0, float("nan"))),
        RequestError, "not_finite", "element 2 of input PIXELS is nan",
    ),
    "data-and-binary": (
        raw(image([1], [B64], binary_data_size=len(prefixed(JPEG1))), prefixed(JPEG1)),
        RequestError, "data_and_binary", "has both 'data' and parameters.binary_data_size",
    ),
    "data-not-array": (raw(image([1], B64)), RequestError, "data", "'data' of input IMAGE must be an array"),
    "shared-memory-input": (
        raw(image([1], shared_memory_region="r0", shared_memory_byte_size=4)), RequestError, "shm", "shared memory"
    ),
    "unknown-output": (
        raw(dict(image([1], [B64]), outputs=[{"name": "LOGITS"}])),
        RequestError, "unknown_output", 'unknown output "LOGITS": this model has one output, PROBABILITIES',
    ),
    "classification-negative": (
        raw(dict(image([1], [B64]), outputs=[{"name": "PROBABILITIES", "parameters": {"classification": -1}}])),
        RequestError, "outputs", "outputs.parameters.classification must be a non-negative integer: top-k as score:index:label, found -1",
    ),
    "binary-data-not-bool": (
        raw(dict(image([1], [B64]), outputs=[{"name": "PROBABILITIES", "parameters": {"binary_data": "yes"}}])),
        RequestError, "outputs", "outputs.parameters.binary_data must be true or false: send this output as binary data, found 'yes'",
    ),
    "id-not-string": (raw(dict(image([1], [B64]), id=7)), RequestError, "id", "id must be a string, found 7"),
    "gzip-body": (
        (raw(image([1], [B64]))[0], {"Content-Encoding": "gzip"}),
        UnsupportedMediaType, "content_encoding", "Content-Encoding 'gzip' is not supported",
    ),
}


@pytest.mark.parametrize(("request_", "error", "reason", "message"), REFUSALS.values(), ids=REFUSALS.keys())
def test_refusal(request_: tuple[bytes, dict[str, str]], error: type[RequestError], reason: str, message: str):
    body, headers = request_
    with pytest.raises(RequestError) as info:
        parse(body, headers)
    assert type(info.value) is error
    assert status_of(info.value) == {RequestError: 400, PayloadTooLarge: 413, UnsupportedMediaType: 415}[error]
    assert info.value.reason == reason
    assert message in str(info.value)


def test_image_count_counts_against_max_elements():
    with pytest.raises(PayloadTooLarge, match="has 4 elements, over the limit of 3"):
        parse(*raw(image([4], [B64] * 4)), max_elements=3)


@pytest.mark.parametrize("output", [
    RequestedOutput("PROBABILITIES", binary=False), RequestedOutput("PROBABILITIES", binary=True),
    RequestedOutput("PROBABILITIES", binary=False, classification=2),
    RequestedOutput("PROBABILITIES", binary=True, classification=2),
], ids=["json", "binary", "classification-json", "classification-binary"])
def test_every_answer_header_is_what_the_response_model_describes(output: RequestedOutput):
    body, headers = encode(request(output))
    length = int(headers.get(HLEN, len(body)))
    answer = v2_models.InferenceResponse.model_validate_json(body[:length])
    assert (answer.model_name, answer.model_version, answer.id) == ("shapes", "v3", "req-7")
    assert answer.outputs[0].name == "PROBABILITIES" and answer.outputs[0].shape[0] == 2


def test_metadata_answers_are_their_models():
    assert v2_models.ServerMetadata.model_validate(server_metadata(version="1.2")).extensions == list(EXTENSIONS)
    meta = v2_models.ModelMetadata.model_validate(model_metadata(name="m", versions=["a"], num_classes=4, input_size=224))
    assert [t.shape for t in meta.inputs] == [[-1], [-1, 3, 224, 224]] and meta.outputs[0].shape == [-1, 4]


def test_keys_the_server_does_not_read_are_ignored_as_before():
    """V2 objects are open: a client's extra keys (in the request, an input, an output) change nothing."""
    extra = dict(image([1], [B64]), model_name="any", inputs=[dict(ONE_IMAGE, extra=1)],
                 outputs=[{"name": "PROBABILITIES", "parameters": {"classification": 2}, "note": "x"}])
    parsed = parse(*raw(extra))
    assert parsed.images == [JPEG1]
    assert parsed.outputs == (RequestedOutput("PROBABILITIES", binary=False, classification=2),)
