"""``--decode-on worker``: JPEGs travel as bytes and the worker decodes each batch on its device.

On a GPU that is nvJPEG; here the same path runs on the CPU (torchvision's batched
``decode_jpeg`` call with ``device=cpu``), so the plumbing, the per-item failures and the
agreement with the offline model are checked on every machine.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from service.errors import RequestError
from service.http.errors import status_of
from service.inference import decode
from service.inference.decode import DecodeLimits, check_image, decode_image, decode_jpegs, device_decodable
from tests.images import bogus_huffman_table, encode, jpeg, photo
from tests.server import Server, run_server
from tests.test_hotswap import metric_value
from tests.test_serve_predict import offline_probs

CPU = torch.device("cpu")


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(3, (300, 200)), "JPEG", quality=95, exif=exif.tobytes())


def _second_frame_header(data: bytes, width: int = 60000, height: int = 60000) -> bytes:
    """An extra start-of-frame segment declaring a bomb before the real one (PIL reads the last)."""
    sof = b"\xff\xc0\x00\x11\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big") + b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return data[:2] + sof + data[2:]


@pytest.mark.parametrize("data, expected", [
    (jpeg(1), True),
    (encode(photo(2).convert("L"), "JPEG"), True),
    (bogus_huffman_table(jpeg(1)), True),  # the worker finds it corrupt (test below)
    (encode(photo(2), "JPEG", progressive=True), False),
    (encode(photo(2).convert("CMYK"), "JPEG"), False),
    (_rotated_jpeg(), False),
    (jpeg(1)[: len(jpeg(1)) // 2], False),
    (_second_frame_header(jpeg(1)), False),
    (encode(photo(2), "PNG"), False),
], ids=["rgb", "grey", "bogus-huffman-table", "progressive", "cmyk", "exif-rotated", "truncated", "two-frame-headers", "png"])
def test_which_images_the_device_decodes(data: bytes, expected: bool) -> None:
    assert device_decodable(data, check_image(data, DecodeLimits())) is expected


def test_large_jpegs_stay_with_the_api_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    data = jpeg(1, (64, 48))
    assert device_decodable(data, check_image(data, DecodeLimits()))
    monkeypatch.setattr(decode, "DEVICE_MAX_PIXELS", 64 * 48 - 1)
    assert not device_decodable(data, check_image(data, DecodeLimits()))


def test_a_second_frame_header_is_refused_by_the_api_path() -> None:
    with pytest.raises(RequestError) as info:
        decode_image(_second_frame_header(jpeg(1)), DecodeLimits())
    assert status_of(info.value) == 400


def test_batched_device_decode_matches_the_api_path_and_isolates_a_corrupt_jpeg() -> None:
    good = [jpeg(1), encode(photo(2).convert("L"), "JPEG"), jpeg(3, (64, 48))]
    corrupt = bogus_huffman_table(good[0])
    out = decode_jpegs([good[0], corrupt, good[1], good[2]], CPU)
    assert isinstance(out[1], RequestError) and status_of(out[1]) == 400 and str(out[1]).startswith("corrupt JPEG")
    for data, got in zip(good, [out[0], out[2], out[3]]):
        assert isinstance(got, torch.Tensor)
        assert torch.equal(got, decode_image(data, DecodeLimits()))


def test_a_decode_error_is_the_files_unless_its_first_line_names_cuda() -> None:
    """torch builds that append the C++ stack trace to an error name CUDA classes in its frames
    (torchvision 0.26's nvJPEG batch failure, seen on an H200): only the first line says what failed."""
    frames = ("\nException raised from decode_images at torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp:494\n"
              "frame #2: vision::image::CUDAJpegDecoder::decode_images(std::vector<at::Tensor> const&)")
    with pytest.raises(RequestError) as refused, decode.jpeg_errors():
        raise RuntimeError("Error while decoding JPEG images: Failed to decode batch: 3" + frames)
    assert status_of(refused.value) == 400
    assert str(refused.value) == "corrupt JPEG: Error while decoding JPEG images: Failed to decode batch: 3"
    with pytest.raises(RuntimeError, match="^CUDA error: an illegal memory access"), decode.jpeg_errors():
        raise RuntimeError("CUDA error: an illegal memory access was encountered" + frames)


def test_a_batch_of_good_jpegs_decodes_in_one_call() -> None:
    out = decode_jpegs([jpeg(4), jpeg(5)], CPU)
    assert [tuple(t.shape) for t in out] == [(3, 375, 500), (3, 375, 500)]


@pytest.fixture(scope="module")
def worker_decode(resnet18_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(resnet18_ckpt, tmp_path_factory.mktemp("decode-on-worker"), "--decode-on", "worker",
                    "--device", "cpu", "--precision", "fp32", "--workers-per-device", "1", "--max-batch-size", "8", "--batch-timeout-ms", "50") as srv:
        yield srv


def _worker_decoded(srv: Server) -> float:
    return metric_value(srv, "headswap_worker_decoded_images_total")


@pytest.mark.parametrize("data, on_worker", [(jpeg(6), 1), (jpeg(11, (224, 224)), 1), (_rotated_jpeg(), 0),
                                             (encode(photo(7), "PNG"), 0)],
                         ids=["jpeg", "jpeg-at-input-size", "exif-rotated", "png"])
def test_answers_agree_with_the_offline_model(worker_decode: Server, resnet18_ckpt: Path, data: bytes, on_worker: int) -> None:
    expected = offline_probs(resnet18_ckpt, data)
    before = _worker_decoded(worker_decode)
    response = requests.post(f"{worker_decode.url}/predict?top_k=7", data=data, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    assert _worker_decoded(worker_decode) - before == on_worker  # the others were decoded by the API server
    for p in response.json()["predictions"]:
        assert p["score"] == pytest.approx(float(expected[p["index"]]), abs=1e-4)


def test_a_corrupt_jpeg_in_a_batch_fails_alone(worker_decode: Server) -> None:
    good = jpeg(8)
    bad = bogus_huffman_table(good)  # its headers pass the API server's checks; the worker finds it corrupt
    bodies = [bad if i == 5 else good for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda b: requests.post(f"{worker_decode.url}/predict", data=b,
                                                          headers={"Content-Type": "image/jpeg"}), bodies))
    assert [r.status_code for r in responses] == [400 if i == 5 else 200 for i in range(12)]
    assert responses[5].json()["error"].startswith("corrupt JPEG")
    assert max(int(r.headers["X-Batch-Size"]) for r in responses if r.status_code == 200) > 1
    assert len({r.json()["predictions"][0]["index"] for r in responses if r.status_code == 200}) == 1


def test_v2_bytes_are_decoded_on_the_worker_too(worker_decode: Server, resnet18_ckpt: Path) -> None:
    data = [jpeg(9), jpeg(10)]
    before = _worker_decoded(worker_decode)
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [2],
                        "data": [base64.b64encode(d).decode() for d in data]}]}
    response = requests.post(f"{worker_decode.url}/v2/models/resnet18-test/infer", json=body)
    assert response.status_code == 200, response.text
    assert _worker_decoded(worker_decode) - before == 2
    probs = np.array(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, -1)
    for row, d in zip(probs, data):
        np.testing.assert_allclose(row, offline_probs(resnet18_ckpt, d), atol=1e-4)
