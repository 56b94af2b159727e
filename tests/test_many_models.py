"""Many models in one server: two head-only fine-tunes of one backbone and one full fine-tune.

Each model answers as it would alone offline; images of the two models that share a backbone go
through one backbone pass (seen in ``headswap_backbone_passes_total`` and the images-per-pass
histogram), the third model's never do; the admin API and the rollout of each model are its own.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

from models import (
    CheckpointMeta,
    build_classifier,
    classifier_from_state,
    eval_transform,
    load_checkpoint,
    save_checkpoint,
)
from models.shared import backbone_version
from service.observability.metrics import model_label
from tests.images import jpeg
from tests.server import HEADSWAP, Server, run_server
from tests.test_hotswap import TOKEN, admin
from tests.test_metrics import samples, value

IMAGES = [jpeg(70 + i) for i in range(4)]
SHAPES = [f"shape{i}" for i in range(7)]
GLYPHS = [f"glyph{i}" for i in range(5)]
OTHER = ["a", "b", "c"]


def make_store(store: Path) -> dict[str, str]:
    """shapes (a resnet18), glyphs (its backbone, a head of its own for 5 classes), other (a resnet18 of
    its own: a full fine-tune); returns each model's backbone version."""
    torch.manual_seed(0)
    shapes = build_classifier("resnet18", len(SHAPES)).state_dict()
    save_checkpoint(store / "shapes.safetensors", shapes, CheckpointMeta.for_arch("resnet18", SHAPES, name="shapes"))
    glyphs = _with_head(shapes, len(GLYPHS), seed=1)
    save_checkpoint(store / "glyphs.safetensors", glyphs, CheckpointMeta.for_arch("resnet18", GLYPHS, name="glyphs"))
    glyphs_v2 = _with_head(shapes, len(GLYPHS), seed=3)
    save_checkpoint(store / "glyphs-v2.safetensors", glyphs_v2, CheckpointMeta.for_arch("resnet18", GLYPHS, name="glyphs"))
    torch.manual_seed(2)
    other = build_classifier("resnet18", len(OTHER)).state_dict()
    save_checkpoint(store / "other.safetensors", other, CheckpointMeta.for_arch("resnet18", OTHER, name="other"))
    for name in ("glyphs", "glyphs-v2"):
        subprocess.run([HEADSWAP, "slice", str(store / f"{name}.safetensors"), "--head", "--out",
                        str(store / f"{name}-head.safetensors")], check=True, capture_output=True)
    return {"shapes": backbone_version("resnet18", shapes), "glyphs": backbone_version("resnet18", glyphs),
            "other": backbone_version("resnet18", other)}


def _with_head(state: dict[str, torch.Tensor], classes: int, *, seed: int) -> dict[str, torch.Tensor]:
    """``state`` (a resnet18's) with a fresh seeded head for ``classes`` classes: a head-only fine-tune."""
    torch.manual_seed(seed)
    return {**state, "fc.weight": torch.randn(classes, 512) * 0.1, "fc.bias": torch.randn(classes) * 0.1}


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, dict[str, str]]]:
    store = tmp_path_factory.mktemp("many-store")
    backbones = make_store(store)
    with run_server(store / "shapes.safetensors", tmp_path_factory.mktemp("many"), "--model", f"glyphs={store / 'glyphs.safetensors'}",
                    "--model", f"other={store / 'other.safetensors'}", "--workers-per-device", "1",
                    env={"HEADSWAP_ADMIN_TOKEN": TOKEN}) as server:
        yield server, store, backbones


def offline(path: Path, image: bytes) -> list[float]:
    """The model of ``path`` run alone: load it, eval_transform, fp32 softmax."""
    loaded = load_checkpoint(path)
    model = classifier_from_state(loaded.state, loaded.meta)
    with torch.inference_mode():
        return model(eval_transform(loaded.meta)(Image.open(io.BytesIO(image))).unsqueeze(0)).softmax(-1)[0].tolist()


def predict(server: Server, model: str | None, image: bytes) -> requests.Response:
    path = "/predict" if model is None else f"/models/{model}/predict"
    return requests.post(f"{server.url}{path}?top_k=10", data=image, headers={"Content-Type": "image/jpeg"}, timeout=60)


def probabilities(response: requests.Response) -> list[float]:
    found = {p["index"]: p["score"] for p in response.json()["predictions"]}
    return [found[i] for i in range(len(found))]


def test_the_catalog_names_every_model_and_its_backbone(many: tuple[Server, Path, dict[str, str]]) -> None:
    server, store, backbones = many
    assert backbones["shapes"] == backbones["glyphs"] != backbones["other"]
    body = requests.get(f"{server.url}/models").json()
    versions = {name: load_checkpoint(store / f"{name}.safetensors").version for name in backbones}
    assert body == {"models": [
        {"name": name, "default": name == "shapes", "backbone": backbones[name], "arch": "resnet18", "num_classes": n,
         "resident": True, "slots": {"stable": {"version": versions[name]}, "canary": None}}
        for name, n in (("shapes", 7), ("glyphs", 5), ("other", 3))]}
    ready = requests.get(f"{server.url}/ready").json()
    assert (ready["model"], ready["models"]) == ("shapes", ["shapes", "glyphs", "other"])


@pytest.mark.parametrize("model", ["shapes", "glyphs", "other"])
def test_each_model_answers_as_it_does_alone_offline(many: tuple[Server, Path, dict[str, str]], model: str) -> None:
    server, store, _ = many
    for image in IMAGES[:2]:
        expected = offline(store / f"{model}.safetensors", image)
        response = predict(server, model, image)
        assert response.status_code == 200, response.text
        assert response.json()["model"]["name"] == model
        assert probabilities(response) == pytest.approx(expected, abs=1e-4)
        v2 = requests.post(f"{server.url}/v2/models/{model}/infer", timeout=60, json={"inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}]})
        assert v2.status_code == 200, v2.text
        assert v2.json()["model_name"] == model
        assert v2.json()["outputs"][0]["data"] == pytest.approx(expected, abs=1e-4)


def test_predict_serves_the_default_model(many: tuple[Server, Path, dict[str, str]]) -> None:
    server, store, _ = many
    response = predict(server, None, IMAGES[0])
    assert response.json()["model"]["name"] == "shapes"
    assert probabilities(response) == pytest.approx(offline(store / "shapes.safetensors", IMAGES[0]), abs=1e-4)


def test_unknown_and_impossible_model_names(many: tuple[Server, Path, dict[str, str]]) -> None:
    server, _, _ = many
    response = predict(server, "nope", IMAGES[0])
    assert response.status_code == 404
    assert response.json() == {"error": "unknown model 'nope': this server serves 'shapes', 'glyphs', 'other'"}
    response = requests.get(f"{server.url}/v2/models/nope", timeout=10)
    assert response.status_code == 404 and "'shapes', 'glyphs', 'other'" in response.json()["error"]
    response = predict(server, "bad%20name", IMAGES[0])
    assert response.status_code == 400
    assert response.json()["error"] == "a model name is 1-64 of A-Z a-z 0-9 _ . -, found 'bad name'"
    assert requests.get(f"{server.url}/v2/models/glyphs", timeout=10).json()["name"] == "glyphs"


def _worker_pid(server: Server) -> int:
    workers = admin(server, "GET", "models").json()["workers"]
    assert len(workers) == 1
    return next(iter(workers.values()))["pid"]


def _queued_while_paused(server: Server, models: list[str]) -> list[requests.Response]:
    """Send one request per entry of ``models`` while the worker is stopped, let them all queue, then
    resume it: it takes them as one batch (they fit in one)."""
    pid = _worker_pid(server)
    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(len(models)) as pool:
            futures = [pool.submit(predict, server, model, IMAGES[i % len(IMAGES)]) for i, model in enumerate(models)]
            deadline = time.monotonic() + 30
            while value(samples(f"{server.url}/metrics"), "headswap_queue_depth") < len(models):
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.05)
            # admitted and handed to the queue: give the API server's queue feeder thread a moment to
            # write the last ones into the pipe, so that the worker finds all of them when it wakes
            time.sleep(0.5)
            os.kill(pid, signal.SIGCONT)
            return [f.result() for f in futures]
    finally:
        os.kill(pid, signal.SIGCONT)


def _deltas(before: dict, after: dict, backbones: dict[str, str]) -> dict[str, float]:
    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    return {"shared_passes": delta("headswap_backbone_passes_total", backbone=backbones["shapes"]),
            "other_passes": delta("headswap_backbone_passes_total", backbone=backbones["other"]),
            "batches": delta("headswap_batch_size_count"),
            "passes_of_16": delta("headswap_images_per_backbone_pass_bucket", le="16.0")
            - delta("headswap_images_per_backbone_pass_bucket", le="8.0"),
            "passes_of_2": delta("headswap_images_per_backbone_pass_bucket", le="2.0")
            - delta("headswap_images_per_backbone_pass_bucket", le="1.0"),
            "images_in_passes": delta("headswap_images_per_backbone_pass_sum")}


def test_two_models_of_one_backbone_share_one_backbone_pass(many: tuple[Server, Path, dict[str, str]]) -> None:
    server, store, backbones = many
    before = samples(f"{server.url}/metrics")
    responses = _queued_while_paused(server, ["shapes", "glyphs"] * 8)
    after = samples(f"{server.url}/metrics")
    assert [r.status_code for r in responses] == [200] * 16
    assert {r.headers["X-Batch-Size"] for r in responses} == {"16"}
    # one batch of 16 images of two models: one backbone pass of 16, then each image through its own head
    assert _deltas(before, after, backbones) == {"shared_passes": 1, "other_passes": 0, "batches": 1, "passes_of_16": 1,
                                                 "passes_of_2": 0, "images_in_passes": 16}
    for i, (model, response) in enumerate(zip(["shapes", "glyphs"] * 8, responses)):
        assert response.json()["model"]["name"] == model
        assert probabilities(response) == pytest.approx(offline(store / f"{model}.safetensors", IMAGES[i % len(IMAGES)]),
                                                        abs=1e-4)


def test_a_full_fine_tune_is_batched_beside_them_never_with_them(many: tuple[Server, Path, dict[str, str]]) -> None:
    server, _, backbones = many
    before = samples(f"{server.url}/metrics")
    responses = _queued_while_paused(server, ["other", "shapes", "glyphs", "other"])
    after = samples(f"{server.url}/metrics")
    assert [r.json()["model"]["name"] for r in responses] == ["other", "shapes", "glyphs", "other"]
    assert _deltas(before, after, backbones) == {"shared_passes": 1, "other_passes": 1, "batches": 1, "passes_of_16": 0,
                                                 "passes_of_2": 2, "images_in_passes": 4}


# --- Triton's model-repository extension ----------------------------------------------------------

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def repository(server: Server, path: str, body: dict | None = None, headers: dict | None = AUTH) -> requests.Response:
    return requests.post(f"{server.url}/v2/repository/{path}", json=body, headers=headers or {}, timeout=300)


def test_repository_calls_need_the_admin_token(many: tuple[Server, Path, dict[str, str]]) -> None:
    server, _, _ = many
    for path in ("index", "models/extra/load", "models/glyphs/unload"):
        response = repository(server, path, headers=None)
        assert response.status_code == 401, path
        assert response.json() == {"error": "missing or wrong admin token: send Authorization: Bearer <token>"}
    assert [m["name"] for m in requests.get(f"{server.url}/models").json()["models"]] == ["shapes", "glyphs", "other"]


def test_repository_index_lists_every_served_model(many: tuple[Server, Path, dict[str, str]]) -> None:
    server, store, _ = many
    versions = {name: load_checkpoint(store / f"{name}.safetensors").version for name in ("shapes", "glyphs", "other")}
    expected = [{"name": name, "version": versions[name], "state": "READY", "reason": ""} for name in ("shapes", "glyphs", "other")]
    assert repository(server, "index").json() == expected
    assert repository(server, "index", {"ready": True}).json() == expected
    response = repository(server, "index", {"ready": "yes"})
    assert response.status_code == 400 and response.json()["error"] == '"ready" must be true: only the models ready to answer, found \'yes\''


def test_tritonclient_loads_a_head_merge_and_unloads_it(many: tuple[Server, Path, dict[str, str]]) -> None:
    import tritonclient.http as triton  # the test extra's client, only here
    from tritonclient.utils import InferenceServerException

    server, store, backbones = many
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    config = json.dumps({"checkpoint": "shapes.safetensors", "merges": ["glyphs-head.safetensors"]})
    client.load_model("glyphs2", headers=AUTH, config=config)
    assert client.is_model_ready("glyphs2")
    index = {m["name"]: m for m in client.get_model_repository_index(headers=AUTH)}
    assert index["glyphs2"]["state"] == "READY"
    catalog = {m["name"]: m for m in requests.get(f"{server.url}/models").json()["models"]}
    assert catalog["glyphs2"]["backbone"] == backbones["shapes"] and catalog["glyphs2"]["num_classes"] == 5
    response = predict(server, "glyphs2", IMAGES[0])
    assert probabilities(response) == pytest.approx(offline(store / "glyphs.safetensors", IMAGES[0]), abs=1e-4)
    client.unload_model("glyphs2", headers=AUTH)
    assert predict(server, "glyphs2", IMAGES[0]).status_code == 404
    assert "glyphs2" not in {m["name"] for m in client.get_model_repository_index(headers=AUTH)}
    with pytest.raises(InferenceServerException, match="missing or wrong admin token"):
        client.load_model("glyphs3", config=config)


def test_repository_load_without_config_takes_the_store_file_of_its_name(many: tuple[Server, Path, dict[str, str]]) -> None:
    server, store, _ = many
    shutil.copy(store / "other.safetensors", store / "extra.safetensors")
    assert repository(server, "models/extra/load").status_code == 200
    response = predict(server, "extra", IMAGES[1])
    assert probabilities(response) == pytest.approx(offline(store / "other.safetensors", IMAGES[1]), abs=1e-4)
    assert repository(server, "models/extra/unload", {"parameters": {"unload_dependents": False}}).status_code == 200
    assert predict(server, "extra", IMAGES[1]).status_code == 404


def test_repository_refusals_change_nothing(many: tuple[Server, Path, dict[str, str]]) -> None:
    server, _, _ = many
    before = requests.get(f"{server.url}/models").json()
    cases = [
        ("models/nofile/load", None, 404, ("no nofile.safetensors or nofile.pt in the checkpoint store: name the "
                                           "checkpoint in parameters.config")),
        ("models/shapes/unload", None, 409, ("'shapes' is the default model (POST /predict): unload the other models "
                                             "first, or load another model under its name")),
        ("models/ghost/unload", None, 404, "unknown model 'ghost': this server serves 'shapes', 'glyphs', 'other'"),
        ("models/glyphs/load", {"parameters": {"config": json.dumps({"checkpoint": "other.safetensors"})}}, 409,
         ("resnet18 with 3 classes does not match model 'glyphs''s resnet18 with 5: unload it first to serve another "
          "kind of model under its name")),
        ("models/glyphs/load", {"parameters": {"config": "{not json"}}, 400, None),
        ("models/glyphs/load", {"parameters": {"config": "{}", "files": 1}}, 400, None),
        ("models/bad%20name/load", None, 400, "a model name is 1-64 of A-Z a-z 0-9 _ . -, found 'bad name'"),
    ]
    for path, body, status, error in cases:
        response = repository(server, path, body)
        assert response.status_code == status, (path, response.text)
        if error is not None:
            assert response.json()["error"] == error
    assert requests.get(f"{server.url}/models").json() == before


# --- canary and shadow per model ---------------------------------------------------------------------

def test_a_head_only_canary_of_one_model_shadows_on_the_shared_backbone(many: tuple[Server, Path, dict[str, str]]) -> None:
    server, store, backbones = many
    shapes_before = admin(server, "GET", "models").json()["models"]["shapes"]
    loaded = admin(server, "POST", "load", {"model": "glyphs", "checkpoint": "glyphs-v2-head.safetensors", "slot": "canary",
                                            "mode": "merge"})
    assert loaded.status_code == 200, loaded.text
    canary = load_checkpoint(store / "glyphs-v2.safetensors").version
    assert loaded.json()["model"] == "glyphs" and loaded.json()["versions"]["canary"] == canary
    try:
        assert admin(server, "POST", "canary", {"model": "glyphs", "shadow": 100}).status_code == 200
        before = samples(f"{server.url}/metrics")
        responses = _queued_while_paused(server, ["glyphs", "shapes", "glyphs", "glyphs"])
        after = samples(f"{server.url}/metrics")
        assert [r.headers["X-Model-Slot"] for r in responses] == ["stable"] * 4
        # every glyphs image also went through the canary's head: no extra backbone pass
        assert _deltas(before, after, backbones)["shared_passes"] == 1
        assert value(after, "headswap_shadow_comparisons_total") - value(before, "headswap_shadow_comparisons_total") == 3
        assert value(after, "headswap_canary_weight", model="glyphs") == 0
        assert value(after, "headswap_shadow_percent", model="glyphs") == 100
        assert value(after, "headswap_shadow_percent", model="shapes") == 0
        assert admin(server, "POST", "canary", {"model": "glyphs", "weight": 100}).status_code == 200
        response = predict(server, "glyphs", IMAGES[2])
        assert (response.headers["X-Model-Slot"], response.headers["X-Model-Version"]) == ("canary", canary)
        assert probabilities(response) == pytest.approx(offline(store / "glyphs-v2.safetensors", IMAGES[2]), abs=1e-4)
        assert predict(server, "shapes", IMAGES[2]).headers["X-Model-Slot"] == "stable"  # the other models are untouched
        promoted = admin(server, "POST", "promote", {"model": "glyphs"})
        assert promoted.json()["versions"] == {"stable": canary, "canary": None}
        assert predict(server, "glyphs", IMAGES[2]).headers["X-Model-Version"] == canary
        rolled = admin(server, "POST", "rollback", {"model": "glyphs"})
        assert rolled.json()["versions"]["stable"] == load_checkpoint(store / "glyphs.safetensors").version
    finally:
        if admin(server, "GET", "models").json()["models"]["glyphs"]["canary"]:
            admin(server, "POST", "rollback", {"model": "glyphs"})
    state = admin(server, "GET", "models").json()
    assert state["models"]["shapes"] == shapes_before
    response = admin(server, "POST", "promote", {"model": "nope"})
    assert response.status_code == 404
    assert response.json()["error"] == "unknown model 'nope': this server serves 'shapes', 'glyphs', 'other'"
    response = admin(server, "POST", "canary", {"model": "bad name", "weight": 1})
    assert response.status_code == 400


def test_requests_are_counted_per_model(many: tuple[Server, Path, dict[str, str]]) -> None:
    server, _, _ = many
    before = samples(f"{server.url}/metrics")
    for model in ("glyphs", "glyphs", "other", "nope"):
        predict(server, model, IMAGES[0])
    after = samples(f"{server.url}/metrics")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("headswap_requests_total", endpoint="predict", status="200", slot="stable", model="glyphs") == 2
    assert delta("headswap_requests_total", endpoint="predict", status="200", slot="stable", model="other") == 1
    assert delta("headswap_requests_total", endpoint="predict", status="404", slot="none", model="none") == 1
    assert delta("headswap_queue_wait_seconds_count", model="glyphs") == 2
    assert delta("headswap_inference_duration_seconds_count", model="glyphs", slot="stable") >= 1


def test_the_model_label_is_capped() -> None:
    names = ["default", "a", "b"]
    assert [model_label(n, names, 2) for n in names] == ["default", "a", "other"]
    assert [model_label(n, names, 100) for n in names] == names


def test_repository_load_of_a_served_name_replaces_its_stable_version(many: tuple[Server, Path, dict[str, str]]) -> None:
    server, store, _ = many
    v1, v2 = (load_checkpoint(store / f"{name}.safetensors").version for name in ("glyphs", "glyphs-v2"))
    config = {"parameters": {"config": json.dumps({"checkpoint": "glyphs-v2.safetensors"})}}
    try:
        assert repository(server, "models/glyphs/load", config).status_code == 200
        assert predict(server, "glyphs", IMAGES[3]).headers["X-Model-Version"] == v2
        assert admin(server, "GET", "models").json()["models"]["glyphs"]["previous_stable"] == v1
    finally:
        assert repository(server, "models/glyphs/load").status_code == 200  # glyphs.safetensors, by its name
    assert predict(server, "glyphs", IMAGES[3]).headers["X-Model-Version"] == v1


def test_a_bad_image_fails_alone_whichever_model_it_names(many: tuple[Server, Path, dict[str, str]]) -> None:
    """Wrong-sized pixels for glyphs reach the worker in one batch with good images of two models."""
    server, store, _ = many
    wrong = {"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192}]}
    pid = _worker_pid(server)
    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(3) as pool:
            good = [pool.submit(predict, server, model, IMAGES[0]) for model in ("shapes", "other")]
            bad = pool.submit(requests.post, f"{server.url}/v2/models/glyphs/infer", json=wrong, timeout=60)
            deadline = time.monotonic() + 30
            while value(samples(f"{server.url}/metrics"), "headswap_queue_depth") < 3:
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.05)
            time.sleep(0.5)  # the feeder threads' last writes, as in _queued_while_paused
            os.kill(pid, signal.SIGCONT)
            answers = [f.result() for f in good]
            refused = bad.result()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert refused.status_code == 400
    assert refused.json() == {"error": "PIXELS must be [B,3,224,224] for this model, found [3, 8, 8]"}
    for model, response in zip(("shapes", "other"), answers):
        assert response.headers["X-Batch-Size"] == "3"
        assert probabilities(response) == pytest.approx(offline(store / f"{model}.safetensors", IMAGES[0]), abs=1e-4)
