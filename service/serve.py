"""``headswap serve``: assemble settings, workers, routes and LitServe; run until a signal.

SIGTERM (what Kubernetes sends) and SIGINT both start LitServe's graceful shutdown: API
servers stop accepting and finish in-flight requests, then workers and the queue manager
end, and the process exits 0. LitServe 0.2.19 has no SIGTERM handler of its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

import litserve as ls
from litserve.utils import WorkerSetupStatus

from models import load_checkpoint
from service.app import Routes, ServedContext
from service.decode import DecodeLimits
from service.dispatch import Dispatcher, ModelView
from service.settings import Settings
from service.v2_routes import V2Routes
from service.worker import ClassifierAPI, WorkerConfig

log = logging.getLogger("headswap")


class _ShutdownSignals:
    """SIGTERM/SIGINT -> one KeyboardInterrupt in the main process, which LitServe turns into its
    graceful shutdown. Repeats are ignored so a second signal cannot cut that shutdown short, and
    forked children that inherit the handler (uvicorn re-raises the signal it caught once it has
    drained) simply exit."""

    def __init__(self) -> None:
        self.main_pid = os.getpid()
        self.received = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.main_pid:
            raise SystemExit(0)
        if self.received:
            log.info("already shutting down (signal %d ignored; SIGKILL forces)", signum)
            return
        self.received = True
        log.info("signal %d: finishing in-flight requests, then stopping", signum)
        raise KeyboardInterrupt


def metrics_dir() -> tuple[Path, bool]:
    """The Prometheus multiprocess folder: $PROMETHEUS_MULTIPROC_DIR, else a private fresh one.

    Returns ``(path, owned)``; an owned folder is removed at exit. Two servers on one host
    never share or wipe each other's files.
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # counts from a previous run of this server
            stale.unlink()
        return path, False
    path = Path(tempfile.mkdtemp(prefix="headswap-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)  # inherited by every child process
    return path, True


def serve(settings: Settings) -> int:
    """Serve ``settings.checkpoint`` until SIGTERM/SIGINT; returns the exit code."""
    if not settings.checkpoint:
        raise ValueError("no checkpoint to serve: pass --checkpoint or set HEADSWAP_CHECKPOINT")
    if not 1024 <= settings.port <= 65535:
        raise ValueError(f"port must be within 1024-65535, found {settings.port}")
    loaded = load_checkpoint(settings.checkpoint)
    if loaded.meta.partial:
        raise ValueError(f"{settings.checkpoint} is a partial checkpoint: merge it into a full one first")
    model = ModelView(settings.model_name or loaded.meta.name or loaded.meta.arch, loaded.version, loaded.meta)
    del loaded
    multiproc, owned = metrics_dir()
    workers = settings.workers_per_device
    config = WorkerConfig(
        checkpoint=str(Path(settings.checkpoint).resolve()), device=settings.device, precision=settings.precision,
        threads=max(1, (os.cpu_count() or 1) // workers), max_batch_size=settings.max_batch_size,
        batch_timeout_s=settings.batch_timeout_ms / 1000, timeout_s=settings.timeout_s, log_level=settings.log_level,
    )
    accelerator = "cpu" if settings.device == "cpu" else ("cuda" if settings.device == "cuda" else "auto")
    server = ls.LitServer(ClassifierAPI(config), accelerator=accelerator, workers_per_device=workers,
                          timeout=False, restart_workers=True)
    server.uvicorn_graceful_timeout = settings.drain_timeout_s
    expected = workers * (server.devices if isinstance(server.devices, int) else 1)

    def worker_states() -> list[str]:
        try:
            return list((getattr(server, "workers_setup_status", None) or {}).values())
        except (OSError, EOFError):  # the queue manager is gone: shutting down
            return []

    def is_ready() -> bool:
        states = worker_states()
        return len(states) >= expected and all(v == WorkerSetupStatus.READY for v in states)

    def is_serving() -> bool:
        return WorkerSetupStatus.READY in worker_states()

    limits = DecodeLimits(settings.max_image_bytes, settings.max_image_pixels)
    dispatcher = Dispatcher(server, "/predict", limits, settings.timeout_s, settings.decode_threads)
    ctx = ServedContext(dispatcher, model.name, lambda: {"stable": model}, is_ready, is_serving, settings.max_image_bytes)
    Routes(ctx).install(server.app)
    V2Routes(ctx).install(server.app)
    _ShutdownSignals().install()
    threading.Thread(target=_announce, args=(settings, model, is_ready), daemon=True).start()
    try:
        server.run(host=settings.host, port=settings.port, log_level=settings.log_level,
                   generate_client_file=False)
    finally:
        if owned:
            shutil.rmtree(multiproc, ignore_errors=True)
    log.info("headswap stopped")
    return 0


def _announce(settings: Settings, model: ModelView, is_ready: object) -> None:
    while not is_ready():  # type: ignore[operator]
        time.sleep(0.1)
    log.info("headswap serving %s (version %s, %s) at http://%s:%d", model.name, model.version,
             model.meta.arch, settings.host, settings.port)
