"""The gRPC listener: a ``grpc.aio`` server in every API-server process, on the event loop HTTP uses.

Each forked API-server process starts its own server on ``--grpc-port`` (SO_REUSEPORT: the kernel
spreads connections over them, as it spreads HTTP's over the shared socket), so gRPC calls reach the
same data plane, admission and response queue as HTTP requests and are batched with them. It starts
inside LitServe's lifespan (after the response-queue consumer it needs) and counts itself in
``started``, which readiness reads. On SIGTERM it stops taking calls at once, beside uvicorn,
and finishes the calls in flight within ``drain_timeout_s``.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc

from service.grpc.health import HealthServicer
from service.grpc.inference import InferenceServicer
from service.protocols.grpc_v2 import health_pb2, health_pb2_grpc, open_inference_pb2_grpc
from service.protocols.v2 import BODY_FACTOR

MESSAGE_OVERHEAD = 64 * 1024  # the protobuf framing around a request's images


class GrpcListener:
    """Built before the API servers fork; holds no gRPC object until ``serve`` runs in one of them."""

    def __init__(self, host: str, port: int, servicer: Callable[[], InferenceServicer], *, max_image_bytes: int,
                 is_ready: Callable[[], bool], drain_timeout_s: float, started: Any) -> None:
        self.address = address(host, port)
        self.servicer = servicer
        self.max_message = max_image_bytes * BODY_FACTOR + MESSAGE_OVERHEAD
        self.is_ready = is_ready
        self.drain_timeout_s = drain_timeout_s
        self.started = started  # a shared, locked integer (multiprocessing.Value): API servers whose gRPC server is up

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[None]:
        """A gRPC server in this API server while inside (run within its app's lifespan)."""
        health = HealthServicer(self.is_ready)
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.max_message),
            ("grpc.max_send_message_length", self.max_message),
            ("grpc.so_reuseport", 1),
        ])
        open_inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer(), server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        server.add_insecure_port(self.address)  # raises RuntimeError if it cannot bind (start-up checked it could)
        await server.start()
        self._count(+1)
        stopping: list[asyncio.Task[None]] = []

        def stop() -> None:
            if not stopping:
                health.stopping.set()
                stopping.append(asyncio.get_running_loop().create_task(server.stop(self.drain_timeout_s)))

        restore = _on_shutdown_signals(asyncio.get_running_loop(), stop)
        try:
            yield
        finally:
            restore()
            stop()
            await stopping[0]
            self._count(-1)

    def _count(self, change: int) -> None:
        with self.started.get_lock():
            self.started.value += change


def _on_shutdown_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> Callable[[], None]:
    """Have SIGTERM and SIGINT call ``stop`` (on ``loop``) before the handler they have now (uvicorn's,
    which begins its own graceful shutdown). Returns what puts that handler back."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(sig: int, frame: Any) -> None:
        loop.call_soon_threadsafe(stop)
        chained = previous[sig]
        if callable(chained):
            chained(sig, frame)

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, chained in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, chained)

    return restore


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def answers(address: str) -> bool:
    """True once a gRPC health check at ``address`` gets an answer (any status): the port serves gRPC."""
    with grpc.insecure_channel(address) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return True
        except grpc.RpcError as exc:
            return exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
