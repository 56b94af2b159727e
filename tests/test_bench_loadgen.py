"""The benchmark's load generator: it yields to the server it shares a machine with, and its gRPC users
share channels as Triton's client library does, each channel a connection."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import grpc
import pytest

from bench.loadgen import HOST, Load, LoadSpec
from service.protocols.grpc_v2 import open_inference_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def load_through(concurrency: int, users_per_channel: int, requests: int) -> tuple[Load, set[str]]:
    """Run a closed loop against a stub ModelInfer; returns the load and the peers (connections) that called."""
    peers: set[str] = set()

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        peers.add(context.peer())
        await asyncio.sleep(0.002)  # long enough for every user to have a call in flight at once
        answer = pb.ModelInferResponse(model_name=pb.ModelInferRequest.FromString(request).model_name, model_version="v1")
        answer.parameters["batch_size"].int64_param = 1
        return answer.SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    try:
        spec = LoadSpec(port=port, path=METHOD, bodies=[], content_type="", concurrency=concurrency, warmup_s=0,
                        measure_s=30, max_requests=requests, timeout_s=10, protocol="grpc",
                        users_per_channel=users_per_channel)
        load = Load(spec, [pb.ModelInferRequest(model_name="m").SerializeToString()], stop_at=time.monotonic() + 30)
        await asyncio.wait_for(load.run(), 30)
    finally:
        await server.stop(None)
    return load, peers


@pytest.mark.parametrize(("concurrency", "users_per_channel", "connections"), [(12, 6, 2), (13, 6, 3), (5, 1, 5)])
def test_users_share_each_channel_and_every_channel_is_a_connection_of_its_own(
        concurrency: int, users_per_channel: int, connections: int) -> None:
    load, peers = asyncio.run(load_through(concurrency, users_per_channel, requests=10 * concurrency))
    assert len(peers) == connections
    assert load.records.status == [200] * 10 * concurrency
    assert set(load.records.batch) == {1}
    assert not load.errors


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_the_generator_process_runs_as_sched_batch_and_its_threads_inherit_it() -> None:
    probe = ("import os, threading, bench.loadgen as L; L.yield_to_the_server(); seen = []; "
             "t = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0))); t.start(); t.join(); "
             "print(os.sched_getscheduler(0), seen[0])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert out == [str(os.SCHED_BATCH)] * 2
