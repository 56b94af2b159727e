"""``headswap serve``: assemble settings, shared state, workers, routes and LitServe; run until a signal.

SIGTERM (what Kubernetes sends) and SIGINT both start LitServe's graceful shutdown: API
servers stop accepting and finish in-flight requests, then workers, LitServe's manager and the
request queue's process end, and the process exits 0 (1 when it stopped because the request
queue's process was lost). LitServe 0.2.19 has no SIGTERM handler of its own.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import litserve as ls
import torch
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from litserve.utils import WorkerSetupStatus
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.control.audit import AuditLog
from service.control.bootstrap import bootstrap, watch_rollout
from service.control.controller import Controller
from service.control.memory import freeze_survivors, pin_mmap_threshold
from service.control.repository import Repository
from service.control.rollout import RolloutFile
from service.control.routing import CanaryGuard, GuardPolicy
from service.control.slots import SharedState
from service.control.store import CheckpointStore
from service.grpc import listener as grpc_listener
from service.grpc.inference import AdminAccess, InferenceServicer
from service.http.admin import AdminRoutes
from service.http.errors import framework_error
from service.http.routes import Routes
from service.http.shedding import ShedEarly
from service.http.sidecar import SidecarServer, check_bindable, local_address
from service.http.v2_routes import V2Routes
from service.inference.admission import Admission, QueueLedger
from service.inference.answers import AnswerListener
from service.inference.dataplane import DataPlane
from service.inference.decode import DecodeLimits
from service.inference.dispatch import Dispatcher
from service.inference.engine import check_servable
from service.inference.request_queue import start_queue
from service.inference.worker import ClassifierAPI, WorkerConfig
from service.observability.metrics import Metrics, StateCollector, exposition
from service.protocols.admin import token_id
from service.settings import Settings, server_version

log = logging.getLogger("headswap")
QUEUE_WATCH_S = 1.0  # how often the main process checks that the request queue's process lives


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


def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code. Raises ValueError for bad settings."""
    if not settings.checkpoint and not settings.model and not settings.rollout_file:
        raise ValueError("nothing to serve: pass --checkpoint or --model NAME=CHECKPOINT (or --rollout-file), "
                         "or set HEADSWAP_CHECKPOINT")
    runtime, owned = (Path(settings.state_dir), False) if settings.state_dir else (Path(tempfile.mkdtemp(prefix="headswap-state-")), True)
    try:
        return _serve(settings, runtime)
    finally:
        if owned:
            shutil.rmtree(runtime, ignore_errors=True)


def _serve(settings: Settings, runtime: Path) -> int:
    _check_ports(settings)  # before anything slow: a taken port fails at once
    pin_mmap_threshold()  # before the API servers fork; spawned workers start afresh (service.control.memory)
    shared = SharedState(runtime)
    store = CheckpointStore(settings.store)
    metrics = Metrics(settings.max_batch_size)
    rollout = RolloutFile(Path(settings.rollout_file)) if settings.rollout_file else None
    cpu = settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available())
    cores = os.cpu_count() or 1
    # On CPU, one single-threaded worker per core outruns one worker with many threads at saturation,
    # and keeps its speed when something else takes a core (an intra-op thread pool waits for its
    # slowest); a batch that runs alone (a lone client) takes every core instead (solo_threads).
    workers = settings.workers_per_device or (cores if cpu else 1)
    expected = workers * (1 if cpu else max(1, torch.cuda.device_count()))  # LitServe's: every visible GPU
    ledger = QueueLedger(expected)
    admission = Admission(ledger, settings.queue_bound, floor=2 * settings.max_batch_size * expected)
    controller = Controller(shared, store, expected, audit=AuditLog(runtime / "audit.log" if settings.state_dir else None),
                            validate=check_servable, rollout=rollout, metrics=metrics, swap_timeout_s=settings.swap_timeout_s,
                            memory_budget_bytes=settings.memory_budget_bytes)
    state, rollout_stamp = bootstrap(settings, controller, shared, store, rollout)
    answers = AnswerListener(f"headswap-answers-{os.getpid()}-{secrets.token_hex(4)}")  # this server's own sockets
    queue_process, requests = start_queue()  # a fork: before the threads below start
    server = _lit_server(settings, runtime, ledger, workers, cores if cpu and workers > 1 else 0, max(1, cores // workers),
                         answers.name, requests)
    _within_lifespan(server.app, functools.partial(answers.serve_app, server))  # first: up before a gRPC call comes
    if len(server.devices) * workers != expected:  # the ledger, the controller and readiness count every worker
        raise RuntimeError(f"LitServe runs {workers} worker(s) on each of {server.devices}, not {expected} in all")
    grpc_started = mp.get_context("fork").Value("i", 0) if settings.grpc_port else None  # shared with the API servers
    api_servers = settings.api_servers or expected
    readiness = Readiness(server, expected, shared, grpc_started, api_servers=api_servers, queue_pid=requests.pid())
    dispatcher = Dispatcher(server, requests, DecodeLimits(settings.max_image_bytes, settings.max_image_pixels),
                            settings.timeout_s, settings.decode_threads,
                            decode_on_worker=settings.decode_on == "worker", admission=admission)
    guard = CanaryGuard(GuardPolicy(settings.guard_window, settings.guard_max_error_rate, settings.guard_min_agreement))
    plane = DataPlane(dispatcher, shared, is_ready=readiness.ready, is_serving=readiness.serving,
                      metrics=metrics, guard=guard, controller=controller, metrics_max_models=settings.metrics_max_models)
    collector = StateCollector(shared.read, os.getpid(), queue_depth=ledger.depth, admitted=ledger.held,
                               worker_pids=lambda: [ack.pid for ack in shared.acks().values()])
    metrics_route = _install_routes(server.app, settings, plane, metrics, collector)
    repository = Repository(controller, shared, store)  # Triton's repository calls, over HTTP and gRPC alike
    if settings.grpc_port:
        listener = _grpc_listener(settings, plane, metrics, repository, readiness, grpc_started)
        _within_lifespan(server.app, lambda app: listener.serve())
    _within_lifespan(server.app, _frozen)  # last: once each API server's listeners and app are built
    sidecars = _sidecars(settings, controller, shared, repository, metrics_route, server.app)
    signals = _ShutdownSignals()
    signals.install()
    stop, queue_lost = threading.Event(), threading.Event()
    threads = [threading.Thread(target=_watch_queue, args=(readiness.queue_pid, signals, stop, queue_lost), daemon=True)]
    if rollout:
        threads.append(threading.Thread(target=watch_rollout, args=(rollout, controller, stop, rollout_stamp), daemon=True))
    served = ", ".join(f"{name} (version {model.stable.version})" for name, model in state.models.items())
    threading.Thread(target=_after_start, args=(settings, served, readiness, sidecars, threads), daemon=True).start()
    freeze_survivors()  # last before the API servers fork: they inherit it (service.control.memory)
    try:
        server.run(host=settings.host, port=settings.port, num_api_servers=api_servers, log_level=settings.log_level,
                   generate_client_file=False, access_log=settings.access_log == "on",
                   http=ShedEarly.judging(refusal=admission.refusal, metrics=metrics, model_label=plane.metric_model))
    finally:
        stop.set()
        for sidecar in sidecars:
            sidecar.stop()
        queue_process.shutdown()
    log.info("headswap stopped")
    return 1 if queue_lost.is_set() else 0


def _watch_queue(pid: int, signals: _ShutdownSignals, stop: threading.Event, lost: threading.Event) -> None:
    """The request queue's process (``pid``) gone while serving: no request can reach a worker any
    more, so the server stops, exit code 1, for its supervisor to start it afresh."""
    while not stop.wait(QUEUE_WATCH_S):
        if not _pid_alive(pid) and not signals.received:
            log.error("the request queue's process (pid %d) is gone: stopping, so that the server can be restarted", pid)
            lost.set()
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _check_ports(settings: Settings) -> None:
    """Raises OSError, naming the listener, for a port that cannot be bound."""
    for port, what in ((settings.port, "server"), (settings.admin_port, "admin port"), (settings.metrics_port, "metrics port"),
                       (settings.grpc_port, "gRPC port")):
        if port:
            check_bindable(settings.host, port, what)


def _install_routes(app: FastAPI, settings: Settings, plane: DataPlane, metrics: Metrics,
                    collector: StateCollector):  # noqa: ANN202 - the /metrics route, for a side port too
    """/predict, /health, /ready, V2, /metrics and our error shape for Starlette's own 404/405."""
    Routes(plane, metrics, settings.max_image_bytes).install(app)
    V2Routes(plane, metrics, settings.max_image_bytes).install(app)
    metrics_route = _metrics_route(collector)
    app.add_api_route("/metrics", metrics_route, methods=["GET"], summary="Prometheus metrics",
                      response_class=PlainTextResponse)
    app.add_exception_handler(StarletteHTTPException, framework_error)
    return metrics_route


def _lit_server(settings: Settings, runtime: Path, ledger: QueueLedger, workers: int, solo_threads: int,
                threads: int, answers: str, requests: Any) -> ls.LitServer:
    """LitServe with our worker loop: ``workers`` per device, each with ``threads`` intra-op threads
    (``solo_threads`` for a batch that runs alone), taking from the ``requests`` queue and answering
    through the ``answers`` sockets."""
    config = WorkerConfig(
        state_dir=str(runtime.resolve()), device=settings.device, precision=settings.precision, threads=threads,
        max_batch_size=settings.max_batch_size, batch_timeout_s=settings.batch_timeout_ms / 1000,
        timeout_s=settings.timeout_s, log_level=settings.log_level, decode_on_worker=settings.decode_on == "worker",
        solo_threads=solo_threads, max_queue_wait_s=settings.max_queue_wait_ms / 1000,
        metrics_max_models=settings.metrics_max_models, memory_budget_bytes=settings.memory_budget_bytes,
        nice=settings.worker_nice, answers=answers,
    )
    accelerator = {"cpu": "cpu", "cuda": "cuda"}.get(settings.device, "auto")
    server = _LitServerOnOurQueue(ClassifierAPI(config, ledger), accelerator=accelerator, workers_per_device=workers,
                                  timeout=False, restart_workers=True)
    server.requests = requests
    server.uvicorn_graceful_timeout = settings.drain_timeout_s
    # OpenMP's own wait policy is kept on purpose (no GOMP_SPINCOUNT / OMP_WAIT_POLICY): a shorter
    # spin makes a lone 2-thread batch up to 3x slower on VMs where waking a sleeping thread is slow,
    # and a worker under load runs one thread, which never spins.
    return server


class _LitServerOnOurQueue(ls.LitServer):
    """LitServer whose workers (those it starts, and those it restarts) take from our request queue
    (``service.inference.request_queue``, set as ``requests``) instead of the one its manager makes."""

    requests: Any = None

    def _init_manager(self, num_api_servers: int) -> Any:
        manager = super()._init_manager(num_api_servers)
        self.litapi_request_queues = dict.fromkeys(self.litapi_request_queues, self.requests)
        return manager


class Readiness:
    """Readiness: every listener the settings ask for answers (the main process says so once it has
    checked, in shared memory), LitServe's setup status, every worker that acknowledged the shared
    state still alive (a killed worker stays READY in LitServe's eyes until its monitor notices),
    and the request queue's process alive. Works in the forked API servers too."""

    SERVING_TTL_S = 0.25  # how long a "yes, serving" answer is reused on the request path

    def __init__(self, server: ls.LitServer, expected: int, shared: SharedState, grpc_started: Any = None, *,
                 api_servers: int, queue_pid: int) -> None:
        self.server = server
        self.queue_pid = queue_pid
        self.expected = expected  # inference workers
        self.api_servers = api_servers
        self.shared = shared
        self.grpc_started = grpc_started  # how many API servers' gRPC servers are up (None: no gRPC port)
        self._listening = mp.get_context("fork").RawValue("b", 0)  # before the API servers fork: shared with them
        self._serving_until = 0.0

    def listening(self) -> None:
        """Called by the main process once every side listener answers."""
        self._listening.value = 1

    def states(self) -> list[str]:
        try:
            return list((getattr(self.server, "workers_setup_status", None) or {}).values())
        except (OSError, EOFError):  # the queue manager is gone: shutting down
            return []

    def alive(self) -> list[bool]:
        return [_pid_alive(ack.pid) for ack in self.shared.acks().values()]

    def workers_ready(self) -> bool:
        states = self.states()
        return len(states) >= self.expected and all(v == WorkerSetupStatus.READY for v in states) and all(self.alive())

    def grpc_up(self) -> bool:
        """Every API server's gRPC server is up (True without a gRPC port)."""
        return self.grpc_started is None or self.grpc_started.value >= self.api_servers

    def ready(self) -> bool:
        return bool(self._listening.value) and self.workers_ready() and self.grpc_up() and _pid_alive(self.queue_pid)

    def serving(self) -> bool:
        """Some worker can answer. Asked by every inference request, so a yes (one manager round trip
        and a read of every ack) is reused for SERVING_TTL_S; a no is checked afresh each time."""
        if time.monotonic() < self._serving_until:
            return True
        serving = WorkerSetupStatus.READY in self.states() and any(self.alive())
        if serving:
            self._serving_until = time.monotonic() + self.SERVING_TTL_S
        return serving


def _pid_alive(pid: int) -> bool:
    """True for a running process; False for a gone or zombie one (killed, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _metrics_route(collector: StateCollector):
    async def metrics() -> Response:
        return Response(exposition(collector), media_type=CONTENT_TYPE_LATEST)

    return metrics


def _within_lifespan(app: FastAPI, serve: Callable[[FastAPI], AbstractAsyncContextManager[Any]]) -> None:
    """Run ``serve(app)`` for the whole life of each API server's ``app``, inside the lifespan it has
    so far (LitServe's, with its answer-queue consumer, and whatever was wrapped before)."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with inner(app) as state, serve(app):
            yield state

    app.router.lifespan_context = lifespan


@asynccontextmanager
async def _frozen(app: FastAPI) -> AsyncIterator[None]:
    """What an API server built at start-up on top of what it inherited, spared later collections too."""
    freeze_survivors()
    yield


def _grpc_listener(settings: Settings, plane: DataPlane, metrics: Metrics, repository: Repository, readiness: Readiness,
                   started: Any) -> grpc_listener.GrpcListener:
    """The gRPC listener each API server runs: V2 inference and health; the repository calls on it too
    unless the admin API is off or has a port of its own."""
    token = settings.admin_secret()
    admin = AdminAccess(token, token_id(token) if token else "", elsewhere=bool(settings.admin_port))
    version = server_version()

    def servicer() -> InferenceServicer:
        return InferenceServicer(plane, metrics, settings.max_image_bytes, version, repository, admin)

    return grpc_listener.GrpcListener(settings.host, settings.grpc_port, servicer, max_image_bytes=settings.max_image_bytes,
                                      is_ready=readiness.ready, drain_timeout_s=settings.drain_timeout_s, started=started)


def _sidecars(settings: Settings, controller: Controller, shared: SharedState, repository: Repository,
              metrics_route: object, app: FastAPI) -> list[SidecarServer]:
    """Admin on the main app or its own port; /metrics also on its own port if asked."""
    sidecars = []
    token = settings.admin_secret()
    if token:
        admin = AdminRoutes(token, controller, shared, repository, {
            "window": settings.guard_window, "max_error_rate": settings.guard_max_error_rate,
            "min_agreement": settings.guard_min_agreement})
        if settings.admin_port:
            admin_app = FastAPI(title="headswap admin")
            admin.install(admin_app)
            sidecars.append(SidecarServer(admin_app, settings.host, settings.admin_port, "admin"))
        else:
            admin.install(app)
    if settings.metrics_port:
        metrics_app = FastAPI(title="headswap metrics", openapi_url=None)
        metrics_app.add_api_route("/metrics", metrics_route, methods=["GET"])
        sidecars.append(SidecarServer(metrics_app, settings.host, settings.metrics_port, "metrics"))
    return sidecars


def _after_start(settings: Settings, served: str, readiness: Readiness,
                 sidecars: list[SidecarServer], threads: list[threading.Thread]) -> None:
    """Once every worker is ready and the API servers answer (so no thread runs across their
    fork), start the side servers (their sockets are bound already) and, once they answer, say
    ready; then start the rollout watcher and log the URL."""
    host = local_address(settings.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"
    while not readiness.workers_ready() or not _answers(f"{url}/health"):
        time.sleep(0.1)
    for sidecar in sidecars:
        sidecar.start()
    while not all(sidecar.answers() for sidecar in sidecars):
        time.sleep(0.05)
    if settings.grpc_port:
        grpc_address = grpc_listener.address(host, settings.grpc_port)
        while not readiness.grpc_up() or not grpc_listener.answers(grpc_address):
            time.sleep(0.05)
    readiness.listening()
    for thread in threads:
        thread.start()
    log.info("headswap serving %s at %s%s", served, url, f" and gRPC {host}:{settings.grpc_port}" if settings.grpc_port else "")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False
