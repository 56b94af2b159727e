"""Open-loop HTTP/1.1 load over loopback: arrivals on a seeded schedule, whatever the server answers.

A closed-loop user waits for its answer before it asks again, so a slow server slows its own
load and never sees more than N requests. Here request k is due at a time drawn in advance
(exponential gaps at ``rate`` per second from ``random.Random(seed)``: Poisson arrivals, the
same schedule for every server given the same seed) and is sent then, however many are still
unanswered: on an idle keep-alive connection of a pool, or on a new one when none is idle.
Latency counts from the *scheduled* time, so a generator that falls behind cannot hide the
server's queue (coordinated omission); how late each request was actually written (the
schedule lag) is recorded, and ``summarize_open`` says when the generator fell behind.

Bounded: the schedule ends after ``warmup_s + measure_s`` or ``max_requests`` arrivals; each
request waits at most ``timeout_s``; after the last arrival, answers are awaited for at most
``drain_s``, and the requests still open then are abandoned (recorded, status 0); at most
``max_connections`` connections are open (past that an arrival waits for one, and its lag shows
it). The target is always 127.0.0.1. Samples of the server (CPU, resident memory, metrics) are
taken when the first request is due, when the measured window opens and closes, and once the
answers are in and the server has idled ``IDLE_S``; ``headswap_queue_depth`` is also read every
``watch_s`` seconds.
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.loadgen import (
    HOST,
    LoadSpec,
    Records,
    _cpu_self,
    encode_request,
    percentile,
    read_response,
    sample,
    scrape,
    steady_rate,
)

LATE_MS = 10.0  # a request written this much after its scheduled time is late; p99 lag over it: the generator fell behind
IDLE_S = 2.0  # idle this long before the first and after the last sample: a worker gives its free heap back after 1 s
STALE = (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError)  # a keep-alive connection the server closed


def poisson_schedule(rate: float, seconds: float, cap: int, seed: int) -> list[float]:
    """Arrival offsets (s from the start) of a Poisson process at ``rate``/s, for ``seconds``, at most ``cap``."""
    rng = random.Random(seed)
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds and len(out) < cap:
        out.append(t)
        t += rng.expovariate(rate)
    return out


class OpenRecords(Records):
    """Records plus, per request, its schedule lag (s) and, for a 503, whether it said Retry-After."""

    def __init__(self) -> None:
        super().__init__()
        self.lag: list[float] = []
        self.retry_after: list[bool] = []

    def add_open(self, due: float, end: float, status: int, headers: dict[str, str], lag: float) -> None:
        batch = headers.get("x-batch-size", "0")
        self.add(due, end, status, int(batch) if batch.isdigit() else 0, headers.get("x-model-version", ""))
        self.lag.append(lag)
        self.retry_after.append("retry-after" in headers)

    def as_json(self) -> dict[str, Any]:
        return {**super().as_json(), "lag": [round(x, 6) for x in self.lag], "retry_after": self.retry_after}


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class OpenLoop:
    """Sends each request of a schedule at its time, on a pool of keep-alive connections."""

    def __init__(self, spec: LoadSpec, requests: list[bytes], max_connections: int) -> None:
        self.spec = spec
        self.requests = requests
        self.max_connections = max_connections
        self.records = OpenRecords()
        self.errors: dict[str, int] = {}
        self.idle: list[Conn] = []
        self.open = 0
        self.most_open = 0
        self.freed = asyncio.Condition()
        self.tasks: set[asyncio.Task] = set()

    async def arrive(self, began: float, schedule: list[float]) -> None:
        """Start request k at ``began + schedule[k]`` (or at once, if that has passed)."""
        for k, offset in enumerate(schedule):
            delay = began + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(self._request(k, began + offset))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def drain(self, seconds: float) -> int:
        """Wait up to ``seconds`` for the requests still open; abandon the rest. Returns how many."""
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=seconds)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for _, writer in self.idle:
            writer.close()
        return self.errors.get("Abandoned", 0)

    async def _request(self, k: int, due: float) -> None:
        request = self.requests[k % len(self.requests)]
        conn: Conn | None = None
        lag: float | None = None  # until a connection is in hand: still waiting, as late as it gets
        try:
            for attempt in (0, 1):
                conn, reused = await self._connection()
                lag = time.monotonic() - due
                try:
                    conn[1].write(request)
                    status, headers, _ = await asyncio.wait_for(read_response(conn[0]), self.spec.timeout_s)
                    break
                except STALE:
                    await self._release(conn, keep=False)
                    conn = None
                    if not reused or attempt:  # a fresh connection that fails is the server's failure
                        raise
        except asyncio.CancelledError:
            self._fail(due, lag, "Abandoned", conn)
            raise
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self._fail(due, lag, type(exc).__name__, conn)
            return
        self.records.add_open(due, time.monotonic(), status, headers, lag)
        await self._release(conn, keep=headers.get("connection", "").lower() != "close")

    async def _connection(self) -> tuple[Conn, bool]:
        """An idle pooled connection (most recently used first), else a new one, within the cap."""
        while self.idle:
            conn = self.idle.pop()
            if not conn[0].at_eof():
                return conn, True
            conn[1].close()  # the server closed it while it idled
            self.open -= 1
        async with self.freed:
            await self.freed.wait_for(lambda: self.open < self.max_connections or bool(self.idle))
            if self.idle:
                return self.idle.pop(), True
            self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            return await asyncio.wait_for(asyncio.open_connection(HOST, self.spec.port), self.spec.timeout_s), False
        except BaseException:
            await self._release(None, keep=False)
            raise

    async def _release(self, conn: Conn | None, keep: bool) -> None:
        if conn is not None and keep:
            self.idle.append(conn)
        else:
            if conn is not None:
                conn[1].close()
            self.open -= 1
        async with self.freed:
            self.freed.notify()

    def _fail(self, due: float, lag: float | None, kind: str, conn: Conn | None) -> None:
        ended = time.monotonic()
        self.records.add_open(due, ended, 0, {}, ended - due if lag is None else lag)
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if conn is not None:  # its state is unknown: never reuse it
            conn[1].close()
            self.open -= 1
            asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self.freed:
            self.freed.notify()


def connection_cap() -> int:
    """Connections this process may open: its file-descriptor limit (raised to the hard one), less a margin."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return max(16, soft - 64)


async def measure_open(spec: LoadSpec) -> dict[str, Any]:
    """Run one open-loop point; returns the raw records, the schedule and the samples."""
    bodies = [Path(p).read_bytes() for p in spec.bodies] or [b""]
    requests = [encode_request(spec.method, spec.path, spec.content_type, body) for body in bodies]
    schedule = poisson_schedule(spec.rate, spec.warmup_s + spec.measure_s, spec.max_requests, spec.seed)
    cap = min(spec.max_connections or connection_cap(), connection_cap())
    gen = OpenLoop(spec, requests, cap)
    loop = asyncio.get_running_loop()
    began = time.monotonic() + 0.2  # the first sample is taken before anything is due
    window = (began + spec.warmup_s, began + spec.warmup_s + spec.measure_s)
    edges: dict[str, dict[str, Any]] = {}
    depth: list[tuple[float, float]] = []

    async def sample_at(name: str, when: float) -> None:
        await asyncio.sleep(max(0.0, when - time.monotonic()))
        edges[name] = await loop.run_in_executor(None, _safe_sample, spec)

    async def watch() -> None:
        while True:
            await asyncio.sleep(spec.watch_s)
            values = await loop.run_in_executor(None, _safe_scrape, spec)
            if "headswap_queue_depth" in values:
                depth.append((time.monotonic(), values["headswap_queue_depth"]))

    await sample_at("before", began - 0.1)
    watcher = asyncio.ensure_future(watch()) if spec.watch_s > 0 and spec.metrics_path else None
    opened = asyncio.ensure_future(sample_at("open", window[0]))
    await gen.arrive(began, schedule)
    await opened
    await sample_at("close", window[1])
    abandoned = await gen.drain(spec.drain_s)
    if watcher:
        watcher.cancel()
    await asyncio.sleep(IDLE_S)
    edges["drained"] = await loop.run_in_executor(None, _safe_sample, spec)
    for edge in edges.values():  # JSON keys must be strings
        edge["server"] = {str(pid): info for pid, info in edge["server"].items()}
    return {"mode": "open", "rate": spec.rate, "seed": spec.seed, "concurrency": 0, "began": began, "window": list(window),
            "scheduled": len(schedule), "edges": edges, "records": gen.records.as_json(), "errors": gen.errors,
            "abandoned": abandoned, "max_connections": cap, "most_open": gen.most_open, "depth": depth,
            "self_cpu_total_s": _cpu_self(), "loop": type(loop).__module__.split(".")[0]}


def _safe_sample(spec: LoadSpec) -> dict[str, Any]:
    """``sample``, with the metrics left empty when the server does not answer /metrics in time."""
    try:
        return sample(spec)
    except OSError:
        return sample(replace(spec, metrics_path=""))


def _safe_scrape(spec: LoadSpec) -> dict[str, float]:
    try:
        return scrape(spec.port, spec.metrics_path, ("headswap_queue_depth",))
    except OSError:
        return {}


# --------------------------------------------------------------------------- the numbers


def summarize_open(result: dict[str, Any]) -> dict[str, Any]:
    """One open-loop point's numbers. Requests *scheduled* in the measured window count: their
    statuses, latencies (scheduled time to answer) and lag; goodput is the rate of 200s
    *answered* in the window (``steady_rate``: answers come in whole batches), so a server that
    queues without bound gets no credit for answers it gives after the window. CPU and metrics
    cover the window; resident memory is per server process, before the first arrival
    (``before``), when the window opens (``open``) and closes (``close``), and ``IDLE_S`` after
    the last answer is in (``drained``)."""
    rec = result["records"]
    t0, t1 = result["window"]
    wall = t1 - t0
    inside = [i for i, start in enumerate(rec["start"]) if t0 <= start < t1]
    latency = {200: [], 503: []}
    sent_503 = []  # from the write instead of the scheduled time: the server's part alone, without the generator's lag
    statuses: dict[str, int] = {}
    for i in inside:
        status = rec["status"][i]
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if status in latency:
            latency[status].append((rec["end"][i] - rec["start"][i]) * 1000)
        if status == 503:
            sent_503.append((rec["end"][i] - rec["start"][i] - rec["lag"][i]) * 1000)
    lag = [rec["lag"][i] * 1000 for i in inside]
    answered = [end for end, status in zip(rec["end"], rec["status"]) if status == 200 and t0 <= end < t1]
    edges = result["edges"]
    first, last = edges.get("open", {}), edges.get("close", {})
    metrics = {k: v - first.get("metrics", {}).get(k, 0.0) for k, v in last.get("metrics", {}).items()}
    count = metrics.get("headswap_batch_size_count", 0.0)
    rejected = {k.split('reason="', 1)[1].split('"', 1)[0]: v for k, v in metrics.items()
                if k.startswith("headswap_rejected_total{")}
    server_cpu = sum(info["cpu_s"] - first.get("server", {}).get(pid, {}).get("cpu_s", 0.0)
                     for pid, info in last.get("server", {}).items())
    p99_lag = percentile(lag, 99)
    return {
        "rate": result["rate"], "seconds": round(wall, 2), "requests": len(inside), "offered_rps": len(inside) / wall,
        "goodput_rps": steady_rate(answered, t0, t1), "goodput_counted_rps": len(answered) / wall, "statuses": statuses, "ok": len(latency[200]), "rejected_503": len(latency[503]),
        "retry_after_503": sum(1 for i in inside if rec["status"][i] == 503 and rec["retry_after"][i]),
        "other_5xx": sum(n for s, n in statuses.items() if 500 <= int(s) < 600 and s != "503"),
        "no_answer": statuses.get("0", 0), "errors": result["errors"], "abandoned": result["abandoned"],
        "p50_ms": percentile(latency[200], 50), "p99_ms": percentile(latency[200], 99),
        "p50_503_ms": percentile(latency[503], 50), "p99_503_ms": percentile(latency[503], 99),
        "p99_503_sent_ms": percentile(sent_503, 99),
        "lag_p50_ms": percentile(lag, 50), "lag_p99_ms": p99_lag, "lag_max_ms": max(lag, default=float("nan")),
        "late": sum(1 for x in lag if x > LATE_MS), "behind": p99_lag > LATE_MS,
        "most_open": result["most_open"], "max_connections": result["max_connections"],
        "mean_batch": metrics["headswap_batch_size_sum"] / count if count else None,
        "rejected_by_server": rejected, "queue_depth_max": max((d for _, d in result["depth"]), default=None),
        "server_cores": server_cpu / wall,
        "loadgen_cores": (last.get("self_cpu_s", 0.0) - first.get("self_cpu_s", 0.0)) / wall,
        "rss": {name: {pid: info["rss_bytes"] for pid, info in edge["server"].items()} for name, edge in edges.items()},
        "queue_depth_open": first.get("metrics", {}).get("headswap_queue_depth"),
        "roles": {pid: info["role"] for pid, info in edges.get("before", {}).get("server", {}).items()},
    }
