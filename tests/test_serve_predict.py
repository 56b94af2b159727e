"""A real server: /predict in all three forms, agreement with the offline model, batching,
per-item failures, every error status, and a clean SIGTERM under load."""

from __future__ import annotations

import base64
import io
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from bench.loadgen import process_cpu
from models import eval_transform, load_classifier
from tests.images import encode, jpeg, photo
from tests.server import Server, run_server, sigterm_under_load, wait_gone


def offline_probs(checkpoint: Path, data: bytes) -> np.ndarray:
    model, meta = load_classifier(checkpoint)
    with torch.inference_mode():
        x = eval_transform(meta)(Image.open(io.BytesIO(data))).unsqueeze(0)
        return model(x).softmax(-1)[0].numpy()


def _scores(body: dict) -> dict[int, float]:
    return {p["index"]: p["score"] for p in body["predictions"]}


def test_three_input_forms_agree_with_the_offline_model(server: Server, resnet18_ckpt: Path) -> None:
    data = jpeg(1)
    expected = offline_probs(resnet18_ckpt, data)
    raw = requests.post(f"{server.url}/predict?top_k=7", data=data, headers={"Content-Type": "image/jpeg"})
    form = requests.post(f"{server.url}/predict", files={"file": ("x.jpg", data, "image/jpeg")}, data={"top_k": "7"})
    js = requests.post(f"{server.url}/predict", json={"image": base64.b64encode(data).decode(), "top_k": 7})
    for response in (raw, form, js):
        assert response.status_code == 200, response.text
        body = response.json()
        assert [p["index"] for p in body["predictions"]] == list(np.argsort(-expected, kind="stable"))
        for index, score in _scores(body).items():
            assert score == pytest.approx(float(expected[index]), abs=1e-4)
        assert body["predictions"][0]["label"] == f"class{body['predictions'][0]['index']}"
        assert body["model"] == {"name": "resnet18-test", "version": response.headers["X-Model-Version"], "slot": "stable"}
        assert response.headers["X-Model-Slot"] == "stable"


@pytest.mark.parametrize("make", [
    lambda: encode(photo(2).convert("L"), "PNG"),
    lambda: encode(photo(3).convert("RGBA"), "PNG"),
    lambda: encode(photo(4).convert("P"), "GIF"),
    lambda: encode(photo(5).convert("CMYK"), "JPEG"),
    lambda: encode(photo(6), "WEBP", quality=80),
    lambda: encode(Image.fromarray(np.asarray(photo(7).convert("L"), dtype=np.uint16) * 257), "PNG"),
], ids=["gray-png", "rgba-png", "palette-gif", "cmyk-jpeg", "webp", "16bit-png"])
def test_unusual_modes_are_served_like_offline(server: Server, resnet18_ckpt: Path, make) -> None:
    data = make()
    expected = offline_probs(resnet18_ckpt, data)
    response = requests.post(f"{server.url}/predict?top_k=3", data=data, headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    for index, score in _scores(response.json()).items():
        assert score == pytest.approx(float(expected[index]), abs=1e-4)


def test_exif_rotation_is_applied(server: Server) -> None:
    image = photo(8, (300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated_tagged = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    upright = encode(image.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95)
    a = requests.post(f"{server.url}/predict?top_k=7", data=rotated_tagged, headers={"Content-Type": "image/jpeg"}).json()
    b = requests.post(f"{server.url}/predict?top_k=7", data=upright, headers={"Content-Type": "image/jpeg"}).json()
    assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
    for x, y in zip(a["predictions"], b["predictions"]):
        assert x["score"] == pytest.approx(y["score"], abs=2e-2)  # re-encoding differs a little


def test_top_k_default_and_cap(server: Server) -> None:
    data = jpeg(9)
    assert len(requests.post(f"{server.url}/predict", data=data, headers={"Content-Type": "image/jpeg"}).json()["predictions"]) == 5
    assert len(requests.post(f"{server.url}/predict?top_k=100", data=data, headers={"Content-Type": "image/jpeg"}).json()["predictions"]) == 7


def test_concurrent_requests_are_batched(server: Server) -> None:
    data = jpeg(10)
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: requests.post(f"{server.url}/predict", data=data, headers={"Content-Type": "image/jpeg"}), range(48)))
    assert all(r.status_code == 200 for r in responses)
    sizes = [int(r.headers["X-Batch-Size"]) for r in responses]
    assert max(sizes) > 1 and max(sizes) <= 8


def _answer_sockets(pid: int) -> dict[str, list[str]]:
    """The abstract Unix sockets of server ``pid``'s answer listeners (service.inference.answers), by
    name: each one's state in /proc/net/unix (01: listening, 03: a connection accepted from a worker)."""
    found: dict[str, list[str]] = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[7].startswith(f"@headswap-answers-{pid}-"):
            found.setdefault(fields[7], []).append(fields[5])
    return found


def test_answers_come_back_over_each_api_servers_own_socket(server: Server) -> None:
    """Each API server (one per worker, two here) listens on its own answer socket, and the workers that
    answered these requests hold connections to them: answers skip LitServe's manager queue."""
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: requests.post(f"{server.url}/predict", data=jpeg(i),
                                                          headers={"Content-Type": "image/jpeg"}).status_code, range(24)))
    assert statuses == [200] * 24
    sockets = _answer_sockets(server.proc.pid)
    assert sorted(name.rsplit("-", 1)[1] for name in sockets) == ["0", "1"]
    assert all(states.count("01") == 1 for states in sockets.values()), sockets
    assert sum(states.count("03") for states in sockets.values()) >= 1, sockets


def test_one_bad_image_among_concurrent_good_ones_fails_alone(server: Server) -> None:
    good, bad = jpeg(11), jpeg(11)[: len(jpeg(11)) // 3]
    bodies = [bad if i == 7 else good for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda b: requests.post(f"{server.url}/predict", data=b, headers={"Content-Type": "image/jpeg"}), bodies))
    assert [r.status_code for r in responses] == [400 if i == 7 else 200 for i in range(16)]
    assert responses[7].json()["error"].startswith("corrupt JPEG")


@pytest.mark.parametrize("body, headers, status, message", [
    (b"not an image at all", {"Content-Type": "image/jpeg"}, 400, "not a recognised image"),
    (b"", {"Content-Type": "image/png"}, 400, "empty image"),
    (b'{"top_k": 3}', {"Content-Type": "application/json"}, 400, 'with an "image" field'),
    (b'{"image": "***"}', {"Content-Type": "application/json"}, 400, "not valid base64"),
    (b"{nope", {"Content-Type": "application/json"}, 400, "not valid JSON"),
    (b"hello", {"Content-Type": "text/plain"}, 415, "content type 'text/plain' is not accepted"),
    (b"x" * 2_000_001, {"Content-Type": "image/jpeg"}, 413, "over the limit of 2000000"),
])
def test_error_statuses(server: Server, body: bytes, headers: dict, status: int, message: str) -> None:
    response = requests.post(f"{server.url}/predict", data=body, headers=headers)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_bad_top_k_and_multipart_without_file(server: Server) -> None:
    r = requests.post(f"{server.url}/predict?top_k=zero", data=jpeg(1), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 400 and r.json() == {"error": "top_k must be a positive integer, found 'zero'"}
    r = requests.post(f"{server.url}/predict", files={"other": ("x.jpg", b"x")})
    assert r.status_code == 400 and r.json() == {"error": "multipart body must have a file field named 'file'"}


def test_decompression_bomb_is_413_without_decoding(server: Server) -> None:
    bomb = encode(Image.new("L", (4000, 4000)), "PNG")  # 16 MP declared, a few KB on the wire
    response = requests.post(f"{server.url}/predict", data=bomb, headers={"Content-Type": "image/png"})
    assert response.status_code == 413
    assert response.json()["error"] == "image declares 4000x4000 = 16000000 pixels, over the limit of 4000000"


def test_health_and_ready(server: Server) -> None:
    assert requests.get(f"{server.url}/health").json() == {"status": "alive"}
    ready = requests.get(f"{server.url}/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert requests.get(f"{server.url}/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]


def test_sigterm_under_load_finishes_in_flight_and_leaves_no_process(resnet18_ckpt: Path, tmp_path: Path) -> None:
    with run_server(resnet18_ckpt, tmp_path, "--workers-per-device", "2") as srv:
        assert len(queue_processes(srv.proc.pid)) == 1  # the request queue's, named for ps and top
        data = jpeg(12)
        code, results = sigterm_under_load(srv, ["/predict"] * 4, lambda i: data)
        assert code == 0, srv.output()[-3000:]
        assert results and set(results) == {200}
        assert wait_gone(srv.proc.pid) == []


def test_the_request_queue_process_ends_with_a_killed_main_process(resnet18_ckpt: Path, tmp_path: Path) -> None:
    """The main process killed outright (no shutdown of its own): the kernel ends the queue process
    with it, rather than leave it holding memory forever."""
    with run_server(resnet18_ckpt, tmp_path) as srv:
        [queue] = queue_processes(srv.proc.pid)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(30)
        deadline = time.monotonic() + 10
        while queue in queue_processes(srv.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queue not in queue_processes(srv.proc.pid)


def test_a_killed_request_queue_stops_the_server_with_exit_code_1(resnet18_ckpt: Path, tmp_path: Path) -> None:
    """Nothing can reach a worker any more (a request meanwhile hears 503 at once:
    tests/test_request_queue.py): the server says why and stops, exit code 1, for its supervisor
    to start it afresh, leaving no process behind."""
    with run_server(resnet18_ckpt, tmp_path) as srv:
        assert requests.get(f"{srv.url}/ready").status_code == 200
        [queue] = queue_processes(srv.proc.pid)
        os.kill(queue, signal.SIGKILL)
        assert srv.proc.wait(60) == 1
        assert f"the request queue's process (pid {queue}) is gone" in srv.output()
        assert wait_gone(srv.proc.pid) == []


def queue_processes(sid: int) -> list[int]:
    return [pid for pid, info in process_cpu(sid).items() if info["role"] == "queue"]  # named headswap-queue
