"""Load shedding, deadlines and readiness of every listener, against real servers.

Workers are paused with SIGSTOP where a test needs a queue that does not drain: what the
server admits, refuses and later refuses to run is then exact, with no timing in the asserts.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from bench.loadgen import process_cpu
from tests.images import jpeg
from tests.server import HEADSWAP, Server, free_port, proc_stat, run_server, session_pids
from tests.test_hotswap import TOKEN, admin, metric_value

IMAGE = jpeg(3)
ADMIN = {"HEADSWAP_ADMIN_TOKEN": TOKEN}


def burst(server: Server, count: int, *, path: str = "/predict", headers: dict | None = None,
          body: bytes = IMAGE) -> list[requests.Response]:
    """``count`` requests released together from their own threads; every response, in no order."""
    gate = threading.Barrier(count)
    responses: list[requests.Response] = []
    lock = threading.Lock()

    def one() -> None:
        gate.wait(30)
        r = requests.post(f"{server.url}{path}", data=body, timeout=60,
                          headers={"Content-Type": "image/jpeg", **(headers or {})})
        with lock:
            responses.append(r)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    return responses


@contextmanager
def paused_workers(server: Server) -> Iterator[list[int]]:
    pids = [w["pid"] for w in admin(server, "GET", "models").json()["workers"].values()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_a_burst_over_a_tiny_bound_is_shed_at_once_and_every_admitted_request_answered(
        resnet18_ckpt: Path, tmp_path: Path) -> None:
    with run_server(resnet18_ckpt, tmp_path, "--workers-per-device", "1", "--max-batch-size", "1",
                    "--max-queue", "2") as srv:
        responses = burst(srv, 32)
        statuses = sorted(r.status_code for r in responses)
        shed = [r for r in responses if r.status_code == 503]
        assert set(statuses) == {200, 503} and len(responses) == 32, statuses
        for r in shed:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"].startswith("overloaded: ")
        assert metric_value(srv, 'headswap_rejected_total{reason="overload"}') == len(shed)
        assert metric_value(srv, 'headswap_requests_total{endpoint="predict",status="503"}') == len(shed)
        assert metric_value(srv, "headswap_queue_depth") == 0
        assert requests.post(f"{srv.url}/predict", data=IMAGE, headers={"Content-Type": "image/jpeg"}).status_code == 200


def test_the_default_bound_counts_images_until_answered_and_504s_leave_it(resnet18_ckpt: Path, tmp_path: Path) -> None:
    """--max-queue auto with one worker of batch 1: a floor of 2 images in the server (nothing was
    drained yet, so no rate). With the worker paused two are admitted, the rest refused at once;
    once the two are answered 504 they leave the admitted count though they still wait for the
    worker, which takes them later and refuses them."""
    with run_server(resnet18_ckpt, tmp_path, "--workers-per-device", "1", "--max-batch-size", "1", env=ADMIN) as srv:
        with paused_workers(srv):
            answers: list[requests.Response] = []
            sender = threading.Thread(target=lambda: answers.extend(
                burst(srv, 6, headers={"X-Request-Timeout-Ms": "4000"})))
            sender.start()
            admitted = 0.0
            for _ in range(200):
                admitted = metric_value(srv, "headswap_admitted_images")
                if admitted == 2:
                    break
                threading.Event().wait(0.02)
            sender.join(90)
            after = metric_value(srv, "headswap_admitted_images"), metric_value(srv, "headswap_queue_depth")
        assert admitted == 2
        assert sorted(r.status_code for r in answers) == [503] * 4 + [504] * 2
        refused = [r.json()["error"] for r in answers if r.status_code == 503]
        assert all("in the server (waiting or running), the bound is 2 (--max-queue auto)" in e for e in refused), refused
        assert after == (0, 2)  # answered, yet still queued
        for _ in range(200):
            if metric_value(srv, "headswap_queue_depth") == 0:
                break
            threading.Event().wait(0.05)
        assert metric_value(srv, 'headswap_rejected_total{reason="deadline"}') == 2
        assert requests.post(f"{srv.url}/predict", data=IMAGE, headers={"Content-Type": "image/jpeg"}).status_code == 200


def test_the_bound_holds_over_api_processes_and_late_items_never_run(resnet18_ckpt: Path, tmp_path: Path) -> None:
    """Two workers, so two API-server processes; with the workers paused nothing leaves the queue:
    exactly --max-queue images are admitted however the requests spread over the processes. The
    admitted ones ask for a 3 s deadline, get a 504, and the workers refuse them without a forward pass."""
    bound = 5
    with run_server(resnet18_ckpt, tmp_path, "--workers-per-device", "2", "--max-queue", str(bound),
                    env=ADMIN) as srv:
        batches_before = metric_value(srv, "headswap_batch_size_count")
        with paused_workers(srv):
            responses = burst(srv, 16, headers={"X-Request-Timeout-Ms": "3000"})
            depth = metric_value(srv, "headswap_queue_depth")
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [503] * (16 - bound) + [504] * bound, statuses
        assert depth == bound
        assert metric_value(srv, "headswap_admitted_images") == 0  # every request answered: none is held
        for r in responses:
            if r.status_code == 504:
                assert "deadline" in r.json()["error"]
        # once they run again the workers take the expired items and refuse them
        deadline_refusals = 0.0
        for _ in range(200):
            deadline_refusals = metric_value(srv, 'headswap_rejected_total{reason="deadline"}')
            if deadline_refusals == bound:
                break
            threading.Event().wait(0.05)
        assert deadline_refusals == bound
        assert metric_value(srv, "headswap_batch_size_count") == batches_before  # no forward pass for them
        assert metric_value(srv, "headswap_queue_depth") == 0
        assert metric_value(srv, 'headswap_rejected_total{reason="overload"}') == 16 - bound


def _thread_nices(pid: int) -> set[int]:
    """The niceness of every thread of process ``pid`` (Linux keeps one per thread)."""
    return {int(proc_stat(task)[16]) for task in Path(f"/proc/{pid}/task").iterdir()}


def test_workers_yield_the_cores_to_the_api_servers_by_worker_nice(resnet18_ckpt: Path, tmp_path: Path) -> None:
    """Every thread of every inference worker runs --worker-nice above the server's niceness; the API
    servers' threads (event loop, decode pool) keep the server's."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    with run_server(resnet18_ckpt, tmp_path, "--workers-per-device", "2", "--worker-nice", "7", env=ADMIN) as srv:
        requests.post(f"{srv.url}/predict", data=IMAGE, headers={"Content-Type": "image/jpeg"}, timeout=60).raise_for_status()
        workers = [w["pid"] for w in admin(srv, "GET", "models").json()["workers"].values()]
        assert len(workers) == 2
        for pid in workers:
            assert _thread_nices(pid) == {min(19, base + 7)}
        others = set(session_pids(srv.proc.pid)) - set(workers)
        assert srv.proc.pid in others
        for pid in others:
            assert _thread_nices(pid) == {base}


def _cpu_ticks(pid: int) -> int:
    fields = proc_stat(Path(f"/proc/{pid}"))
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_a_lone_clients_requests_all_go_to_one_worker(resnet18_ckpt: Path, tmp_path: Path) -> None:
    """With two workers, one client's requests in turn all run on the same worker (the lowest idle
    one, whose weights are in the cache), not on each worker in turn: the other spends next to no
    CPU time while they run."""
    with run_server(resnet18_ckpt, tmp_path, "--device", "cpu", "--workers-per-device", "2", env=ADMIN) as srv:
        workers = [w["pid"] for w in admin(srv, "GET", "models").json()["workers"].values()]
        assert len(workers) == 2
        before = [_cpu_ticks(pid) for pid in workers]
        with requests.Session() as client:
            for _ in range(30):
                r = client.post(f"{srv.url}/predict", data=IMAGE, headers={"Content-Type": "image/jpeg"}, timeout=60)
                assert r.status_code == 200, r.text
        spent = sorted(_cpu_ticks(pid) - start for pid, start in zip(workers, before))
        assert spent[0] < 0.25 * spent[1], spent  # taken in turn, each would have spent about half


def test_api_servers_apart_from_the_workers_each_serve_end_to_end(resnet18_ckpt: Path, tmp_path: Path) -> None:
    """--api-servers 2 beside one worker: two API-server processes (forks of the main process, after
    the request queue's process and LitServe's manager), ready over gRPC too, and each one alone
    answers /predict from the one worker: with the other stopped, the listening socket's connections
    all go to it."""
    import tritonclient.grpc as triton  # noqa: PLC0415 - the test extra

    grpc_port = free_port()
    with run_server(resnet18_ckpt, tmp_path, "--workers-per-device", "1", "--api-servers", "2",
                    "--grpc-port", str(grpc_port), env=ADMIN) as srv:
        assert triton.InferenceServerClient(f"127.0.0.1:{grpc_port}").is_server_ready()
        workers = [w["pid"] for w in admin(srv, "GET", "models").json()["workers"].values()]
        assert len(workers) == 1
        roles = process_cpu(srv.proc.pid)  # the benchmark's reading of the session's processes
        api = sorted(pid for pid, info in roles.items() if info["role"] == "api")
        assert len(api) == 2, roles
        for stopped in api:  # the other answers alone
            os.kill(stopped, signal.SIGSTOP)
            try:
                for _ in range(3):  # a new connection each
                    r = requests.post(f"{srv.url}/predict", data=IMAGE, headers={"Content-Type": "image/jpeg"}, timeout=30)
                    assert r.status_code == 200 and r.json()["predictions"], r.text
            finally:
                os.kill(stopped, signal.SIGCONT)


def test_a_full_queue_refuses_predict_before_reading_it_and_keeps_the_connection(
        resnet18_ckpt: Path, tmp_path: Path) -> None:
    """With the queue full, a /predict is refused by the early check (its body is never read), with
    the route's own answer and metrics; the keep-alive connection carries on, and once the queue
    drains the same connection is served. A request the early check cannot judge (V2, whose image
    count is in its body) and one to another route are left to their routes."""
    with run_server(resnet18_ckpt, tmp_path, "--workers-per-device", "1", "--max-queue", "1", env=ADMIN) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        with paused_workers(srv):
            queued = threading.Thread(target=requests.post, args=(f"{srv.url}/predict",),
                                      kwargs={"data": IMAGE, "headers": {"Content-Type": "image/jpeg"}, "timeout": 60})
            queued.start()
            while metric_value(srv, "headswap_queue_depth") < 1:
                threading.Event().wait(0.02)
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            answers = []
            # text/plain: the route would answer 415 before admitting; refused early, it never gets there
            for body, kind in ((IMAGE, "image/jpeg"), (b"not an image", "text/plain"), (IMAGE, "image/jpeg")):
                conn.request("POST", "/predict", body=body, headers={"Content-Type": kind})
                response = conn.getresponse()
                answers.append((response.status, response.getheader("Retry-After"), json.loads(response.read())))
            sock = conn.sock
            v2 = requests.post(f"{srv.url}/v2/models/resnet18-test/infer", json={"inputs": [
                {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(IMAGE).decode()]}]})
            health = requests.get(f"{srv.url}/health")
        queued.join(60)
        conn.request("POST", "/predict", body=IMAGE, headers={"Content-Type": "image/jpeg"})
        after = conn.getresponse()
        assert (after.status, conn.sock is sock) == (200, True), after.read()
        after.read()
        conn.close()
        for status, retry_after, body in answers:
            assert (status, int(retry_after) >= 1) == (503, True)
            assert body["error"].startswith("overloaded: 1 images are waiting, the bound is 1 (--max-queue 1)")
        assert (v2.status_code, v2.headers["Retry-After"]) == (503, "1") and v2.json()["error"].startswith("overloaded")
        assert health.status_code == 200
        assert metric_value(srv, 'headswap_requests_total{endpoint="predict",status="503"}') == 3
        assert metric_value(srv, 'headswap_rejected_total{reason="overload"}') == 4  # 3 /predict + 1 V2 image


def test_a_v2_request_is_admitted_or_refused_whole_and_takes_its_timeout_parameter(
        resnet18_ckpt: Path, tmp_path: Path) -> None:
    with run_server(resnet18_ckpt, tmp_path, "--workers-per-device", "1", "--max-queue", "3", env=ADMIN) as srv:
        name = requests.get(f"{srv.url}/ready").json()["model"]

        def v2(count: int, parameters: dict | None = None) -> dict:
            data = [base64.b64encode(IMAGE).decode()] * count
            return {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [count], "data": data}],
                    **({"parameters": parameters} if parameters else {})}

        url = f"{srv.url}/v2/models/{name}/infer"
        assert requests.post(url, json=v2(3)).status_code == 200
        r = requests.post(url, json=v2(4))  # more than the whole bound: refused whole, nothing queued
        assert r.status_code == 503 and r.json()["error"].startswith("overloaded: ") and "Retry-After" in r.headers
        assert metric_value(srv, 'headswap_rejected_total{reason="overload"}') == 4
        mixed = v2(3)
        mixed["inputs"][0]["data"][1] = base64.b64encode(b"not an image").decode()
        r = requests.post(url, json=mixed)
        assert r.status_code == 400
        assert metric_value(srv, "headswap_queue_depth") == 0  # the good two were answered, the bad one given back
        with paused_workers(srv):
            r = requests.post(url, json=v2(2, {"timeout": 500_000}))  # 0.5 s, in microseconds as Triton's
        assert r.status_code == 504
        for bad in ({"timeout": -1}, {"timeout": "soon"}, {"timeout": 1.5}):
            r = requests.post(url, json=v2(1, bad))
            assert r.status_code == 400 and "parameters.timeout" in r.json()["error"]


@pytest.mark.parametrize("value", ["0", "-5", "soon", "1.5", "1e3", "１２"])
def test_a_malformed_timeout_header_is_a_400(server: Server, value: str) -> None:
    r = requests.post(f"{server.url}/predict", data=IMAGE,
                      headers={"Content-Type": "image/jpeg", "X-Request-Timeout-Ms": value.encode().decode("latin-1")})
    assert r.status_code == 400
    assert r.json()["error"].startswith("X-Request-Timeout-Ms must be a positive whole number of milliseconds")


def test_a_generous_timeout_header_changes_nothing(server: Server) -> None:
    r = requests.post(f"{server.url}/predict", data=IMAGE,
                      headers={"Content-Type": "image/jpeg", "X-Request-Timeout-Ms": "600000"})
    assert r.status_code == 200


def test_ready_means_every_listener_answers(resnet18_ckpt: Path, tmp_path: Path) -> None:
    """Right after the first /ready 200, with no retry, the admin and metrics ports answer."""
    admin_port, metrics_port = free_port(), free_port()
    with run_server(resnet18_ckpt, tmp_path, "--admin-port", str(admin_port), "--metrics-port", str(metrics_port),
                    env=ADMIN) as srv:  # run_server returns at the first /ready 200
        models = requests.get(f"http://127.0.0.1:{admin_port}/admin/models",
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert models.status_code == 200 and models.json()["stable"]["arch"] == "resnet18"
        assert metrics.status_code == 200 and "headswap_queue_depth" in metrics.text
        assert requests.get(f"{srv.url}/v2/health/ready").json() == {"ready": True}


@pytest.mark.parametrize("which", ["--admin-port", "--metrics-port", "--port"])
def test_a_taken_port_fails_start_up_with_one_line(resnet18_ckpt: Path, tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": str(free_port()), which: str(port)}
        proc = subprocess.run([HEADSWAP, "serve", "--checkpoint", str(resnet18_ckpt), *sum(ports.items(), ())],
                              capture_output=True, text=True, timeout=120, env={**os.environ, **ADMIN},
                              start_new_session=True)
    what = {"--admin-port": "admin port", "--metrics-port": "metrics port", "--port": "server"}[which]
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"headswap: error: cannot listen on 127.0.0.1:{port} for the {what}: Address already in use"
