"""Hot-swaps and canaries against a real server with 2 workers, under load."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch

from models import build_classifier, classifier_from_state, eval_transform, load_checkpoint, merge_state, state_version
from tests.conftest import make_checkpoint
from tests.images import jpeg
from tests.server import HEADSWAP, Server, run_server

TOKEN = "s3cret-admin-token-for-tests"
IMAGE = jpeg(40)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint store with good, partial and hostile checkpoints."""
    root = tmp_path_factory.mktemp("store")
    make_checkpoint(root / "base.safetensors", seed=0)
    make_checkpoint(root / "v2.safetensors", seed=1)
    make_checkpoint(root / "v3.pt", seed=2)
    subprocess.run([HEADSWAP, "slice", str(root / "v3.pt"), "--out", str(root / "head.safetensors"), "--head"], check=True)
    make_checkpoint(root / "squeeze.safetensors", arch="squeezenet1_1")
    make_checkpoint(root / "five.safetensors", classes=[f"c{i}" for i in range(5)])
    data = (root / "v2.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    loaded = load_checkpoint(root / "v2.safetensors")
    from models import save_checkpoint
    save_checkpoint(root / "nan.safetensors", {k: v.fill_(float("nan")) if k == "layer1.0.conv1.weight" else v
                                               for k, v in loaded.state.items()}, loaded.meta)
    torch.save(build_classifier("resnet18", 7), root / "pickled.pt")
    outside = tmp_path_factory.mktemp("outside") / "evil.safetensors"
    make_checkpoint(outside, seed=3)
    os.symlink(outside, root / "link.safetensors")
    return root


@pytest.fixture(scope="module")
def srv(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hotswap")
    with run_server(store / "base.safetensors", tmp, "--workers-per-device", "2", "--max-batch-size", "8",
                    "--state-dir", str(tmp / "state"), "--guard-window", "20", "--guard-min-agreement", "0.8",
                    env={"HEADSWAP_ADMIN_TOKEN": TOKEN}) as server:
        yield server


def admin(server: Server, method: str, path: str, body: dict | None = None, token: str = TOKEN) -> requests.Response:
    return requests.request(method, f"{server.url}/admin/{path}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=300)


def predict(server: Server, key: str | None = None) -> requests.Response:
    headers = {"Content-Type": "image/jpeg", **({"X-Request-Key": key} if key else {})}
    return requests.post(f"{server.url}/predict?top_k=7", data=IMAGE, headers=headers, timeout=60)


def offline(path_or_state, meta=None) -> dict[int, float]:
    if meta is None:
        loaded = load_checkpoint(path_or_state)
        path_or_state, meta = loaded.state, loaded.meta
    model = classifier_from_state(path_or_state, meta)
    import io

    from PIL import Image
    with torch.inference_mode():
        probs = model(eval_transform(meta)(Image.open(io.BytesIO(IMAGE))).unsqueeze(0)).softmax(-1)[0]
    return {i: float(p) for i, p in enumerate(probs)}


def scores(response: requests.Response) -> dict[int, float]:
    return {p["index"]: p["score"] for p in response.json()["predictions"]}


def reset(server: Server, store: Path) -> None:
    """Back to base.safetensors as stable, no canary."""
    state = admin(server, "GET", "models").json()
    if state["canary"]:
        assert admin(server, "POST", "rollback").status_code == 200
    base = load_checkpoint(store / "base.safetensors").version
    if admin(server, "GET", "models").json()["stable"]["version"] != base:
        assert admin(server, "POST", "load", {"checkpoint": "base.safetensors"}).status_code == 200


@dataclass
class Sample:
    sent: float
    received: float
    status: int
    version: str | None
    slot: str | None


class Load:
    """Closed-loop load from a few threads until stopped (bounded by count and time)."""

    def __init__(self, server: Server, threads: int = 4, limit: int = 5000, seconds: float = 240) -> None:
        self.server, self.samples, self.stop = server, [], threading.Event()
        self.deadline = time.monotonic() + seconds
        self.threads = [threading.Thread(target=self._run, args=(limit // threads,)) for _ in range(threads)]

    def _run(self, count: int) -> None:
        session = requests.Session()
        for _ in range(count):
            if self.stop.is_set() or time.monotonic() > self.deadline:
                return
            sent = time.monotonic()
            r = session.post(f"{self.server.url}/predict", data=IMAGE, headers={"Content-Type": "image/jpeg"}, timeout=60)
            self.samples.append(Sample(sent, time.monotonic(), r.status_code, r.headers.get("X-Model-Version"), r.headers.get("X-Model-Slot")))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def test_admin_needs_the_token(srv: Server) -> None:
    assert admin(srv, "GET", "models", token="wrong").status_code == 401
    assert requests.get(f"{srv.url}/admin/models").status_code == 401
    body = admin(srv, "GET", "models", token="wrong").json()
    assert TOKEN not in json.dumps(body)
    assert admin(srv, "GET", "models").status_code == 200
    assert TOKEN not in srv.output()


def test_five_swaps_under_load_fail_nothing_and_switch_everyone(srv: Server, store: Path) -> None:
    reset(srv, store)
    swaps = [
        {"checkpoint": "v2.safetensors"},                                          # replace stable
        {"checkpoint": "head.safetensors", "mode": "merge"},                       # merge into stable
        {"checkpoint": "v3.pt", "slot": "canary"},                                 # replace onto canary
        {"checkpoint": "head.safetensors", "slot": "canary", "mode": "merge"},     # merge into canary
        {"checkpoint": "base.safetensors"},                                        # replace stable again
    ]
    timeline = []  # (started, returned, versions after)
    with Load(srv) as load:
        while len(load.samples) < 20:
            time.sleep(0.05)
        for body in swaps:
            started = time.monotonic()
            response = admin(srv, "POST", "load", body)
            assert response.status_code == 200, response.text
            versions = {v for v in response.json()["versions"].values() if v}
            timeline.append((started, time.monotonic(), versions))
            if body.get("slot") == "canary":
                assert admin(srv, "POST", "canary", {"weight": 50}).status_code == 200
            count = len(load.samples)
            while len(load.samples) < count + 20:
                time.sleep(0.05)
    samples = load.samples
    assert len(samples) > 100 and Counter(s.status for s in samples) == {200: len(samples)}
    legit = set().union(*(v for _, _, v in timeline)) | {load_checkpoint(store / "base.safetensors").version}
    assert {s.version for s in samples} <= legit
    for i, (_, returned, versions) in enumerate(timeline):
        next_start = timeline[i + 1][0] if i + 1 < len(timeline) else float("inf")
        after = [s for s in samples if s.sent > returned and s.received < next_start]
        assert after, f"no request fell after swap {i}"
        assert {s.version for s in after} <= versions, f"swap {i}: old version answered after the swap returned"
    workers = admin(srv, "GET", "models").json()["workers"]
    assert len(workers) == 2 and len({json.dumps(w["versions"], sort_keys=True) for w in workers.values()}) == 1


def test_head_merge_changes_exactly_the_head(srv: Server, store: Path) -> None:
    reset(srv, store)
    before = scores(predict(srv))
    base, head = load_checkpoint(store / "base.safetensors"), load_checkpoint(store / "head.safetensors")
    merged, report = merge_state(base.state, head.state)
    response = admin(srv, "POST", "load", {"checkpoint": "head.safetensors", "mode": "merge", "min_match": 1.0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["versions"]["stable"] == state_version(merged)
    assert body["merge_report"]["merged"] == ["fc.bias", "fc.weight"] and body["merge_report"]["source_fraction"] == 1.0
    after = scores(predict(srv))
    expected = offline(merged, base.meta)
    assert after != before
    for index, score in after.items():
        assert score == pytest.approx(expected[index], abs=1e-4)
    # every non-head tensor is the base's own: the merged state differs from base only in fc.*
    assert [k for k in base.state if not torch.equal(base.state[k], merged[k])] == ["fc.bias", "fc.weight"]


def test_canary_weight_20_takes_20_percent_and_keys_are_sticky(srv: Server, store: Path) -> None:
    reset(srv, store)
    assert admin(srv, "POST", "load", {"checkpoint": "v2.safetensors", "slot": "canary"}).status_code == 200
    assert admin(srv, "POST", "canary", {"weight": 20}).status_code == 200
    with ThreadPoolExecutor(16) as pool:
        slots = Counter(pool.map(lambda _: predict(srv).headers["X-Model-Slot"], range(1000)))
    assert 150 <= slots["canary"] <= 250 and slots["canary"] + slots["stable"] == 1000
    for key in ("alice", "bob", "carol", "dave", "erin", "frank"):
        seen = {predict(srv, key).headers["X-Model-Slot"] for _ in range(4)}
        assert len(seen) == 1
    canary = load_checkpoint(store / "v2.safetensors").version
    r = predict(srv, "x")
    assert r.json()["model"]["slot"] == r.headers["X-Model-Slot"]
    assert (r.headers["X-Model-Version"] == canary) == (r.headers["X-Model-Slot"] == "canary")


def test_promote_and_rollback(srv: Server, store: Path) -> None:
    reset(srv, store)
    base, v2 = (load_checkpoint(store / n).version for n in ("base.safetensors", "v2.safetensors"))
    assert admin(srv, "POST", "load", {"checkpoint": "v2.safetensors", "slot": "canary"}).status_code == 200
    assert admin(srv, "POST", "promote").json()["versions"] == {"stable": v2, "canary": None}
    assert predict(srv).headers["X-Model-Version"] == v2
    assert admin(srv, "POST", "load", {"checkpoint": "v3.pt", "slot": "canary"}).status_code == 200
    assert admin(srv, "POST", "rollback").json()["versions"] == {"stable": v2, "canary": None}  # drops the canary
    assert admin(srv, "POST", "rollback").json()["versions"] == {"stable": base, "canary": None}  # previous stable
    assert predict(srv).headers["X-Model-Version"] == base
    assert admin(srv, "POST", "promote").status_code == 409


def test_shadow_agreement_is_counted(srv: Server, store: Path) -> None:
    reset(srv, store)
    before = metric_value(srv, "headswap_shadow_comparisons_total")
    agreed = metric_value(srv, "headswap_shadow_agreements_total")
    assert admin(srv, "POST", "load", {"checkpoint": "base.safetensors", "slot": "canary"}).status_code == 200
    assert admin(srv, "POST", "canary", {"weight": 0, "shadow": 100}).status_code == 200
    for _ in range(10):
        assert predict(srv).headers["X-Model-Slot"] == "stable"
    deadline = time.monotonic() + 30
    while metric_value(srv, "headswap_shadow_comparisons_total") < before + 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric_value(srv, "headswap_shadow_comparisons_total") == before + 10
    assert metric_value(srv, "headswap_shadow_agreements_total") == agreed + 10  # same weights: all agree


def test_guard_rolls_back_a_canary_that_disagrees(srv: Server, store: Path) -> None:
    reset(srv, store)
    rollbacks = metric_value(srv, 'headswap_rollbacks_total{reason="guard_agreement"}')
    assert admin(srv, "POST", "load", {"checkpoint": "v2.safetensors", "slot": "canary"}).status_code == 200
    assert admin(srv, "POST", "canary", {"weight": 0, "shadow": 100}).status_code == 200
    images = [jpeg(100 + i) for i in range(60)]
    deadline = time.monotonic() + 120
    for image in images:
        requests.post(f"{srv.url}/predict", data=image, headers={"Content-Type": "image/jpeg"})
        if admin(srv, "GET", "models").json()["canary"] is None or time.monotonic() > deadline:
            break
    while admin(srv, "GET", "models").json()["canary"] is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert admin(srv, "GET", "models").json()["canary"] is None
    # the state changes first, the counter right after the workers switched
    while metric_value(srv, 'headswap_rollbacks_total{reason="guard_agreement"}') < rollbacks + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric_value(srv, 'headswap_rollbacks_total{reason="guard_agreement"}') == rollbacks + 1
    audit = (Path(srv.log.parent) / "state" / "audit.log").read_text()
    assert '"action": "rollback:guard_agreement"' in audit and TOKEN not in audit


@pytest.mark.parametrize("body, status, message", [
    ({"checkpoint": "truncated.safetensors"}, 422, "corrupt safetensors"),
    ({"checkpoint": "nan.safetensors"}, 422, "NaN or Inf"),
    ({"checkpoint": "squeeze.safetensors"}, 409, "architecture squeezenet1_1 does not match"),
    ({"checkpoint": "five.safetensors"}, 409, "5 classes where the stable slot has 7"),
    ({"checkpoint": "five.safetensors", "mode": "merge"}, 409, "has 5 classes where the model has 7, and tensors outside the head"),
    ({"checkpoint": "pickled.pt"}, 422, "refused to unpickle"),
    ({"checkpoint": "../outside/evil.safetensors"}, 400, "no absolute paths, no '..'"),
    ({"checkpoint": "/etc/passwd"}, 400, "relative path inside the checkpoint store"),
    ({"checkpoint": "link.safetensors"}, 400, "resolves outside the checkpoint store"),
    ({"checkpoint": "nope.safetensors"}, 404, "no checkpoint 'nope.safetensors'"),
    ({"checkpoint": "v2.safetensors", "slot": "side"}, 400, '"slot" must be stable or canary'),
    ({"checkpoint": "head.safetensors"}, 422, "partial checkpoint"),
    ({"checkpoint": "head.safetensors", "mode": "merge", "min_match": 2}, 400, '"min_match" must be'),
])
def test_bad_checkpoints_are_refused_and_nothing_changes(srv: Server, store: Path, body: dict, status: int, message: str) -> None:
    reset(srv, store)
    before_models = admin(srv, "GET", "models").json()
    before = predict(srv)
    rejected = metric_value(srv, 'headswap_swaps_total{result="rejected",slot="stable"}')
    response = admin(srv, "POST", "load", body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert str(store) not in response.text  # no server paths in errors
    after = predict(srv)
    assert after.headers["X-Model-Version"] == before.headers["X-Model-Version"]
    assert scores(after) == scores(before)
    assert admin(srv, "GET", "models").json()["generation"] == before_models["generation"]
    if not message.startswith('"'):  # the checkpoint was refused (a malformed body never reaches the controller)
        assert metric_value(srv, 'headswap_swaps_total{result="rejected",slot="stable"}') == rejected + 1
        last = admin(srv, "GET", "models").json()["last_rejection"]
        assert body["checkpoint"] in [last["checkpoint"], *last["merges"]]  # a merge names the stable base first
        assert (last["status"], last["slot"]) == (status, "stable")
        assert last["error"] == response.json()["error"]


def metric_value(server: Server, series: str) -> float:
    text = requests.get(f"{server.url}/metrics").text
    name, _, labels = series.partition("{")
    wanted = set(labels.rstrip("}").split(",")) if labels else set()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, value = line.rsplit(" ", 1)
        got_name, _, got_labels = key.partition("{")
        if got_name == name and wanted <= set(got_labels.rstrip("}").split(",")) - {""}:
            total += float(value)
    return total
