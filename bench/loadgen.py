"""Closed-loop HTTP/1.1 (or gRPC) load over loopback, light enough to share a 2-core machine with the server.

Each virtual user holds one keep-alive connection (over gRPC, six users share each channel, as
Triton's client library does) and sends its next request as soon as the previous answer is in
(closed loop); a user refused with 503 (gRPC UNAVAILABLE) first waits as the answer's
``Retry-After`` says, as a well-behaved client does (urllib3's ``Retry`` honours it), instead of
asking again at once: a loop of instant retries would measure how fast the server can
refuse, not what it serves. A spec with a ``rate`` runs open loop instead (arrivals on a
seeded schedule, whatever the server answers: ``bench.openloop``). Requests are encoded once, up front; an answer is parsed
only as far as its status line, its length and the two headers the benchmark reads
(``X-Batch-Size``, ``X-Model-Version``). uvloop is used when installed. Everything is bounded:
a warm-up, a measured window, a cap on the number of requests, a per-request timeout, and the
target is always 127.0.0.1.

It runs as its own process (``python -m bench.loadgen SPEC.json``, JSON result on stdout), so
the CPU time it reports is its own, and as SCHED_BATCH, so that its wakeups do not preempt the
server. At the edges of the measured window it also samples the server's CPU time and resident
memory (``/proc``, every process of the server's session) and, if asked, the server's
``/metrics``. ``summarize`` turns the raw records into the table's numbers.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.inference.request_queue import PROCESS_NAME as QUEUE_PROCESS

HOST = "127.0.0.1"  # loopback only: this tool never sends load anywhere else
RETRY_AFTER_CAP_S = 5.0  # the longest a refused closed-loop user waits, whatever its Retry-After says
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# The series a load run reads from the server's /metrics (summed per series, labels included).
# What a gRPC code is over HTTP (service.protocols.status), for one status column across protocols.
GRPC_STATUS = {"OK": 200, "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "FAILED_PRECONDITION": 409,
               "RESOURCE_EXHAUSTED": 413, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
SERIES = ("headswap_batch_size_sum", "headswap_batch_size_count", "headswap_rejected_total", "headswap_queue_depth",
          "headswap_inflight_requests")


@dataclass(frozen=True)
class LoadSpec:
    port: int
    path: str
    bodies: list[str]  # files, each one request body; user u starts at body u and cycles; []: no body
    content_type: str
    concurrency: int
    warmup_s: float
    measure_s: float
    max_requests: int = 100_000
    timeout_s: float = 60.0
    sid: int = 0  # the server's session id (its pid when started with start_new_session); 0: no CPU sampling
    metrics_path: str = ""  # e.g. /metrics; "": no scrape
    metrics_port: int = 0  # where metrics_path is served (0: port)
    method: str = "POST"
    # Open loop (bench.openloop) when rate > 0: Poisson arrivals at ``rate`` per second, seeded,
    # for warmup_s + measure_s; concurrency is then unused.
    rate: float = 0.0
    seed: int = 0
    drain_s: float = 35.0  # after the last arrival, longest wait for answers still due; the rest are abandoned
    max_connections: int = 0  # open connections at most (0: what the file-descriptor limit allows)
    watch_s: float = 0.0  # open loop: read headswap_queue_depth every this many seconds (0: never)
    # "grpc": each body is a serialized request sent to the gRPC method ``path`` (e.g.
    # /inference.GRPCInferenceService/ModelInfer) on ``port``; ``users_per_channel`` users share each
    # channel (HTTP/2 connection), six as Triton's client library (and so perf_analyzer) shares them.
    protocol: str = "http"
    users_per_channel: int = 6


def start_load(spec: LoadSpec, workdir: Path) -> subprocess.Popen:
    """Run ``spec`` in a load-generator process of its own (its CPU time is then its own)."""
    spec_file = workdir / f"load-{spec.port}-{spec.concurrency}-{time.monotonic_ns()}.json"
    spec_file.write_text(json.dumps(asdict(spec)))
    return subprocess.Popen([sys.executable, "-m", "bench.loadgen", str(spec_file)], cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_load(proc: subprocess.Popen, spec: LoadSpec) -> dict[str, Any]:
    """The result of a ``start_load`` process; raises RuntimeError if it failed."""
    out, err = proc.communicate(timeout=spec.warmup_s + spec.measure_s + spec.drain_s + 2 * spec.timeout_s + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {err.decode()[-2000:]}")
    return json.loads(out)


# --------------------------------------------------------------------------- the client


class Records:
    """Per request: start and end (time.monotonic, comparable across processes on Linux), status
    (0: connection error or timeout), executed batch size (0: unknown) and version index."""

    def __init__(self) -> None:
        self.start: list[float] = []
        self.end: list[float] = []
        self.status: list[int] = []
        self.batch: list[int] = []
        self.version: list[int] = []
        self.versions: list[str] = []
        self._version_index: dict[str, int] = {}

    def add(self, start: float, end: float, status: int, batch: int, version: str) -> None:
        if version not in self._version_index:
            self._version_index[version] = len(self.versions)
            self.versions.append(version)
        self.start.append(start)
        self.end.append(end)
        self.status.append(status)
        self.batch.append(batch)
        self.version.append(self._version_index[version])

    def as_json(self) -> dict[str, Any]:
        return {"start": [round(t, 6) for t in self.start], "end": [round(t, 6) for t in self.end],
                "status": self.status, "batch": self.batch, "version": self.version, "versions": self.versions}


def encode_request(method: str, path: str, content_type: str, body: bytes) -> bytes:
    typed = f"Content-Type: {content_type}\r\n" if content_type else ""
    head = (f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n{typed}"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode("latin-1") + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response: status, the headers we read (lower-case names), body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        body = b""
    return status, headers, body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


class Load:
    """N closed-loop users against one endpoint until the window ends or the cap is reached."""

    def __init__(self, spec: LoadSpec, requests: list[bytes], stop_at: float) -> None:
        self.spec = spec
        self.requests = requests
        self.stop_at = stop_at  # no request starts after this; moved earlier by SIGUSR1
        self.records = Records()
        self.issued = 0
        self.errors: dict[str, int] = {}

    def _next(self, index: int) -> bytes | None:
        """A user's request number ``index``; None once the window has ended or the cap is reached."""
        if time.monotonic() >= self.stop_at or self.issued >= self.spec.max_requests:
            return None
        self.issued += 1
        return self.requests[index % len(self.requests)]

    async def run(self) -> None:
        if self.spec.protocol == "grpc":
            await self._grpc_users()
        else:
            await asyncio.gather(*(self._user(u) for u in range(self.spec.concurrency)))

    async def _grpc_users(self) -> None:
        import grpc  # noqa: PLC0415 - only gRPC runs need it

        # Each channel a connection of its own (a local subchannel pool): else gRPC shares one
        # connection among every channel to the same target, and one API-server process would get
        # every call.
        options = [("grpc.use_local_subchannel_pool", 1)]
        share = max(1, self.spec.users_per_channel)
        channels = [grpc.aio.insecure_channel(f"{HOST}:{self.spec.port}", options=options)
                    for _ in range(-(-self.spec.concurrency // share))]
        try:
            await asyncio.gather(*(self._grpc_user(u, channels[u // share]) for u in range(self.spec.concurrency)))
        finally:
            await asyncio.gather(*(channel.close() for channel in channels))

    async def _grpc_user(self, user: int, channel: Any) -> None:
        """As ``_user``, over a gRPC channel: the answer's status is the HTTP status of its gRPC code."""
        import grpc  # noqa: PLC0415 - only gRPC runs need it

        from service.protocols.grpc_v2.open_inference_pb2 import ModelInferResponse  # noqa: PLC0415

        index = user
        call = channel.unary_unary(self.spec.path)  # bytes in, bytes out: requests are serialized up front
        while (request := self._next(index)) is not None:
            index += 1
            started = time.monotonic()
            try:
                answer = ModelInferResponse.FromString(await call(request, timeout=self.spec.timeout_s))
            except grpc.aio.AioRpcError as exc:
                self.records.add(started, time.monotonic(), GRPC_STATUS.get(exc.code().name, 599), 0, "")
                if exc.code() == grpc.StatusCode.UNAVAILABLE and "overloaded" not in (exc.details() or ""):
                    self.errors[exc.code().name] = self.errors.get(exc.code().name, 0) + 1
                    await asyncio.sleep(0.05)  # no server: not a busy loop
                else:
                    await self._back_off(dict(exc.trailing_metadata() or ()).get("retry-after"))  # shed calls say when
                continue
            batch = answer.parameters["batch_size"].int64_param if "batch_size" in answer.parameters else 0
            self.records.add(started, time.monotonic(), 200, batch, answer.model_version)

    async def _user(self, user: int) -> None:
        index = user
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while (request := self._next(index)) is not None:
            index += 1
            started = time.monotonic()
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection(HOST, self.spec.port), self.spec.timeout_s)
                reader, writer = conn
                writer.write(request)
                status, headers, _ = await asyncio.wait_for(read_response(reader), self.spec.timeout_s)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                self.records.add(started, time.monotonic(), 0, 0, "")
                self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
                conn = _close(conn)
                await asyncio.sleep(0.05)  # a refused or dead server must not turn this into a busy loop
                continue
            batch = headers.get("x-batch-size", "0")
            self.records.add(started, time.monotonic(), status, int(batch) if batch.isdigit() else 0,
                             headers.get("x-model-version", ""))
            if headers.get("connection", "").lower() == "close":
                conn = _close(conn)
            if status == 503:
                await self._back_off(headers.get("retry-after"))
        _close(conn)

    async def _back_off(self, retry_after: str | None) -> None:
        """Wait as a refusal's ``Retry-After`` (seconds) says, at most ``RETRY_AFTER_CAP_S`` and not
        past the window's end; not at all without one (or with a date, which this server never sends)."""
        try:
            seconds = float(retry_after) if retry_after else 0.0
        except ValueError:
            seconds = 0.0
        seconds = min(seconds, RETRY_AFTER_CAP_S, self.stop_at - time.monotonic())
        if seconds > 0:
            await asyncio.sleep(seconds)


def _close(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
    if conn is not None:
        conn[1].close()
    return None


# --------------------------------------------------------------------------- the samplers


def process_cpu(sid: int) -> dict[int, dict[str, Any]]:
    """CPU seconds (user + system) and resident bytes of every live process in session ``sid``, with its role.

    Roles, for a LitServe server started in its own session: ``main`` (the session leader),
    ``worker`` (spawned by multiprocessing), ``queue`` (headswap's request queue, by its process
    name), ``manager`` (the first other fork: LitServe's queue manager), ``api`` (later forks:
    uvicorn API servers), ``other`` (resource tracker).
    """
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            comm, fields = stat[stat.find("(") + 1:stat.rfind(")")], stat.rsplit(")", 1)[1].split()
            if int(fields[3]) != sid:
                continue
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry.name)] = {"cpu_s": (int(fields[11]) + int(fields[12])) / CLK_TCK, "started": int(fields[19]),
                                  "rss_bytes": int(fields[21]) * PAGE, "cmdline": cmdline, "comm": comm}
    main = found.get(sid, {}).get("cmdline")
    forks = sorted((info["started"], pid) for pid, info in found.items()
                   if pid != sid and info["cmdline"] == main and info["comm"] != QUEUE_PROCESS)
    manager = forks[0][1] if len(forks) > 1 else None
    for pid, info in found.items():
        cmd, comm = info.pop("cmdline"), info.pop("comm")
        info["role"] = ("main" if pid == sid else "worker" if b"multiprocessing.spawn" in cmd
                        else "other" if b"resource_tracker" in cmd else "queue" if comm == QUEUE_PROCESS
                        else "manager" if pid == manager else "api" if cmd == main else "other")
    return found


def scrape(port: int, path: str, prefixes: tuple[str, ...] = SERIES) -> dict[str, float]:
    """The values of the Prometheus series whose names start with one of ``prefixes``."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            name, _, value = line.rpartition(" ")
            values[name] = values.get(name, 0.0) + float(value)
    return values


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all cores) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def sample(spec: LoadSpec) -> dict[str, Any]:
    """The server's CPU, its metrics, our own CPU and the machine's, now."""
    return {"t": time.monotonic(), "self_cpu_s": _cpu_self(), "machine_busy_s": machine_busy_s(),
            "server": process_cpu(spec.sid) if spec.sid else {},
            "metrics": scrape(spec.metrics_port or spec.port, spec.metrics_path) if spec.metrics_path else {}}


async def measure(spec: LoadSpec) -> dict[str, Any]:
    """Warm up, measure, stop; returns the raw records and the samples at the window's edges.

    SIGUSR1 ends the measured window early (the swap test stops the load once its swaps are done).
    """
    bodies = [Path(p).read_bytes() for p in spec.bodies] or [b""]
    requests = bodies if spec.protocol == "grpc" else [encode_request(spec.method, spec.path, spec.content_type, body)
                                                       for body in bodies]
    loop = asyncio.get_running_loop()
    began = time.monotonic()
    load = Load(spec, requests, stop_at=began + spec.warmup_s + spec.measure_s)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, stop.set)
    users = asyncio.ensure_future(load.run())
    stopped = asyncio.ensure_future(stop.wait())
    edges = []
    done, _ = await asyncio.wait([users, stopped], timeout=spec.warmup_s, return_when=asyncio.FIRST_COMPLETED)
    if not done:  # else the cap or a stop ended the run during the warm-up: nothing measured
        edges.append(await loop.run_in_executor(None, sample, spec))
        done, _ = await asyncio.wait([users, stopped], timeout=max(0.0, load.stop_at - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if users not in done:  # else the request cap ended it early: no closing edge
            load.stop_at = min(load.stop_at, time.monotonic())
            edges.append(await loop.run_in_executor(None, sample, spec))
    load.stop_at = min(load.stop_at, time.monotonic())
    stopped.cancel()
    await users
    return {"concurrency": spec.concurrency, "began": began, "window": [e["t"] for e in edges],
            "edges": edges, "records": load.records.as_json(), "errors": load.errors,
            "self_cpu_total_s": _cpu_self(), "loop": type(loop).__module__.split(".")[0]}


def yield_to_the_server() -> None:
    """Run as SCHED_BATCH (Linux): sharing the machine with the server, the generator's wakeups
    (each arrival, each answer) then do not preempt the server's processes mid-slice, as a client
    on another machine never would; it still gets its fair share of the CPU. Elsewhere, nothing."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass


def main(argv: list[str]) -> int:
    spec = LoadSpec(**json.loads(Path(argv[0]).read_text()))
    yield_to_the_server()  # first: the threads it starts later inherit it
    try:
        import uvloop  # noqa: PLC0415 - optional
        uvloop.install()
    except ImportError:
        pass
    if spec.rate > 0:
        from bench.openloop import measure_open  # noqa: PLC0415 - it imports this module

        result = asyncio.run(measure_open(spec))
    else:
        result = asyncio.run(measure(spec))
        for edge in result["edges"]:  # JSON keys must be strings
            edge["server"] = {str(pid): info for pid, info in edge["server"].items()}
    json.dump(result, sys.stdout)
    return 0


# --------------------------------------------------------------------------- the numbers


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def steady_rate(ends: list[float], t0: float, t1: float) -> float:
    """Answers per second over the window [t0, t1), given each answer's end time: the least-squares
    slope of the count of answers over the window (the count as a step function of time).

    A server that batches answers in bursts (a batch of 16 at once): counting the answers that end
    inside the window and dividing by its length moves by a whole batch with where the window's
    edges fall between bursts, 3.8% of a 10 s window at 42 requests/s, and a closed loop started
    at the same moment every time puts them in the same place every time, so the error does not
    even average out. The slope weighs each answer by ``6 (W²/4 - u²) / W³`` (u: its time from the
    window's centre, W: the window's length), a parabola that is zero at both edges: a burst near
    an edge counts for little, whichever side it falls, and the error falls with the square of
    the number of bursts instead of linearly. Its expectation is the rate for a steady stream;
    answers missing from part of the window lower it, as they should.
    """
    width = t1 - t0
    if width <= 0:
        return float("nan")
    middle = (t0 + t1) / 2
    return 6 / width**3 * sum(width * width / 4 - (end - middle) ** 2 for end in ends if t0 <= end < t1)


def cpu_by_role(first: dict[str, Any], last: dict[str, Any]) -> dict[str, float]:
    """CPU seconds spent between two ``process_cpu`` samples, summed per role."""
    roles: dict[str, float] = {}
    for pid, info in last.items():
        before = first.get(pid, {}).get("cpu_s", 0.0)
        roles[info["role"]] = roles.get(info["role"], 0.0) + info["cpu_s"] - before
    return roles


def summarize(result: dict[str, Any], ok_status: int = 200) -> dict[str, Any]:
    """The window's numbers: requests/s, latency percentiles (ms), failures, batch sizes, CPU."""
    rec = result["records"]
    if len(result["window"]) < 2:
        raise RuntimeError(f"load run ended before its window closed ({len(rec['start'])} requests): raise max_requests")
    t0, t1 = result["window"]
    inside = [i for i, end in enumerate(rec["end"]) if t0 <= end < t1]
    ok = [i for i in inside if rec["status"][i] == ok_status]
    latencies = [(rec["end"][i] - rec["start"][i]) * 1000 for i in ok]
    batches = [rec["batch"][i] for i in ok if rec["batch"][i] > 0]
    wall = t1 - t0
    first, last = result["edges"]
    server = cpu_by_role(first["server"], last["server"])
    metrics = {k: last["metrics"].get(k, 0.0) - first["metrics"].get(k, 0.0) for k in last["metrics"]}
    count = metrics.get("headswap_batch_size_count", 0.0)
    statuses: dict[str, int] = {}
    for i in inside:
        statuses[str(rec["status"][i])] = statuses.get(str(rec["status"][i]), 0) + 1
    return {
        "concurrency": result["concurrency"], "seconds": round(wall, 2), "requests": len(inside),
        "ok": len(ok), "failed": len(inside) - len(ok), "statuses": statuses,
        "rps": steady_rate([rec["end"][i] for i in ok], t0, t1), "rps_counted": len(ok) / wall,
        "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95), "p99_ms": percentile(latencies, 99),
        "mean_batch": metrics["headswap_batch_size_sum"] / count if count else None,
        "request_weighted_batch": sum(batches) / len(batches) if batches else None,
        "loadgen_cores": (last["self_cpu_s"] - first["self_cpu_s"]) / wall,
        "server_cores": sum(server.values()) / wall,
        "server_cores_by_role": {role: seconds / wall for role, seconds in sorted(server.items())},
        # busy cores of the whole machine minus server and load generator: other tenants, the orchestrator
        "other_cores": (last["machine_busy_s"] - first["machine_busy_s"] - sum(server.values())
                        - (last["self_cpu_s"] - first["self_cpu_s"])) / wall,
        "errors": result["errors"],
    }


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
