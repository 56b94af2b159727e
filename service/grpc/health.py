"""gRPC's standard health service (``grpc.health.v1.Health``), which Kubernetes' gRPC probes call.

``""`` (the server) and ``inference.GRPCInferenceService`` are SERVING exactly when the server is
ready (``/ready`` would answer 200); ``liveness`` is SERVING while the process answers at all, for a
liveness probe. Another service name is NOT_FOUND (Check) or SERVICE_UNKNOWN (Watch). Once shutdown
begins, everything is NOT_SERVING and Watch streams end, so they do not hold the drain open.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from service.protocols.grpc_v2 import health_pb2, health_pb2_grpc

READINESS = ("", "inference.GRPCInferenceService")
LIVENESS = "liveness"
Status = health_pb2.HealthCheckResponse.ServingStatus


class HealthServicer(health_pb2_grpc.HealthServicer):
    WATCH_INTERVAL_S = 0.5  # how often a Watch stream looks again

    def __init__(self, is_ready: Callable[[], bool]) -> None:
        self.is_ready = is_ready
        self.stopping = asyncio.Event()

    def status(self, service: str) -> int:
        if self.stopping.is_set():
            return health_pb2.HealthCheckResponse.NOT_SERVING
        if service == LIVENESS:
            return health_pb2.HealthCheckResponse.SERVING
        if service in READINESS:
            return health_pb2.HealthCheckResponse.SERVING if self.is_ready() else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
                    ) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:80]!r}: health is "
                                f"reported for '', inference.GRPCInferenceService and {LIVENESS}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self.status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self.stopping.is_set():
                return
            try:
                await asyncio.wait_for(self.stopping.wait(), self.WATCH_INTERVAL_S)
            except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
                pass
