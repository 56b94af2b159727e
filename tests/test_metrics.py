"""Prometheus metrics against a real server with 2 workers: exact counts across processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from models import load_checkpoint
from service.observability.metrics import pass_buckets
from tests.conftest import make_checkpoint
from tests.images import jpeg
from tests.server import Server, free_port, run_server
from tests.test_hotswap import TOKEN, admin

IMAGE = jpeg(50)


@pytest.fixture(scope="module")
def msrv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, int]]:
    store = tmp_path_factory.mktemp("mstore")
    make_checkpoint(store / "base.safetensors", seed=0)
    make_checkpoint(store / "v2.safetensors", seed=1)
    port = free_port()
    with run_server(store / "base.safetensors", tmp_path_factory.mktemp("metrics"), "--workers-per-device", "2",
                    "--metrics-port", str(port), env={"HEADSWAP_ADMIN_TOKEN": TOKEN}) as server:
        yield server, store, port


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(url).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(snapshot: dict, name: str, **labels: str) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


def post(server: Server, body: bytes, content_type: str = "image/jpeg", key: str | None = None) -> requests.Response:
    headers = {"Content-Type": content_type, **({"X-Request-Key": key} if key else {})}
    return requests.post(f"{server.url}/predict", data=body, headers=headers, timeout=60)


def test_counts_are_exact_across_processes(msrv: tuple[Server, Path, int]) -> None:
    server, store, _ = msrv
    assert admin(server, "POST", "load", {"checkpoint": "v2.safetensors", "slot": "canary"}).status_code == 200
    assert admin(server, "POST", "canary", {"weight": 50}).status_code == 200
    before = samples(f"{server.url}/metrics")
    bodies = [(IMAGE, "image/jpeg", f"k{i}") for i in range(40)] + [(b"junk", "image/jpeg", None)] * 5 + [(b"x", "text/plain", None)] * 3
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda b: post(server, *b), bodies))
    slots = [r.headers.get("X-Model-Slot") for r in responses[:40]]
    after = samples(f"{server.url}/metrics")
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    m = "resnet18-test"  # the served model, named by its checkpoint
    assert delta("headswap_requests_total", endpoint="predict", status="200", slot="stable", model=m) == slots.count("stable")
    assert delta("headswap_requests_total", endpoint="predict", status="200", slot="canary", model=m) == slots.count("canary")
    assert slots.count("canary") > 0 and slots.count("stable") > 0
    assert delta("headswap_requests_total", endpoint="predict", status="400", slot="stable", model=m) + \
        delta("headswap_requests_total", endpoint="predict", status="400", slot="canary", model=m) == 5
    assert delta("headswap_requests_total", endpoint="predict", status="415", slot="none", model=m) == 3
    assert delta("headswap_request_duration_seconds_count", endpoint="predict", model=m) == 48
    assert delta("headswap_queue_wait_seconds_count", model=m) == 40
    assert delta("headswap_input_errors_total", reason="not_an_image") == 5
    assert delta("headswap_input_errors_total", reason="content_type") == 3
    batches = delta("headswap_batch_size_count")
    assert delta("headswap_batch_size_sum") == 40 and 1 <= batches <= 40
    assert delta("headswap_inference_duration_seconds_count", model=m, slot="stable") + \
        delta("headswap_inference_duration_seconds_count", model=m, slot="canary") >= batches
    served = admin(server, "GET", "models").json()
    backbones = {served["stable"]["backbone"], served["canary"]["backbone"]}  # two full checkpoints: two backbones
    assert len(backbones) == 2
    passes = sum(delta("headswap_backbone_passes_total", backbone=b) for b in backbones)
    assert batches <= passes <= 2 * batches  # one pass per backbone a batch holds images of
    assert delta("headswap_images_per_backbone_pass_sum") == 40
    assert value(after, "headswap_canary_weight", model=m) == 50
    assert admin(server, "POST", "rollback").status_code == 200


def test_inflight_rises_under_load_and_returns_to_zero(msrv: tuple[Server, Path, int]) -> None:
    server, _, _ = msrv
    stop, peak = threading.Event(), [0.0]

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], value(samples(f"{server.url}/metrics"), "headswap_inflight_requests"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(12) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda _: post(server, IMAGE), range(120)))
    stop.set()
    watcher.join()
    assert peak[0] >= 2
    assert value(samples(f"{server.url}/metrics"), "headswap_inflight_requests") == 0


def test_model_info_follows_a_hot_swap_and_metrics_port_serves_the_same(msrv: tuple[Server, Path, int]) -> None:
    server, store, port = msrv
    base, v2 = (load_checkpoint(store / n).version for n in ("base.safetensors", "v2.safetensors"))
    info = lambda snap: {dict(k[1])["version"] for k, v in snap.items() if k[0] == "headswap_model_info" and dict(k[1])["slot"] == "stable" and v == 1}  # noqa: E731
    assert info(samples(f"{server.url}/metrics")) == {base}
    ok = value(samples(f"{server.url}/metrics"), "headswap_swaps_total", slot="stable", result="ok")
    assert admin(server, "POST", "load", {"checkpoint": "v2.safetensors"}).status_code == 200
    snap = samples(f"{server.url}/metrics")
    assert info(snap) == {v2}
    assert value(snap, "headswap_swaps_total", slot="stable", result="ok") == ok + 1
    assert value(snap, "headswap_swap_duration_seconds_count") >= 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            side = samples(f"http://127.0.0.1:{port}/metrics")
            break
        except requests.ConnectionError:
            time.sleep(0.2)
    assert info(side) == {v2}
    assert value(side, "headswap_swaps_total", slot="stable", result="ok") == ok + 1
    roles = {dict(k[1])["role"] for k in snap if k[0] == "headswap_process_resident_memory_bytes"}
    assert roles == {"main", "api", "worker"}


def test_images_per_backbone_pass_buckets_end_at_the_largest_batch() -> None:
    assert pass_buckets(16) == (1.0, 2.0, 4.0, 8.0, 16.0)
    assert pass_buckets(12) == (1.0, 2.0, 4.0, 8.0, 12.0)
    assert pass_buckets(1) == (1.0,)
