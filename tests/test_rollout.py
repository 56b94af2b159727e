"""Fleet convergence through a shared rollout file, persistence across restarts, admin off/own port."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from models import load_checkpoint, merge_state, state_version
from service.control.audit import AuditLog
from service.control.controller import Controller
from service.control.rollout import RolloutFile
from service.control.slots import ModelState, ServingState, SharedState, SlotSpec
from service.control.store import CheckpointStore
from service.errors import Conflict
from service.http.errors import status_of
from service.inference.engine import check_servable
from tests.conftest import make_checkpoint
from tests.server import HEADSWAP, Server, free_port, run_server
from tests.test_hotswap import TOKEN, admin, predict


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    make_checkpoint(root / "base.safetensors", seed=0)
    make_checkpoint(root / "v2.safetensors", seed=1)
    subprocess.run([HEADSWAP, "slice", str(root / "v2.safetensors"), "--out", str(root / "head.safetensors"), "--head"], check=True)
    return root


def wait_for(condition, timeout: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def models_of(server: Server) -> dict:
    return admin(server, "GET", "models").json()


def test_rollout_file_drives_two_servers_to_the_same_versions(store: Path, tmp_path: Path) -> None:
    spec = tmp_path / "rollout" / "spec.yaml"
    spec.parent.mkdir()
    args = ("--rollout-file", str(spec), "--checkpoint-dir", str(store))
    env = {"HEADSWAP_ADMIN_TOKEN": TOKEN}
    base = load_checkpoint(store / "base.safetensors").version
    with run_server(store / "base.safetensors", tmp_path, *args, env=env) as a:
        written = yaml.safe_load(spec.read_text())  # A serves --checkpoint and writes the spec
        assert written["stable"] == {"checkpoint": "base.safetensors"}
        with run_server(store / "v2.safetensors", tmp_path, *args, env=env) as b:
            assert models_of(b)["stable"]["version"] == base  # an existing spec wins over --checkpoint
            spec.write_text(yaml.safe_dump({"revision": "r2", "stable": {"checkpoint": "base.safetensors"},
                                            "canary": {"checkpoint": "head.safetensors", "mode": "merge", "weight": 10}}))
            for server in (a, b):
                wait_for(lambda s=server: models_of(s)["revision"] == "r2" and models_of(s)["converged"])
            merged = state_version(merge_state(load_checkpoint(store / "base.safetensors").state,
                                               load_checkpoint(store / "head.safetensors").state)[0])
            assert {models_of(s)["canary"]["version"] for s in (a, b)} == {merged}
            assert {models_of(s)["canary_weight"] for s in (a, b)} == {10}
            # an admin call on one pod writes the file; the other converges
            assert admin(a, "POST", "promote").status_code == 200
            wait_for(lambda: models_of(b)["stable"]["version"] == merged and models_of(b)["canary"] is None
                     and models_of(b)["converged"])
            assert yaml.safe_load(spec.read_text())["stable"] == {"checkpoint": "base.safetensors", "merge": ["head.safetensors"]}
            assert predict(b).headers["X-Model-Version"] == merged
            # a malformed spec changes nothing and is reported
            spec.write_text("stable: [this is not, a mapping")
            wait_for(lambda: models_of(b)["rollout_error"] is not None)
            assert "not valid YAML" in models_of(b)["rollout_error"]
            assert predict(b).headers["X-Model-Version"] == merged
            assert "headswap_rollout_errors_total 1.0" in requests.get(f"{b.url}/metrics").text
            # so does a spec naming a corrupt checkpoint, which is also the last rejection
            (store / "cut.safetensors").write_bytes((store / "v2.safetensors").read_bytes()[:4096])
            spec.write_text(yaml.safe_dump({"revision": "r3", "stable": {"checkpoint": "cut.safetensors"}}))
            wait_for(lambda: (models_of(b)["last_rejection"] or {}).get("checkpoint") == "cut.safetensors")
            rejection = models_of(b)["last_rejection"]
            assert (rejection["status"], rejection["slot"]) == (422, "stable") and "corrupt" in rejection["error"]
            assert "cut.safetensors" in models_of(b)["rollout_error"]
            assert models_of(b)["stable"]["version"] == merged and models_of(b)["revision"] == "r2"
            assert predict(b).headers["X-Model-Version"] == merged


def test_read_only_rollout_file_refuses_admin_mutations(store: Path, tmp_path: Path) -> None:
    class ReadOnly(RolloutFile):
        def writable(self) -> bool:  # a ConfigMap mount; root ignores file modes, so say it here
            return False

    shared = SharedState(tmp_path / "state")
    shared.create_dirs()
    shared.write(ServingState(1, {"m": ModelState(SlotSpec("base.safetensors", version="x", meta={}))}, "m"))
    controller = Controller(shared, CheckpointStore(store), 1, audit=AuditLog(None), validate=check_servable, rollout=ReadOnly(tmp_path / "spec.yaml"))
    with pytest.raises(Conflict, match="rollout file is read-only") as info:
        controller.set_canary(10, 0, "test")
    assert status_of(info.value) == 409
    assert shared.read().generation == 1


def test_state_survives_a_restart(store: Path, tmp_path: Path) -> None:
    env = {"HEADSWAP_ADMIN_TOKEN": TOKEN}
    state = ("--state-dir", str(tmp_path / "state"))
    v2 = load_checkpoint(store / "v2.safetensors").version
    with run_server(store / "base.safetensors", tmp_path, *state, env=env) as first:
        assert admin(first, "POST", "load", {"checkpoint": "v2.safetensors"}).status_code == 200
        assert admin(first, "POST", "load", {"checkpoint": "base.safetensors", "slot": "canary"}).status_code == 200
    with run_server(store / "base.safetensors", tmp_path, *state, env=env) as second:
        models = models_of(second)
        assert models["stable"]["version"] == v2 and models["canary"]["checkpoint"] == "base.safetensors"
        assert predict(second).headers["X-Model-Version"] == v2
    lines = (tmp_path / "state" / "audit.log").read_text().splitlines()
    assert len(lines) == 2 and all(TOKEN not in line for line in lines)


def test_admin_is_off_without_a_token_and_can_have_its_own_port(store: Path, tmp_path: Path) -> None:
    with run_server(store / "base.safetensors", tmp_path) as plain:
        assert requests.get(f"{plain.url}/admin/models").status_code == 404
    admin_port = free_port()
    with run_server(store / "base.safetensors", tmp_path, "--admin-port", str(admin_port), env={"HEADSWAP_ADMIN_TOKEN": TOKEN}) as split:
        assert requests.get(f"{split.url}/admin/models", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
        wait_for(lambda: _answers(f"http://127.0.0.1:{admin_port}/admin/models"))
        r = requests.get(f"http://127.0.0.1:{admin_port}/admin/models", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["stable"]["checkpoint"] == "base.safetensors"
        assert requests.get(f"http://127.0.0.1:{admin_port}/admin/models").status_code == 401


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
        return True
    except requests.ConnectionError:
        return False
