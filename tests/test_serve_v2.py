"""KServe V2 against a real server: JSON and binary BYTES, FP32 pixels, tritonclient, errors."""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from PIL import Image

from models import eval_transform, load_checkpoint
from tests.images import jpeg
from tests.server import Server
from tests.test_serve_predict import offline_probs


def _name_and_version(server: Server) -> tuple[str, str]:
    ready = requests.get(f"{server.url}/ready").json()
    return ready["model"], ready["versions"]["stable"]


def test_server_and_model_metadata(server: Server) -> None:
    name, version = _name_and_version(server)
    meta = requests.get(f"{server.url}/v2").json()
    assert meta["name"] == "headswap" and "binary_tensor_data" in meta["extensions"]
    assert requests.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert requests.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    model = requests.get(f"{server.url}/v2/models/{name}").json()
    assert model["versions"] == [version]
    assert model["outputs"] == [{"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, 7]}]
    assert requests.get(f"{server.url}/v2/models/{name}/versions/{version}/ready").json() == {"name": name, "ready": True}


def test_json_base64_bytes_agrees_with_offline(server: Server, resnet18_ckpt: Path) -> None:
    name, version = _name_and_version(server)
    images = [jpeg(20), jpeg(21)]
    body = {"id": "r1", "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [2],
                                    "data": [base64.b64encode(i).decode() for i in images]}]}
    response = requests.post(f"{server.url}/v2/models/{name}/infer", json=body)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["id"] == "r1" and doc["model_version"] == version and doc["parameters"]["slot"] == "stable"
    out = doc["outputs"][0]
    assert out["name"] == "PROBABILITIES" and out["shape"] == [2, 7]
    probs = np.array(out["data"], dtype=np.float32).reshape(2, 7)
    for row, image in zip(probs, images):
        np.testing.assert_allclose(row, offline_probs(resnet18_ckpt, image), atol=1e-4)


def test_binary_extension_by_hand(server: Server) -> None:
    name, _ = _name_and_version(server)
    image = jpeg(22)
    header = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1],
                                     "parameters": {"binary_data_size": len(image) + 4}}],
                         "outputs": [{"name": "PROBABILITIES", "parameters": {"binary_data": True}}]}).encode()
    response = requests.post(f"{server.url}/v2/models/{name}/infer", data=header + struct.pack("<I", len(image)) + image,
                             headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    doc = json.loads(response.content[:length])
    probs = np.frombuffer(response.content[length:], dtype="<f4")
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 28 and probs.shape == (7,)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_fp32_pixels_match_offline(server: Server, resnet18_ckpt: Path) -> None:
    name, _ = _name_and_version(server)
    meta = load_checkpoint(resnet18_ckpt).meta
    data = jpeg(23)
    pixels = eval_transform(meta)(Image.open(io.BytesIO(data))).unsqueeze(0).numpy()
    body = {"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}]}
    doc = requests.post(f"{server.url}/v2/models/{name}/infer", json=body).json()
    np.testing.assert_allclose(np.array(doc["outputs"][0]["data"]), offline_probs(resnet18_ckpt, data), atol=1e-4)
    wrong = {"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192}]}
    r = requests.post(f"{server.url}/v2/models/{name}/infer", json=wrong)
    assert r.status_code == 400 and r.json() == {"error": "PIXELS must be [B,3,224,224] for this model, found [3, 8, 8]"}


def test_tritonclient_gets_the_same_top1_as_predict(server: Server) -> None:
    name, version = _name_and_version(server)
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    images = [jpeg(30 + i) for i in range(3)]
    inp = triton.InferInput("IMAGE", [3], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    outputs = [triton.InferRequestedOutput("PROBABILITIES", binary_data=True)]
    result = client.infer(name, [inp], outputs=outputs, model_version=version)
    probs = result.as_numpy("PROBABILITIES")
    classified = client.infer(name, [inp], outputs=[triton.InferRequestedOutput("PROBABILITIES", class_count=2)])
    labels = classified.as_numpy("PROBABILITIES")
    for i, image in enumerate(images):
        top = requests.post(f"{server.url}/predict", data=image, headers={"Content-Type": "image/jpeg"}).json()["predictions"][0]
        assert int(probs[i].argmax()) == top["index"]
        score, index, label = labels[i][0].decode().split(":")
        assert (int(index), label) == (top["index"], top["label"]) and float(score) == pytest.approx(top["score"], abs=1e-5)


@pytest.mark.parametrize("path, status, message", [
    ("/v2/models/nope/infer", 404, "unknown model 'nope'"),
    ("/v2/models/{name}/versions/000000000000/infer", 404, "no served version '000000000000'"),
])
def test_unknown_model_or_version_is_404(server: Server, path: str, status: int, message: str) -> None:
    name, _ = _name_and_version(server)
    r = requests.post(server.url + path.format(name=name), json={"inputs": []})
    assert r.status_code == status and message in r.json()["error"]


@pytest.mark.parametrize("body, headers, message", [
    (b"{", {}, "not"),
    (json.dumps({"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1], "data": [1.0]}]}).encode(), {}, "datatype"),
    (json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 99}}]}).encode(),
     {"Inference-Header-Content-Length": "5000"}, "Inference-Header-Content-Length"),
])
def test_malformed_v2_bodies_are_400(server: Server, body: bytes, headers: dict, message: str) -> None:
    name, _ = _name_and_version(server)
    r = requests.post(f"{server.url}/v2/models/{name}/infer", data=body, headers={"Content-Type": "application/json", **headers})
    assert r.status_code == 400 and message in r.json()["error"]


def test_undecodable_image_in_v2_is_400(server: Server) -> None:
    name, _ = _name_and_version(server)
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"nope").decode()]}]}
    r = requests.post(f"{server.url}/v2/models/{name}/infer", json=body)
    assert r.status_code == 400 and r.json()["error"].startswith("not a recognised image")
