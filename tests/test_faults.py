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
