"""The inference worker: a thin LitAPI over ``Engine`` and the loop that owns its control points.

LitServe's own batched loop fails a whole batch when one item raises and offers no place to
act between batches. ``InferenceLoop`` replaces it: it collects a batch (draining what is
queued, then waiting at most ``batch_timeout`` for more), gives every item its own answer,
and calls ``ClassifierAPI.between_batches`` before each batch, the one place where a worker
may change the weights it serves (hot swaps, canaries).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, LoopResponseType

from models.device import resolve_device
from service.control.memory import freeze_survivors, release_freed_memory
from service.control.slots import SharedState
from service.errors import GatewayTimeout, InternalError, Overloaded, RequestError
from service.inference.admission import QueueLedger
from service.inference.answers import AnswerSender
from service.inference.engine import Answer, Engine, Item, resolve_precision
from service.inference.follower import SlotFollower
from service.observability.metrics import Metrics, model_label

log = logging.getLogger("headswap.worker")
IDLE_POLL_S = 0.05  # how often an idle worker passes its control point
TRIM_IDLE_S = 1.0  # a worker idle this long since its last batch gives its free heap pages back (HeapTrim)
TURN_POLL_S = 0.001  # how often a worker looks for work it may take while every worker below it is busy ...
TURN_POLL_IDLE_S = 0.005  # ... and while one is idle, which takes new work first (LowestIdleFirst) ...
TURN_GET_S = 0.005  # ... how long it then waits on the queue for that work ...
TURN_STALL_S = 0.02  # ... and how long queued work may go untaken before it takes it whatever the others say


@dataclass(frozen=True)
class WorkerConfig:
    state_dir: str
    device: str
    precision: str
    threads: int
    max_batch_size: int
    batch_timeout_s: float
    timeout_s: float
    log_level: str = "info"
    decode_on_worker: bool = False
    solo_threads: int = 0  # intra-op threads for a batch that runs alone (no other worker busy, nothing queued); 0: threads
    max_queue_wait_s: float = 0.0  # 0: no limit but each item's deadline
    metrics_max_models: int = 100
    memory_budget_bytes: int = 0  # resident backbones and heads at most (0: no bound)
    nice: int = 0  # niceness the worker adds to its own at setup (--worker-nice)
    answers: str = ""  # the API servers' answer sockets (service.inference.answers); "": LitServe's queues only


class ClassifierAPI(ls.LitAPI):
    """LitAPI hooks, each one call into ``Engine``; the logic lives where it can be unit-tested."""

    def __init__(self, config: WorkerConfig, ledger: QueueLedger | None = None) -> None:
        super().__init__(max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout_s,
                         api_path="/predict", loop=InferenceLoop())
        self.config = config
        self.ledger = ledger
        self.index = 0
        self._threads = config.threads
        self.engine: Engine | None = None
        self.follower: SlotFollower | None = None
        self.metrics: Metrics | None = None

    def setup(self, device: str) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process orchestrates shutdown
        logging.basicConfig(level=self.config.log_level.upper(), format="%(message)s")  # a spawned process
        torch.set_num_threads(self.config.threads)
        freeze_survivors()  # the imports, before the model: no 250 ms full collections between batches
        if self.config.nice:
            lower_priority(self.config.nice)  # the API servers first where they share cores (--worker-nice)
        self.index = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        if self.ledger is not None:  # a restarted worker: its predecessor may have died mid-batch or idle
            self.ledger.set_busy(self.index, False)
            self.ledger.set_idle(self.index, False)  # until the model is loaded (end of setup)
        torch_device = resolve_device(self.config.device)
        self.engine = Engine(torch_device, resolve_precision(self.config.precision, torch_device),
                             budget_bytes=self.config.memory_budget_bytes)
        worker_id = os.environ.get("LITSERVE_WORKER_ID", str(os.getpid()))
        self.follower = SlotFollower(self.engine, SharedState(Path(self.config.state_dir)), worker_id)
        self.engine.reload = self.follower.reload
        self.metrics = Metrics(self.config.max_batch_size)
        self.follower.catch_up()
        self.count_residency()
        if self.config.decode_on_worker:
            self.engine.warm_up_decoder()
        served = ", ".join(f"{model} {loaded.version} ({loaded.meta.arch})" for (model, slot), loaded in self.engine.slots.items()
                           if slot == "stable")
        log.info("worker %s (pid %d) ready: device %s, precision %s, %d threads, model %s", worker_id, os.getpid(),
                 torch_device, self.engine.precision, self.config.threads, served)
        if self.ledger is not None:
            self.ledger.set_idle(self.index, True)  # ready: first in line if it is the lowest (LowestIdleFirst)

    def between_batches(self) -> None:
        """Control point: runs in the worker before every batch and every idle poll."""
        assert self.follower is not None
        self.follower.poll()

    def took(self, count: int, refusals: list[str]) -> None:
        """``count`` items left the queue, the ``refusals`` (their reasons) without running."""
        if self.ledger is not None:
            self.ledger.take(count)
        if self.metrics is not None:
            for reason in refusals:
                self.metrics.rejected.labels(reason).inc()

    def begin_batch(self) -> None:
        """Intra-op threads for the coming batch: every core when it runs alone (no other worker busy,
        nothing else queued: a lone client), else this worker's share, so that busy workers never
        oversubscribe the cores."""
        if self.ledger is None:
            return
        others = self.ledger.begin_batch(self.index)
        solo = self.config.solo_threads if others == 0 and self.ledger.depth() == 0 else 0
        threads = solo or self.config.threads
        if threads != self._threads:
            torch.set_num_threads(threads)
            self._threads = threads

    def end_batch(self) -> None:
        """The batch ran: not busy, and idle before its answers go out, so that a client's next request,
        sent as soon as it has its answer, finds this worker first in line (LowestIdleFirst)."""
        if self.ledger is not None:
            self.ledger.set_busy(self.index, False)
            self.ledger.set_idle(self.index, True)

    def observe(self, batch_size: int) -> None:
        """Per-batch metrics, counted once in the worker that ran the batch."""
        if self.metrics is None or self.engine is None:
            return
        self.metrics.batch_size.observe(batch_size)
        if self.engine.decoded:
            self.metrics.worker_decodes.inc(self.engine.decoded)
        if self.engine.device.type == "cuda":
            self.metrics.gpu_memory.set(torch.cuda.memory_allocated(self.engine.device))
        for (model, slot), seconds in self.engine.timings.items():
            self.metrics.inference.labels(model_label(model, self.engine.names, self.config.metrics_max_models), slot).observe(seconds)
        for one in self.engine.passes:
            self.metrics.backbone_passes.labels(one.backbone_version).inc()
            self.metrics.images_per_backbone_pass.observe(one.images)
        self.count_residency()

    def count_residency(self) -> None:
        """Loads and evictions since the last call, resident bytes; a changed residency is reported."""
        assert self.engine is not None and self.follower is not None and self.metrics is not None
        events = [self.engine.events.popleft() for _ in range(len(self.engine.events))]
        if not events:
            return
        models = {loaded.version: model for (model, _), loaded in reversed(list(self.engine.slots.items()))}
        for kind, version, reason in events:
            model = model_label(models.get(version, ""), self.engine.names, self.config.metrics_max_models)
            if kind == "load":
                self.metrics.model_loads.labels(model, reason).inc()
            else:
                self.metrics.model_evictions.labels(model).inc()
        for kind, size in self.engine.resident_bytes().items():
            self.metrics.resident_bytes.labels(kind).set(size)
        if any(kind == "evict" or reason == "cold" for kind, _, reason in events):
            self.follower.report_residency()

    def decode_request(self, request: dict[str, Any]) -> Item:
        if "jpeg" in request:  # --decode-on worker: Engine decodes the batch's JPEGs on its device
            return Item(request["slot"], None, top_k=request.get("top_k", 5), jpeg=bytes(request["jpeg"]),
                        model=request.get("model", ""), shadow=request.get("shadow", False))
        shape = tuple(request["shape"])
        dtype = np.float32 if request["dtype"] == "float32" else np.uint8
        array = np.frombuffer(request["data"], dtype=dtype).reshape(shape)
        return Item(request["slot"], torch.from_numpy(array.copy()), dtype == np.float32, request.get("top_k", 5),
                    model=request.get("model", ""), shadow=request.get("shadow", False))

    def batch(self, inputs: list[Item]) -> list[Item]:
        return inputs  # mixed-slot batches are grouped inside Engine.run

    def predict(self, x: list[Item]) -> list[Answer | RequestError]:
        assert self.engine is not None
        return self.engine.run(x)

    def unbatch(self, output: list[Answer | RequestError]) -> list[Answer | RequestError]:
        return output

    def encode_response(self, output: Answer | RequestError) -> dict[str, Any]:
        if isinstance(output, RequestError):
            return failure(output)
        return {"probabilities": output.probabilities.tobytes(), "top": output.top,
                "version": output.version, "slot": output.slot, "shadow": output.shadow}


def lower_priority(by: int) -> None:
    """Add ``by`` to the niceness of every thread of this process. Linux keeps one per thread (threads
    started later inherit their starter's), so each thread already running is changed on its own."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        os.nice(by)
        return
    for task in tasks.iterdir():
        tid = int(task.name)
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
        except ProcessLookupError:
            pass  # that thread ended meanwhile


def failure(exc: RequestError) -> dict[str, Any]:
    """An item's answer when it fails: the error by type name (the API server raises the same type)."""
    return {"error": str(exc), "type": type(exc).__name__, "reason": exc.reason}


def _more_coming(entry: Any) -> bool:
    """Whether the API server that queued ``entry`` had more images on their way (unknown: yes)."""
    payload = entry[3]
    return not isinstance(payload, dict) or payload.get("arriving", 1) > 0


def _refusal(arrived: float, payload: Any, now: float, config: WorkerConfig) -> dict[str, Any] | None:
    """The answer for a queued item that must not run (its deadline passed, or it waited past
    --max-queue-wait-ms), else None. Times are time.monotonic, which is one clock for every process."""
    deadline = payload.get("deadline") if isinstance(payload, dict) else None
    if now > (deadline if deadline is not None else arrived + config.timeout_s):
        return failure(GatewayTimeout(f"deadline passed after {now - arrived:.3f} s waiting for a worker; not run",
                                      reason="deadline"))
    if config.max_queue_wait_s and now - arrived > config.max_queue_wait_s:
        return failure(Overloaded(f"overloaded: waited {(now - arrived) * 1000:.0f} ms for a worker, over "
                                  f"--max-queue-wait-ms {config.max_queue_wait_s * 1000:g}; not run", retry_after=1))
    return None


class HeapTrim:
    """Gives the heap's free pages back to the system once per idle spell of ``after_s``.

    A batch's activations are freed to glibc's heap, which keeps them resident for the next
    batch (service.control.memory); after a burst of full batches that is 70-110 MiB per
    resnet18 worker, held while the worker idles. Trimming costs 2-4 ms and the next batch's
    page faults (measured on 2 cores: batch 1 +0.5 ms, batch 16 +12 ms), so it waits for a
    spell of idleness: never under steady load, at most once per second of a trickle.
    """

    def __init__(self, after_s: float = TRIM_IDLE_S, trim: Callable[[], object] = release_freed_memory) -> None:
        self.after_s = after_s
        self.trim = trim
        self.last_batch: float | None = None  # None: nothing ran since the last trim

    def ran(self, now: float) -> None:
        self.last_batch = now

    def idle(self, now: float) -> None:
        if self.last_batch is not None and now - self.last_batch >= self.after_s:
            self.last_batch = None
            self.trim()


class LowestIdleFirst:
    """Which idle worker takes the next item: the lowest-indexed one.

    The workers share one request queue, which hands an item to the worker that has waited on it
    longest: a lone client's requests went round the workers in turn, and each forward pass found
    its weights out of the cache (on 2 cores, resnet18 forward passes alternating between two
    processes took 2.5-3.5 ms longer than in one; served, a lone client's p50 was 1.5 ms longer).
    Here a worker goes to the queue only for work the idle workers of lower index will not take:
    more images on the queue (``QueueLedger.queued``) than a full batch for each of them. A lone
    client's requests all go to worker 0; under load every worker is busy and takes what comes, as
    before. A lower worker that says it is idle but does not take (it died) holds nothing up for
    longer than ``stall_s``.
    """

    def __init__(self, ledger: QueueLedger, index: int, batch: int, *, poll_s: float = TURN_POLL_S,
                 poll_idle_s: float = TURN_POLL_IDLE_S, stall_s: float = TURN_STALL_S,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.ledger = ledger
        self.index = index
        self.batch = batch
        self.poll_s = poll_s
        self.poll_idle_s = poll_idle_s
        self.stall_s = stall_s
        self.clock = clock
        self.sleep = sleep

    def turn(self, wait_s: float) -> bool:
        """Wait up to ``wait_s`` until this worker should go to the queue; False: not in that time."""
        until = self.clock() + wait_s
        queued_since, taken = None, self.ledger.taken()
        while True:
            now, queued, idle = self.clock(), self.ledger.queued(), self.ledger.idle_below(self.index)
            if queued == 0:
                queued_since = None
            elif queued > self.batch * idle:
                return True
            elif queued_since is None or self.ledger.taken() != taken:
                queued_since, taken = now, self.ledger.taken()
            elif now - queued_since >= self.stall_s:
                return True
            if now >= until:
                return False
            self.sleep(self.poll_idle_s if idle else self.poll_s)  # an idle server's spare workers barely wake


class InferenceLoop(BatchedLoop):
    answers: AnswerSender | None = None  # set in the worker (run_batched_loop)
    heap: HeapTrim | None = None  # set in the worker (run_batched_loop)

    def get_batch_requests(self, lit_api: ls.LitAPI, request_queue: Any, transport: Any) -> tuple[list, list]:
        """From ``request_queue`` (a ``service.inference.request_queue.RequestQueue``), up to a full
        batch: block briefly for a first request and take what is queued with it, then what came
        meanwhile, then wait up to batch_timeout while more images are on their way (the newest
        item's ``arriving`` hint, see service.inference.dispatch). Of the idle workers, the
        lowest-indexed takes the next item (``LowestIdleFirst``)."""
        ledger, index, wait_s = lit_api.ledger, lit_api.index, IDLE_POLL_S
        if ledger is not None and index > 0:
            if not LowestIdleFirst(ledger, index, lit_api.max_batch_size).turn(IDLE_POLL_S):
                return [], []
            wait_s = TURN_GET_S
        entries = request_queue.take(lit_api.max_batch_size, wait_s)  # what is queued, in one call
        if not entries:
            return [], []
        if ledger is not None:
            ledger.set_idle(index, False)
        if len(entries) < lit_api.max_batch_size:  # and what came while that answer reached this worker
            entries += request_queue.take(lit_api.max_batch_size - len(entries), 0.0)
        deadline = time.monotonic() + lit_api.batch_timeout
        while len(entries) < lit_api.max_batch_size and _more_coming(entries[-1]):
            remaining = deadline - time.monotonic()
            more = request_queue.take(lit_api.max_batch_size - len(entries), remaining) if remaining > 0 else []
            if not more:
                break
            entries += more
        now, ready, refused = time.monotonic(), [], []
        for response_queue_id, uid, arrived, payload in entries:
            refusal = _refusal(arrived, payload, now, lit_api.config)
            if refusal is None:
                ready.append((response_queue_id, uid, payload))
            else:
                refused.append((response_queue_id, uid, refusal))
        lit_api.took(len(entries), [r["reason"] for _, _, r in refused])
        return ready, refused

    def run_batched_loop(self, lit_api: ClassifierAPI, request_queue: Any, transport: Any,  # type: ignore[override]
                         callback_runner: Any, lit_spec: Any = None) -> None:
        self.answers = AnswerSender(lit_api.config.answers) if lit_api.config.answers else None
        self.heap = self.heap or HeapTrim()
        while True:
            lit_api.between_batches()
            batch, refused = self.get_batch_requests(lit_api, request_queue, transport)
            if refused and not batch:
                lit_api.end_batch()  # nothing to run: idle again before the refusals go out
            for response_queue_id, uid, refusal in refused:
                self._send(transport, response_queue_id, uid, refusal)
            if batch:
                started = time.monotonic()
                lit_api.begin_batch()
                try:
                    responses = self._answer(lit_api, [p for _, _, p in batch])
                finally:
                    lit_api.end_batch()
                try:  # before the answers: a client that has one sees it counted
                    lit_api.observe(len(batch))
                except Exception:  # metrics must never cost answers
                    log.exception("recording batch metrics failed")
                for (response_queue_id, uid, _), response in zip(batch, responses):
                    response.update(batch_size=len(batch), started=started, finished=time.monotonic())
                    self._send(transport, response_queue_id, uid, response)
                self.heap.ran(time.monotonic())
            elif not refused:
                self.heap.idle(time.monotonic())

    @staticmethod
    def _answer(lit_api: ClassifierAPI, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        items: list[Item | None] = []
        for payload in payloads:
            try:
                items.append(lit_api.decode_request(payload))
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("malformed queue payload: %s", exc)
                items.append(None)
        runnable = [item for item in items if item is not None]
        try:
            answers = iter(lit_api.unbatch(lit_api.predict(lit_api.batch(runnable))) if runnable else [])
        except Exception:  # a failing forward pass answers 500 for its batch; the worker lives on
            log.exception("inference failed for a batch of %d", len(runnable))
            return [failure(InternalError("inference failed", reason="inference")) for _ in payloads]
        return [lit_api.encode_response(next(answers)) if item is not None
                else failure(InternalError("malformed internal request", reason="internal")) for item in items]

    def _send(self, transport: Any, response_queue_id: int, uid: str, response: dict[str, Any]) -> None:
        """Straight to the API server's answer socket where it can, else through LitServe's queue."""
        if self.answers is not None and self.answers.send(response_queue_id, uid, response):
            return
        self.put_response(transport, response_queue_id, uid, response, LitAPIStatus.OK, LoopResponseType.REGULAR)
