"""Hostile input over real HTTP: a corpus of bad images on /predict and malformed V2 bodies.

Each answer is a 200 or a 4xx with a JSON ``{"error": ...}``, never a 5xx; after the whole corpus
the server still answers a normal image, at about the speed it did before, with the very same
processes (no worker or API server died and was replaced behind our back).
"""

from __future__ import annotations

import base64
import json
import statistics
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.images import encode, jpeg, photo
from tests.server import Server, proc_stat, run_server, session_pids

TOKEN = "hostile-admin-token-for-tests"
NORMAL = jpeg(40)
TIMED_REQUESTS = 20
SLOWDOWN_BOUND = 3.0  # generous: "not wedged or degraded", not a speed assertion


@dataclass(frozen=True)
class Hostile:
    id: str
    body: bytes
    content_type: str
    status: int
    message: str = ""  # a substring of the error; "" for a 200


@dataclass(frozen=True)
class Baseline:
    pids: frozenset[int]
    workers: frozenset[int]
    median_s: float


# --- the image corpus -----------------------------------------------------------------------------

def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` RGB, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _chunk(b"IEND", b"")


def _png_with_bad_zlib(flip_at: int) -> bytes:
    """A noise PNG with one byte of its IDAT zlib stream flipped and the chunk CRC recomputed, so the
    only damage is in the zlib data (-1: the adler32 checksum; torchvision's decoder crashes on it)."""
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    pos = 8
    while data[pos + 4:pos + 8] != b"IDAT":
        pos += 12 + struct.unpack(">I", data[pos:pos + 4])[0]
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    body = bytearray(data[pos + 8:pos + 8 + length])
    body[flip_at] ^= 0xFF
    return data[:pos] + _chunk(b"IDAT", bytes(body)) + data[pos + 12 + length:]


def _with_app1(image: bytes, payload: bytes) -> bytes:
    """``image`` (a JFIF JPEG) with an APP1 segment holding ``payload`` after its APP0."""
    end = 4 + struct.unpack(">H", image[4:6])[0]
    return image[:end] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + image[end:]


def _animated_gif() -> bytes:
    frames = [photo(seed, (64, 48)).convert("P") for seed in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _png16() -> bytes:
    ramp = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    return encode(image, "PNG")


SMALL = photo(3, (120, 90))
SMALL_JPEG = encode(SMALL, "JPEG", quality=90)
SMALL_PNG = encode(SMALL, "PNG")
SVG = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
       b'<circle cx="50" cy="50" r="40" fill="red"/></svg>')
NOT_AN_IMAGE = "not a recognised image: expected one of JPEG, PNG, WEBP, GIF, BMP, TIFF"

CORPUS = [
    Hostile("zero-bytes", b"", "image/jpeg", 400, "empty image: the request carried no bytes"),
    Hostile("truncated-jpeg", SMALL_JPEG[: len(SMALL_JPEG) // 2], "image/jpeg", 400, "corrupt JPEG"),
    Hostile("jpeg-cut-in-header", SMALL_JPEG[:200], "image/jpeg", 400, "unreadable image header"),
    Hostile("truncated-png", SMALL_PNG[: len(SMALL_PNG) // 2], "image/png", 400, "corrupt PNG image"),
    Hostile("wrong-magic", b"\x89PNX" + SMALL_PNG[4:], "image/png", 400, NOT_AN_IMAGE),
    Hostile("jpeg-magic-png-body", b"\xff\xd8\xff\xe0" + SMALL_PNG[4:], "image/jpeg", 400, NOT_AN_IMAGE),
    Hostile("bomb-30000x30000-png", _png_declaring(30000, 30000), "image/png", 413, "decompression bomb"),
    Hostile("bomb-under-pillow-limit", _png_declaring(9000, 9000), "image/png", 413,
            "image declares 9000x9000 = 81000000 pixels, over the limit of 40000000"),
    Hostile("1x1", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "image/png", 200),
    Hostile("20000x1", encode(Image.new("L", (20000, 1)), "PNG"), "image/png", 400,
            "image is 20000x1: an aspect ratio over 32:1 is not a photo"),
    Hostile("animated-gif", _animated_gif(), "application/octet-stream", 200),
    Hostile("progressive-jpeg", encode(SMALL, "JPEG", quality=90, progressive=True), "image/jpeg", 200),
    Hostile("cmyk-jpeg", encode(SMALL.convert("CMYK"), "JPEG", quality=90), "image/jpeg", 200),
    Hostile("png-16-bit", _png16(), "image/png", 200),
    Hostile("exif-short-ifd", _with_app1(SMALL_JPEG, b"Exif\0\0MM\0\x2a\0\0\0\x08\xff\xff" + b"\x01" * 40), "image/jpeg", 200),
    Hostile("exif-ifd-past-end", _with_app1(SMALL_JPEG, b"Exif\0\0II*\0\xff\xff\xff\x7f"), "image/jpeg", 200),
    Hostile("exif-no-tiff-header", _with_app1(SMALL_JPEG, b"Exif\0\0" + b"garbage!!" * 5), "image/jpeg", 200),
    Hostile("svg-as-octet-stream", SVG, "application/octet-stream", 400, NOT_AN_IMAGE),
    Hostile("svg-as-svg", SVG, "image/svg+xml", 415, "content type 'image/svg+xml' is not accepted"),
    Hostile("text-as-jpeg", b"Dear server, this is a JPEG. Honest.\n" * 20, "image/jpeg", 400, NOT_AN_IMAGE),
    Hostile("png-bad-adler32", _png_with_bad_zlib(-1), "image/png", 400, "corrupt PNG image"),
    Hostile("png-bad-deflate", _png_with_bad_zlib(100), "image/png", 400, "corrupt PNG image"),
    Hostile("5mb-noise", np.random.default_rng(5).bytes(5 * 1024 * 1024), "image/jpeg", 400, NOT_AN_IMAGE),
]


# --- malformed V2 bodies --------------------------------------------------------------------------

LENGTH = "Inference-Header-Content-Length"


def _json(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def _image_input(shape: list, **extra: object) -> dict:
    return {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": shape, **extra}]}


def _binary_image(tail: bytes, shape: list | None = None) -> tuple[bytes, dict[str, str]]:
    """A binary-extension V2 body: a JSON header, then ``tail`` as the IMAGE input's BYTES section."""
    header = _json(_image_input(shape or [1], parameters={"binary_data_size": len(tail)}))
    return header + tail, {"Content-Type": "application/octet-stream", LENGTH: str(len(header))}


def _pixels(shape: list, data: list | None = None, datatype: str = "FP32") -> bytes:
    return _json({"inputs": [{"name": "PIXELS", "datatype": datatype, "shape": shape, "data": data or [0.0]}]})


B64 = base64.b64encode(SMALL_JPEG).decode()
GOOD_HEADER = _json(_image_input([1], data=[B64]))
PREFIX_PAST_END, PREFIX_PAST_END_HEADERS = _binary_image(struct.pack("<I", 1000) + b"abcd")
CUT_PREFIX, CUT_PREFIX_HEADERS = _binary_image(b"\x07\x00")
HUGE_PREFIX, HUGE_PREFIX_HEADERS = _binary_image(struct.pack("<I", 0xFFFFFFFF) + SMALL_JPEG)
SECOND_PAST_END, SECOND_PAST_END_HEADERS = _binary_image(
    struct.pack("<I", len(SMALL_JPEG)) + SMALL_JPEG + struct.pack("<I", 50) + b"xyz", shape=[2])
_nan = struct.pack("<f", float("nan")) * 12
NAN_PIXELS = _json({"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 3, 2, 2],
                                "parameters": {"binary_data_size": len(_nan)}}]})
JSON = {"Content-Type": "application/json"}

V2_CASES = [
    # Inference-Header-Content-Length that lies
    ("length-past-body", GOOD_HEADER, {**JSON, LENGTH: str(len(GOOD_HEADER) + 100)}, 400,
     f"{LENGTH} is {len(GOOD_HEADER) + 100} but the body has only {len(GOOD_HEADER)} bytes"),
    ("length-negative", GOOD_HEADER, {**JSON, LENGTH: "-5"}, 400, f"{LENGTH} must be 0 or more, found -5"),
    ("length-not-a-number", GOOD_HEADER, {**JSON, LENGTH: "12abc"}, 400, f"{LENGTH} must be an integer byte count"),
    ("length-underscored", GOOD_HEADER, {**JSON, LENGTH: "1_0"}, 400, f"{LENGTH} must be an integer byte count"),
    ("length-cuts-the-json", GOOD_HEADER, {**JSON, LENGTH: "10"}, 400, "request body is not valid JSON"),
    # BYTES length prefixes that run past the end
    ("prefix-past-end", PREFIX_PAST_END, PREFIX_PAST_END_HEADERS, 400,
     "element 0 of input IMAGE declares 1000 bytes but only 4 remain"),
    ("prefix-cut-short", CUT_PREFIX, CUT_PREFIX_HEADERS, 400, "a 4-byte length prefix is needed at byte 0"),
    ("prefix-4-gib", HUGE_PREFIX, HUGE_PREFIX_HEADERS, 400, "element 0 of input IMAGE declares 4294967295 bytes"),
    ("second-prefix-past-end", SECOND_PAST_END, SECOND_PAST_END_HEADERS, 400,
     "element 1 of input IMAGE declares 50 bytes but only 3 remain"),
    ("binary-size-past-end", _json(_image_input([1], parameters={"binary_data_size": 99})), JSON, 400,
     "binary_data_size of input IMAGE is 99 bytes but only 0 bytes follow"),
    # wrong datatypes and shapes
    ("image-as-fp32", _json({"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1], "data": [1.0]}]}), JSON,
     400, 'input IMAGE must have datatype BYTES, found "FP32"'),
    ("pixels-as-bytes", _pixels([1, 3, 1, 1], ["a", "b", "c"], "BYTES"), JSON, 400,
     'input PIXELS must have datatype FP32, found "BYTES"'),
    ("pixels-as-int8", _pixels([1, 3, 1, 1], [1, 2, 3], "INT8"), JSON, 400, 'input PIXELS must have datatype FP32'),
    ("image-shape-2d", _json(_image_input([1, 2], data=[B64, B64])), JSON, 400, "IMAGE shape must be [B] or [B, 1]"),
    ("pixels-shape-3d", _pixels([1, 3, 4]), JSON, 400, "PIXELS shape must be [B, 3, H, W]"),
    ("pixels-one-channel", _pixels([1, 1, 2, 2], [0.0] * 4), JSON, 400, "PIXELS shape must be [B, 3, H, W]"),
    ("shape-negative", _json(_image_input([-1], data=[B64])), JSON, 400, "must be an array of non-negative integers"),
    ("shape-a-string", _json(_image_input("1", data=[B64])), JSON, 400, "must be an array of non-negative integers"),
    ("shape-float", _json(_image_input([1.0], data=[B64])), JSON, 400, "must be an array of non-negative integers"),
    ("batch-zero", _json(_image_input([0], data=[])), JSON, 400, "batch size of input IMAGE must be at least 1"),
    ("data-shorter-than-shape", _json(_image_input([2], data=[B64])), JSON, 400,
     "shape of input IMAGE says 2 elements, its data holds 1"),
    ("pixels-data-short", _pixels([1, 3, 2, 2], [0.0] * 11), JSON, 400, "needs 12 elements, its data holds 11"),
    ("pixels-not-numbers", _pixels([1, 3, 1, 1], [0.0, True, 1.0]), JSON, 400, "element 1 of input PIXELS is boolean"),
    ("pixels-nan-binary", NAN_PIXELS + _nan, {"Content-Type": "application/octet-stream", LENGTH: str(len(NAN_PIXELS))},
     400, "element 0 of input PIXELS is nan, expected a finite number"),
    ("nan-literal-in-json", (b'{"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 3, 1, 1], '
                             b'"data": [NaN, 0, 0]}]}'), JSON, 400, "NaN is not a JSON number"),
    ("two-inputs", _json({"inputs": [_image_input([1], data=[B64])["inputs"][0]] * 2}), JSON, 400,
     "expected exactly 1 input (IMAGE or PIXELS), found 2"),
    ("not-base64", _json(_image_input([1], data=["***"])), JSON, 400, "element 0 of input IMAGE is not valid base64"),
    ("gzip", GOOD_HEADER, {**JSON, "Content-Encoding": "gzip"}, 415, "Content-Encoding 'gzip' is not supported"),
    # too many elements
    ("batch-65", _json(_image_input([65], data=[B64] * 65)), JSON, 413, "batch of 65 is over the limit of 64"),
    ("batch-65-declared-only", _json(_image_input([65])), JSON, 413, "batch of 65 is over the limit of 64"),
    ("pixels-batch-65", _pixels([65, 3, 1, 1]), JSON, 413, "batch of 65 is over the limit of 64"),
    ("pixels-10-giga-elements", _pixels([1, 3, 100000, 100000]), JSON, 413,
     "input PIXELS of shape [1, 3, 100000, 100000] has 30000000000 elements, over the limit of"),
]


# --- fixtures and helpers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(resnet18_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hostile")
    with run_server(resnet18_ckpt, tmp, "--workers-per-device", "2", "--max-batch-size", "8",
                    env={"HEADSWAP_ADMIN_TOKEN": TOKEN}) as server:
        yield server


@pytest.fixture(scope="module", autouse=True)
def baseline(srv: Server) -> Baseline:
    """Processes and normal-request latency before any hostile request reaches the server."""
    return Baseline(frozenset(session_pids(srv.proc.pid)), frozenset(_worker_pids(srv)), _median_latency(srv))


@pytest.fixture(scope="module")
def model(srv: Server) -> str:
    return requests.get(f"{srv.url}/ready", timeout=30).json()["model"]


def _worker_pids(srv: Server) -> list[int]:
    response = requests.get(f"{srv.url}/admin/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert response.status_code == 200, response.text
    return [w["pid"] for w in response.json()["workers"].values()]


def _alive(pid: int) -> bool:
    try:
        state = proc_stat(Path(f"/proc/{pid}"))[0]
    except OSError:
        return False
    return state != "Z"


def _median_latency(srv: Server) -> float:
    with requests.Session() as session:
        for _ in range(3):  # warm the connection and the decode pool
            assert _normal(session, srv).status_code == 200
        times = []
        for _ in range(TIMED_REQUESTS):
            started = time.perf_counter()
            response = _normal(session, srv)
            times.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    return statistics.median(times)


def _normal(session: requests.Session, srv: Server) -> requests.Response:
    return session.post(f"{srv.url}/predict", data=NORMAL, headers={"Content-Type": "image/jpeg"}, timeout=60)


def _predict(srv: Server, item: Hostile) -> requests.Response:
    return requests.post(f"{srv.url}/predict", data=item.body, headers={"Content-Type": item.content_type}, timeout=60)


def _assert_clear_error(response: requests.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert message in body["error"], body
    assert "Traceback" not in body["error"] and "/site-packages/" not in body["error"]


# --- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("item", CORPUS, ids=[item.id for item in CORPUS])
def test_hostile_image_is_answered_or_refused_clearly(srv: Server, item: Hostile) -> None:
    response = _predict(srv, item)
    if item.status == 200:
        assert response.status_code == 200, response.text[:500]
        body = response.json()
        assert len(body["predictions"]) == 5 and body["model"]["slot"] == "stable"
    else:
        _assert_clear_error(response, item.status, item.message)


@pytest.mark.parametrize("case_id, body, headers, status, message", V2_CASES, ids=[c[0] for c in V2_CASES])
def test_malformed_v2_body_is_a_clear_4xx(srv: Server, model: str, case_id: str, body: bytes,
                                          headers: dict[str, str], status: int, message: str) -> None:
    response = requests.post(f"{srv.url}/v2/models/{model}/infer", data=body, headers=headers, timeout=60)
    _assert_clear_error(response, status, message)


def test_well_formed_v2_bodies_in_the_same_shapes_are_served(srv: Server, model: str) -> None:
    """The controls: the bodies above are refused for what they break, not for their framing."""
    tail = struct.pack("<I", len(SMALL_JPEG)) + SMALL_JPEG
    zeros = np.zeros((1, 3, 224, 224), dtype="<f4").tobytes()
    pixels = _json({"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 3, 224, 224],
                                "parameters": {"binary_data_size": len(zeros)}}]})
    binary = {"Content-Type": "application/octet-stream", LENGTH: str(len(pixels))}
    for body, headers in (_binary_image(tail), (GOOD_HEADER, JSON), (pixels + zeros, binary)):
        response = requests.post(f"{srv.url}/v2/models/{model}/infer", data=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text[:500]


def test_corrupt_jpeg_error_names_no_source_file(srv: Server) -> None:
    """torchvision's errors start with its C++ source location; the client gets only what went wrong."""
    response = _predict(srv, CORPUS[1])
    assert response.status_code == 400
    error = response.json()["error"]
    assert error.startswith("corrupt JPEG: ") and ".cpp" not in error and "/" not in error, error


def test_after_the_whole_corpus_the_server_serves_at_full_speed(srv: Server, model: str, baseline: Baseline) -> None:
    """Send everything once more, back to back, then: same processes, ready, a normal image in time."""
    for item in CORPUS:
        assert _predict(srv, item).status_code in (200, 400, 413, 415)
    for _, body, headers, status, _ in V2_CASES:
        response = requests.post(f"{srv.url}/v2/models/{model}/infer", data=body, headers=headers, timeout=60)
        assert response.status_code == status
    assert requests.get(f"{srv.url}/ready", timeout=30).status_code == 200
    workers = _worker_pids(srv)
    assert frozenset(workers) == baseline.workers and all(_alive(pid) for pid in workers)
    assert frozenset(session_pids(srv.proc.pid)) == baseline.pids  # nothing died and was replaced
    after = _median_latency(srv)
    assert after <= SLOWDOWN_BOUND * baseline.median_s, (
        f"median of {TIMED_REQUESTS} normal requests: {after * 1000:.0f} ms after the corpus, "
        f"{baseline.median_s * 1000:.0f} ms before")
