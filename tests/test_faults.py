"""Faults under load: a worker killed with SIGKILL is replaced; only its in-flight batch fails."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import requests

from tests.server import run_server
from tests.test_hotswap import TOKEN, Load, admin


def test_kill_9_of_a_worker_under_load(resnet18_ckpt: Path, tmp_path: Path) -> None:
    timeout_s = 8
    with run_server(resnet18_ckpt, tmp_path, "--workers-per-device", "2", "--max-batch-size", "4",
                    "--timeout-s", str(timeout_s), env={"HEADSWAP_ADMIN_TOKEN": TOKEN}) as srv:
        workers = admin(srv, "GET", "models").json()["workers"]
        victim = workers["0"]["pid"]
        with Load(srv, threads=4, limit=4000, seconds=200) as load:
            while len(load.samples) < 20:
                time.sleep(0.05)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            saw_unready = False
            while time.monotonic() - killed_at < 120:
                ready = requests.get(f"{srv.url}/ready").status_code
                saw_unready |= ready == 503
                if saw_unready and ready == 200:
                    break
                time.sleep(0.1)
            back_at = time.monotonic()
            count = len(load.samples)
            while len(load.samples) < count + 40:
                time.sleep(0.05)
        assert saw_unready and back_at - killed_at < 120
        failures = [s for s in load.samples if s.status != 200]
        assert len(failures) <= 4, [s.status for s in failures]  # at most the killed worker's batch
        assert all(s.status == 504 for s in failures)
        assert max(s.received - s.sent for s in load.samples) < timeout_s + 5
        after = admin(srv, "GET", "models").json()["workers"]
        assert after["0"]["pid"] != victim and after["0"]["versions"] == workers["0"]["versions"]
        assert all(s.status == 200 for s in load.samples if s.sent > back_at)


def test_store_disappearing_and_a_checkpoint_changing_underneath(tmp_path: Path) -> None:
    """The served weights live in the state's blobs: the store may vanish or change, serving goes on."""
    from models import load_checkpoint
    from tests.conftest import make_checkpoint

    store = tmp_path / "store"
    make_checkpoint(store / "base.safetensors", seed=0)
    make_checkpoint(store / "v2.safetensors", seed=1)
    with run_server(store / "base.safetensors", tmp_path, "--checkpoint-dir", str(store),
                    env={"HEADSWAP_ADMIN_TOKEN": TOKEN}) as srv:
        base = load_checkpoint(store / "base.safetensors").version
        with Load(srv, threads=2, limit=2000, seconds=120) as load:
            while len(load.samples) < 10:
                time.sleep(0.05)
            # a checkpoint rewritten (truncated) underneath, then loaded: refused, nothing changes
            data = (store / "v2.safetensors").read_bytes()
            (store / "v2.safetensors").write_bytes(data[: len(data) // 3])
            r = admin(srv, "POST", "load", {"checkpoint": "v2.safetensors"})
            assert r.status_code == 422 and "corrupt safetensors" in r.json()["error"]
            # the whole store gone
            store.rename(tmp_path / "gone")
            r = admin(srv, "POST", "load", {"checkpoint": "v2.safetensors"})
            assert r.status_code == 404
            count = len(load.samples)
            while len(load.samples) < count + 20:
                time.sleep(0.05)
        assert {s.status for s in load.samples} == {200}
        assert {s.version for s in load.samples} == {base}
        assert requests.get(f"{srv.url}/ready").status_code == 200
