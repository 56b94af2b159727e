"""The reduced-precision and CUDA paths: bf16 autocast in channels_last, nvJPEG decode, a server on the GPU.

The engine's bf16 path also runs on the CPU; everything CUDA is skipped where torch sees no
CUDA device (CI has none). ``bench/gpu_check.sh`` runs this file on a GPU machine before the
GPU benchmark.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from models import load_checkpoint
from models.transforms import resize_crop
from service.errors import RequestError
from service.http.errors import status_of
from service.inference.decode import DecodeLimits, decode_image, decode_jpegs
from service.inference.engine import Engine, Item
from tests.images import bogus_huffman_table, encode, jpeg, photo
from tests.server import Server, run_server
from tests.test_decode_on_worker import _worker_decoded
from tests.test_serve_predict import offline_probs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

IMAGES = [jpeg(seed) for seed in range(8)]


def _offline(checkpoint: Path) -> np.ndarray:
    return np.stack([offline_probs(checkpoint, d) for d in IMAGES])


@cuda
def test_nvjpeg_decodes_like_the_cpu_and_refuses_a_corrupt_file_alone() -> None:
    grey = encode(photo(20).convert("L"), "JPEG")
    out = decode_jpegs([*IMAGES, grey, bogus_huffman_table(IMAGES[0])], torch.device("cuda"))
    assert isinstance(out[-1], RequestError) and status_of(out[-1]) == 400
    for data, got in zip([*IMAGES, grey], out):
        assert isinstance(got, torch.Tensor) and got.device.type == "cuda"
        cpu = decode_image(data, DecodeLimits())
        assert got.shape == cpu.shape
        assert (got.cpu().float() - cpu.float()).abs().mean() < 1.0  # IDCTs differ by a grey level at most, mostly


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("on_device", [False, True], ids=["api-decoded", "device-decoded"])
def test_bf16_engine_agrees_with_the_fp32_cpu_model(resnet18_ckpt: Path, device: str, on_device: bool) -> None:
    ckpt = load_checkpoint(resnet18_ckpt)
    engine = Engine(torch.device(device), "bf16")
    engine.install({("m", "stable"): engine.prepare(ckpt.state, ckpt.meta, ckpt.version, "ckpt")}, ["m"])
    if on_device:
        items = [Item("stable", None, top_k=7, jpeg=d) for d in IMAGES]
    else:
        items = [Item("stable", resize_crop(ckpt.meta)(decode_image(d, DecodeLimits())), top_k=7) for d in IMAGES]
    answers = engine.run(items)
    got = np.stack([a.probabilities for a in answers])
    expected = _offline(resnet18_ckpt)
    assert np.abs(got - expected).max() < 0.05
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.75
    assert engine.decoded == (len(IMAGES) if on_device else 0)


@pytest.fixture(scope="module", params=["api", "worker"])
def gpu_server(request: pytest.FixtureRequest, resnet18_ckpt: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    with run_server(resnet18_ckpt, tmp_path_factory.mktemp("cuda"), "--device", "cuda", "--precision", "bf16",
                    "--decode-on", request.param) as srv:
        yield srv, request.param


@cuda
def test_server_on_the_gpu_agrees_with_the_offline_model(gpu_server: tuple[Server, str], resnet18_ckpt: Path) -> None:
    server, decode_on = gpu_server
    expected = _offline(resnet18_ckpt)
    for data, row in zip(IMAGES, expected):
        response = requests.post(f"{server.url}/predict?top_k=7", data=data, headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200, response.text
        for p in response.json()["predictions"]:
            assert p["score"] == pytest.approx(float(row[p["index"]]), abs=0.05)
    assert "device cuda" in server.log.read_text()
    assert _worker_decoded(server) == (len(IMAGES) if decode_on == "worker" else 0)
