"""``inference.GRPCInferenceService``: the KServe V2 protocol over gRPC, a thin adapter over the data plane.

Each call does what its HTTP twin does, from the same code: ``ModelInfer`` parses with
``protocols.v2_grpc`` into the REST side's ``InferRequest`` and asks ``DataPlane.infer`` (so gRPC and
HTTP requests are admitted, shed and batched together); its deadline is the call's gRPC deadline (or
sooner, by ``parameters.timeout``). ``ModelStreamInfer`` answers each request of a stream as it
finishes, a failed one as ``error_message``. The repository calls need the admin token as
``authorization: Bearer <token>`` metadata. Every error ends the call through ``service.grpc.errors``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np

from service.control.repository import Repository
from service.errors import RequestError
from service.grpc.errors import INTERNAL_MESSAGE, abort, http_status, log
from service.inference.dataplane import DataPlane, InferenceRequest
from service.observability.metrics import Metrics
from service.protocols import v2_grpc
from service.protocols.admin import check_bearer
from service.protocols.grpc_v2 import open_inference_pb2 as pb
from service.protocols.grpc_v2 import open_inference_pb2_grpc
from service.protocols.v2 import MAX_BATCH, MAX_ELEMENTS, check_image_sizes, model_metadata, server_metadata

ENDPOINT = "grpc_infer"  # the endpoint label of gRPC inference in the request metrics
CLIENT_GONE = 499  # the status label of a call its client cancelled (nginx's "client closed request")
T = TypeVar("T")


@dataclass(frozen=True)
class AdminAccess:
    """How the repository calls are reached on this port: ``token`` ('' : the admin API is off) and
    ``caller`` (the audit log's name for it); ``elsewhere``: the admin API has a port of its own."""

    token: str = ""
    caller: str = ""
    elsewhere: bool = False


class InferenceServicer(open_inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, metrics: Metrics, max_image_bytes: int, version: str,
                 repository: Repository | None, admin: AdminAccess) -> None:
        self.plane = plane
        self.metrics = metrics
        self.max_image_bytes = max_image_bytes
        self.version = version
        self.repository = repository
        self.admin = admin

    # ---- health and metadata ------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.is_ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        return v2_grpc.server_metadata(server_metadata(version=self.version))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return await _answer(context, "ModelReady", self._model_ready(request))

    async def _model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        self.plane.resolve(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=self.plane.is_ready())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        return await _answer(context, "ModelMetadata", self._metadata(request))

    async def _metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        slot = self.plane.resolve(request.name, request.version or None) or "stable"
        views = self.plane.views(request.name)
        view = views[slot]
        return v2_grpc.model_metadata(model_metadata(name=request.name, versions=[v.version for v in views.values()],
                                                     num_classes=view.meta.num_classes, input_size=view.meta.input_size))

    # ---- inference ----------------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await _answer(context, "ModelInfer", self._observed(request, context))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=await self._observed(request, context)))
            except RequestError as exc:
                answers.put_nowait(pb.ModelStreamInferResponse(error_message=str(exc)))
            except Exception:  # noqa: BLE001 - a bug answers this request alone, without internals
                log.exception("unexpected error in gRPC ModelStreamInfer")
                answers.put_nowait(pb.ModelStreamInferResponse(error_message=INTERNAL_MESSAGE))

        calls: list[asyncio.Future[None]] = []

        async def read() -> None:
            async for request in request_iterator:
                calls.append(asyncio.ensure_future(one(request)))
            await asyncio.gather(*calls)  # each answers (or fails) alone: one() never raises
            answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # its error, if any, ends the stream
        finally:  # the client went away: what it sent is not worth answering any more
            reader.cancel()
            for call in calls:
                call.cancel()

    async def _observed(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        """``_infer`` with the request metrics HTTP inference has: in flight, count by status (HTTP's
        number for the same outcome), slot and model, duration, input errors by reason."""
        started = time.perf_counter()
        slot = ["none"]
        status, reason = 200, ""
        self.metrics.inflight.inc()
        try:
            return await self._infer(request, context, slot)
        except RequestError as exc:
            status, reason = http_status(exc), exc.reason
            raise
        except asyncio.CancelledError:  # the client went away, or its deadline passed first
            remaining = context.time_remaining()
            status = 504 if remaining is not None and remaining <= 0 else CLIENT_GONE
            raise
        except Exception as exc:
            status = http_status(exc)
            raise
        finally:
            self.metrics.inflight.dec()
            model = self.plane.metric_model(request.model_name)
            self.metrics.requests.labels(ENDPOINT, str(status), slot[0], model).inc()
            self.metrics.request_duration.labels(ENDPOINT, model).observe(time.perf_counter() - started)
            if 400 <= status < 500:
                self.metrics.input_errors.labels(reason or "invalid").inc()

    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext,
                     slot: list[str]) -> pb.ModelInferResponse:
        started = time.monotonic()
        name, version = request.model_name, request.model_version or None
        slot[0] = self.plane.resolve(name, version) or slot[0]  # an unknown model or version: NOT_FOUND first
        parsed = v2_grpc.parse_model_infer(request, max_batch=MAX_BATCH, max_elements=MAX_ELEMENTS)
        check_image_sizes(parsed.images, self.max_image_bytes)
        budgets = [t for t in (parsed.timeout_s, context.time_remaining()) if t is not None]
        inference = await self.plane.infer(InferenceRequest(
            images=parsed.images, pixels=parsed.pixels, top_k=parsed.top_k, timeout_s=min(budgets, default=None),
            started=started, key=_metadata(context, "x-request-key"), version=version, model=name),
            routed=lambda chosen: slot.__setitem__(0, chosen))
        served = inference.first
        slot[0] = served.slot
        return v2_grpc.encode_model_infer(
            model_name=inference.view.name, model_version=served.version, request=parsed,
            probabilities=np.stack([r.probabilities for r in inference.results]), class_names=inference.view.meta.class_names,
            parameters={"slot": served.slot, "version": served.version,
                        "batch_size": max(r.batch_size for r in inference.results)})

    # ---- the model repository (admin) ---------------------------------------------------------
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
                              ) -> pb.RepositoryIndexResponse:
        repository = await self._admin(context)
        return v2_grpc.repository_index(repository.index(request.ready))

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
                                  ) -> pb.RepositoryModelLoadResponse:
        repository = await self._admin(context)
        work = _to_thread(lambda: repository.load(request.model_name, v2_grpc.repository_config(request.parameters),
                                                  self.admin.caller))
        await _answer(context, "RepositoryModelLoad", work)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
                                    ) -> pb.RepositoryModelUnloadResponse:
        repository = await self._admin(context)
        await _answer(context, "RepositoryModelUnload",
                      _to_thread(lambda: repository.unload(request.model_name, self.admin.caller)))
        return pb.RepositoryModelUnloadResponse()

    async def _admin(self, context: grpc.aio.ServicerContext) -> Repository:
        """The repository, once the caller's token is the admin token; else the call ends (UNIMPLEMENTED
        with the admin API off, PERMISSION_DENIED where it has a port of its own, UNAUTHENTICATED)."""
        if not self.admin.token or self.repository is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                "the admin API is off: set HEADSWAP_ADMIN_TOKEN or --admin-token-file")
        if self.admin.elsewhere:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "the repository calls are admin calls, served over HTTP on the admin port only (--admin-port)")
        try:
            check_bearer(_metadata(context, "authorization") or "", self.admin.token)
        except RequestError as exc:
            await abort(context, exc, "repository")
        assert self.repository is not None
        return self.repository


async def _answer(context: grpc.aio.ServicerContext, method: str, work: Awaitable[T]) -> T:
    """``work``'s result; its error ends the call with its status code."""
    try:
        return await work
    except Exception as exc:  # noqa: BLE001 - every error becomes a status; unexpected ones are logged there
        await abort(context, exc, method)
        raise  # not reached: abort raises


async def _to_thread(call: Callable[[], T]) -> T:
    return await asyncio.to_thread(call)


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    """The value of invocation metadata ``key`` (lower case, as gRPC sends it); None when absent."""
    return next((value for name, value in context.invocation_metadata() or () if name == key), None)
