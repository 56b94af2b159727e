"""Many models over a server's life: a rollout spec with ``models:``, a restart, SIGTERM under mixed load, a
memory budget."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import requests
import torch
import yaml

from models import CheckpointMeta, build_classifier, load_checkpoint, save_checkpoint
from tests.server import run_server, sigterm_under_load, wait_gone
from tests.test_hotswap import TOKEN, admin
from tests.test_many_models import IMAGES, _queued_while_paused, make_store, offline, predict, probabilities
from tests.test_metrics import samples, value
from tests.test_rollout import models_of, wait_for


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lifecycle-store")
    make_store(root)
    return root


def names(server) -> list[str]:  # noqa: ANN001
    return [m["name"] for m in requests.get(f"{server.url}/models", timeout=10).json()["models"]]


def test_a_rollout_spec_adds_changes_and_removes_models(store: Path, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"revision": "r1", "models": {
        "shapes": {"stable": {"checkpoint": "shapes.safetensors"}},
        "glyphs": {"stable": {"checkpoint": "shapes.safetensors", "merge": ["glyphs-head.safetensors"]}}}}, sort_keys=False))
    glyphs = load_checkpoint(store / "glyphs.safetensors").version
    glyphs_v2 = load_checkpoint(store / "glyphs-v2.safetensors").version
    with run_server(store / "shapes.safetensors", tmp_path, "--rollout-file", str(spec), "--checkpoint-dir", str(store),
                    env={"HEADSWAP_ADMIN_TOKEN": TOKEN}) as server:
        assert names(server) == ["shapes", "glyphs"]
        # a head merged onto the shapes checkpoint is the glyphs model, bit for bit, on the shared backbone
        assert predict(server, "glyphs", IMAGES[0]).headers["X-Model-Version"] == glyphs
        catalog = requests.get(f"{server.url}/models", timeout=10).json()["models"]
        assert catalog[0]["backbone"] == catalog[1]["backbone"]
        # add one, change one (a canary), keep one, and one malformed entry: refused alone
        spec.write_text(yaml.safe_dump({"revision": "r2", "models": {
            "shapes": {"stable": {"checkpoint": "shapes.safetensors"}},
            "glyphs": {"stable": {"checkpoint": "shapes.safetensors", "merge": ["glyphs-head.safetensors"]},
                       "canary": {"checkpoint": "glyphs-v2-head.safetensors", "mode": "merge", "weight": 100}},
            "other": {"stable": {"checkpoint": "other.safetensors"}},
            "broken": {"stable": {"checkpoint": "other.safetensors", "weight": 3}}}}, sort_keys=False))
        wait_for(lambda: "other" in names(server) and models_of(server)["converged"])  # every worker switched
        assert names(server) == ["shapes", "glyphs", "other"]
        assert predict(server, "glyphs", IMAGES[0]).headers["X-Model-Version"] == glyphs_v2
        assert predict(server, "other", IMAGES[0]).status_code == 200
        state = models_of(server)
        assert state["rollout_error"] == ("rollout spec entries refused: broken: rollout file spec.yaml: models.broken: "
                                          "stable has unknown keys ['weight']")
        assert state["revision"] == "r1"  # the last spec applied in full
        assert state["models"]["glyphs"]["canary_weight"] == 100
        # remove one: its routes are gone
        spec.write_text(yaml.safe_dump({"revision": "r3", "models": {
            "shapes": {"stable": {"checkpoint": "shapes.safetensors"}},
            "other": {"stable": {"checkpoint": "other.safetensors"}}}}, sort_keys=False))
        wait_for(lambda: names(server) == ["shapes", "other"] and models_of(server)["converged"])
        assert predict(server, "glyphs", IMAGES[0]).status_code == 404
        assert models_of(server)["revision"] == "r3" and models_of(server)["rollout_error"] is None


def test_a_restarted_server_serves_every_model_it_served(store: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    args = ("--state-dir", str(state_dir), "--model", f"glyphs={store / 'glyphs.safetensors'}")
    env = {"HEADSWAP_ADMIN_TOKEN": TOKEN}
    with run_server(store / "shapes.safetensors", tmp_path, *args, env=env) as server:
        loaded = requests.post(f"{server.url}/v2/repository/models/other/load", headers={"Authorization": f"Bearer {TOKEN}"},
                               timeout=300)
        assert loaded.status_code == 200, loaded.text
        assert admin(server, "POST", "load", {"model": "glyphs", "checkpoint": "glyphs-v2-head.safetensors",
                                              "slot": "canary", "mode": "merge"}).status_code == 200
        before = models_of(server)["models"]
    with run_server(store / "shapes.safetensors", tmp_path, *args, env=env) as server:
        assert names(server) == ["shapes", "glyphs", "other"]
        assert models_of(server)["models"] == before
        for name in ("shapes", "glyphs", "other"):
            assert predict(server, name, IMAGES[1]).status_code == 200


def test_sigterm_under_mixed_load_exits_0_and_leaves_nothing(store: Path, tmp_path: Path) -> None:
    with run_server(store / "shapes.safetensors", tmp_path, "--model", f"glyphs={store / 'glyphs.safetensors'}",
                    "--model", f"other={store / 'other.safetensors'}") as server:
        paths = [f"/models/{model}/predict" for model in ("shapes", "glyphs", "other", "glyphs")]
        code, results = sigterm_under_load(server, paths, lambda i: IMAGES[i % len(IMAGES)])
        assert code == 0, server.output()[-3000:]
        assert results and set(results) == {200}
        assert wait_gone(server.proc.pid) == []


def test_a_memory_budget_evicts_the_least_recently_used_and_loads_it_again(store: Path, tmp_path: Path) -> None:
    # resnet18's backbone is ~43 MiB, resnet50 ~90: 60 MiB holds one resnet18 backbone (shapes and glyphs share theirs)
    torch.manual_seed(4)
    save_checkpoint(store / "big.safetensors", build_classifier("resnet50", 3).state_dict(),
                    CheckpointMeta.for_arch("resnet50", ["a", "b", "c"]))
    with run_server(store / "shapes.safetensors", tmp_path, "--model", f"glyphs={store / 'glyphs.safetensors'}",
                    "--model", f"other={store / 'other.safetensors'}", "--workers-per-device", "1",
                    "--memory-budget-mb", "60", env={"HEADSWAP_ADMIN_TOKEN": TOKEN}) as server:
        expected = {name: offline(store / f"{name}.safetensors", IMAGES[0]) for name in ("shapes", "glyphs", "other")}
        before = samples(f"{server.url}/metrics")
        for name in ("other", "shapes", "glyphs", "other", "glyphs"):  # each switch of backbone evicts the other one
            response = predict(server, name, IMAGES[0])
            assert response.status_code == 200, response.text
            assert probabilities(response) == pytest.approx(expected[name], abs=1e-4)
        after = samples(f"{server.url}/metrics")
        cold = sum(value(after, "headswap_model_loads_total", model=m, reason="cold")
                   - value(before, "headswap_model_loads_total", model=m, reason="cold") for m in expected)
        evicted = sum(value(after, "headswap_model_evictions_total", model=m)
                      - value(before, "headswap_model_evictions_total", model=m) for m in expected)
        assert cold >= 3 and evicted >= 3
        resident = sum(value(after, "headswap_resident_bytes", kind=kind) for kind in ("backbone", "head"))
        assert 0 < resident <= 60 * 2**20
        catalog = {m["name"]: m["resident"] for m in requests.get(f"{server.url}/models", timeout=10).json()["models"]}
        # the last request was glyphs': other's backbone went to make room, and shapes' head went with the
        # least recently used before (its backbone stays: glyphs' head needs it)
        assert catalog == {"shapes": False, "glyphs": True, "other": False}
        index = {m["name"]: m for m in requests.post(f"{server.url}/v2/repository/index", timeout=10,
                                                      headers={"Authorization": f"Bearer {TOKEN}"}).json()}
        assert (index["other"]["state"], index["glyphs"]["reason"]) == ("READY", "")
        assert index["other"]["reason"].startswith("evicted")
        # a model that cannot fit at all is refused, and nothing changes
        response = requests.post(f"{server.url}/v2/repository/models/big/load", timeout=300,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 422
        assert response.json()["error"].startswith("'big.safetensors' needs 89.")
        assert response.json()["error"].endswith("MiB of weights, over each worker's --memory-budget-mb 60")
        assert names(server) == ["shapes", "glyphs", "other"]


def test_concurrent_requests_for_a_cold_model_load_it_once(store: Path, tmp_path: Path) -> None:
    with run_server(store / "shapes.safetensors", tmp_path, "--model", f"other={store / 'other.safetensors'}",
                    "--workers-per-device", "1", "--memory-budget-mb", "60", env={"HEADSWAP_ADMIN_TOKEN": TOKEN}) as server:
        assert predict(server, "shapes", IMAGES[0]).status_code == 200  # other is evicted now
        before = samples(f"{server.url}/metrics")
        responses = _queued_while_paused(server, ["other"] * 4)
        after = samples(f"{server.url}/metrics")
        assert [r.status_code for r in responses] == [200] * 4
        assert value(after, "headswap_model_loads_total", model="other", reason="cold") - \
            value(before, "headswap_model_loads_total", model="other", reason="cold") == 1


def test_a_killed_worker_comes_back_serving_every_model(store: Path, tmp_path: Path) -> None:
    with run_server(store / "shapes.safetensors", tmp_path, "--model", f"glyphs={store / 'glyphs.safetensors'}",
                    "--model", f"other={store / 'other.safetensors'}", "--workers-per-device", "1",
                    env={"HEADSWAP_ADMIN_TOKEN": TOKEN}) as server:
        (worker,) = models_of(server)["workers"].values()
        os.kill(worker["pid"], signal.SIGKILL)
        wait_for(lambda: requests.get(f"{server.url}/ready", timeout=10).status_code == 503, timeout=60)
        wait_for(lambda: requests.get(f"{server.url}/ready", timeout=10).status_code == 200, timeout=180)
        (back,) = models_of(server)["workers"].values()
        assert back["pid"] != worker["pid"] and back["versions"] == worker["versions"]
        assert set(back["versions"]) == {"shapes", "glyphs", "other"}
        for name in ("shapes", "glyphs", "other"):
            assert predict(server, name, IMAGES[2]).status_code == 200
