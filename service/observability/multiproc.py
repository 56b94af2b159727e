"""The Prometheus multiprocess folder, set up before prometheus_client is first imported
(it picks its storage mode at import time from PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def metrics_dir() -> tuple[Path, bool]:
    """$PROMETHEUS_MULTIPROC_DIR (created, emptied), else a private fresh folder.

    Returns ``(path, owned)``; an owned folder is removed at exit by the caller. Two servers on
    one host never share or wipe each other's files unless they are given the same folder.
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # counts of a previous run of this server
            stale.unlink()
        return path, False
    path = Path(tempfile.mkdtemp(prefix="headswap-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)  # inherited by every child process
    return path, True
