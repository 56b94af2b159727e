"""Prometheus metrics, exact across every process of a server.

prometheus_client's multiprocess mode: each process (forked API servers, spawned workers,
the main process) writes its own files under ``PROMETHEUS_MULTIPROC_DIR``; a scrape sums
them. Counters of a worker that died stay counted (its files remain), so a restart neither
loses nor double-counts. What describes the present rather than a history -- which version
each slot serves, the canary weight, each process's memory -- is read from the shared state
at scrape time instead of being stored in gauges that could go stale.

Nothing is registered on the global registry: ``Metrics`` owns a private one (a namespace),
and ``exposition`` builds a fresh registry per scrape.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = tuple(float(2**i) for i in range(9))  # 1, 2, 4, ... 256


def pass_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Images per backbone pass: the powers of two up to the largest batch, and the largest batch."""
    powers = [float(2**i) for i in range(max_batch_size.bit_length()) if 2**i <= max_batch_size]
    return tuple(sorted({*powers, float(max_batch_size)}))


OTHER_MODELS = "other"  # the model label of the served models beyond --metrics-max-models
NO_MODEL = "none"  # the model label of a request that named no served model


def model_label(name: str, names: Sequence[str], cap: int) -> str:
    """The ``model`` label of served model ``name``: its name when it is among the first ``cap`` of
    ``names`` (the served models, the default first: the same order in every process), else "other"."""
    return name if name in names[:cap] else OTHER_MODELS


class Metrics:
    """Every metric of one process. ``max_batch_size`` sizes the images-per-backbone-pass buckets: the same
    in every process of a server."""

    def __init__(self, max_batch_size: int = 256) -> None:
        r = CollectorRegistry()
        self.requests = Counter("headswap_requests_total", "Finished inference requests", ["endpoint", "status", "slot", "model"],
                                registry=r)
        self.request_duration = Histogram("headswap_request_duration_seconds", "Arrival to response, errors included",
                                          ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("headswap_queue_wait_seconds", "Arrival to the start of the batch that served it",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("headswap_inference_duration_seconds", "Forward pass per batch and served version",
                                   ["model", "slot"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("headswap_batch_size", "Images per executed batch", buckets=BATCH_BUCKETS, registry=r)
        self.worker_decodes = Counter("headswap_worker_decoded_images_total",
                                      "JPEGs decoded by the inference workers on their device (--decode-on worker)", registry=r)
        self.inflight = Gauge("headswap_inflight_requests", "Accepted and not yet answered (autoscaling signal)",
                              multiprocess_mode="livesum", registry=r)
        self.swaps = Counter("headswap_swaps_total", "Hot-swaps by outcome", ["slot", "result"], registry=r)
        self.swap_duration = Histogram("headswap_swap_duration_seconds", "Admin call to all workers switched",
                                       buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        self.shadow_comparisons = Counter("headswap_shadow_comparisons_total", "Canary vs stable top-1 comparisons", registry=r)
        self.shadow_agreements = Counter("headswap_shadow_agreements_total", "Canary and stable agreed on top-1", registry=r)
        self.rollbacks = Counter("headswap_rollbacks_total", "Canary/stable rollbacks", ["reason"], registry=r)
        self.rejected = Counter("headswap_rejected_total", "Images shed without running: overload (over --max-queue or "
                                "--max-queue-wait-ms) or deadline (passed before a worker took them)", ["reason"], registry=r)
        self.input_errors = Counter("headswap_input_errors_total", "Rejected inputs by cause", ["reason"], registry=r)
        self.rollout_errors = Counter("headswap_rollout_errors_total", "Rollout specs refused", registry=r)
        self.backbone_passes = Counter("headswap_backbone_passes_total", "Backbone forward passes, by backbone version "
                                       "(the content hash of the tensors outside the head)", ["backbone"], registry=r)
        self.images_per_backbone_pass = Histogram("headswap_images_per_backbone_pass", "Images sharing one backbone pass, "
                                                  "across models", buckets=pass_buckets(max_batch_size), registry=r)
        self.model_loads = Counter("headswap_model_loads_total", "Versions built in a worker: at start, after an admin "
                                   "change, or cold (again, after an eviction)", ["model", "reason"], registry=r)
        self.model_evictions = Counter("headswap_model_evictions_total", "Versions evicted from a worker over "
                                       "--memory-budget-mb", ["model"], registry=r)
        self.resident_bytes = Gauge("headswap_resident_bytes", "Bytes of resident backbone and head tensors, summed "
                                    "over workers", ["kind"], multiprocess_mode="livesum", registry=r)
        self.gpu_memory = Gauge("headswap_gpu_memory_allocated_bytes", "CUDA memory held by tensors, per worker",
                                multiprocess_mode="liveall", registry=r)


class StateCollector(Collector):
    """Scrape-time view of what is served: model_info, canary weight, shadow share, queue depth, memory.

    ``read_state`` returns the serving state (its ``models``, each with ``slots()``, ``weight``,
    ``shadow``, ``canary``; its ``generation``); ``queue_depth`` the images waiting and ``admitted`` the
    images admitted and not yet answered (None: no gauge); ``worker_pids`` the inference workers' process ids."""

    def __init__(self, read_state: Callable[[], Any], main_pid: int, *, queue_depth: Callable[[], int] | None = None,
                 admitted: Callable[[], int] | None = None, worker_pids: Callable[[], Iterable[int]] = tuple) -> None:
        self.read_state = read_state
        self.main_pid = main_pid
        self.queue_depth = queue_depth
        self.admitted = admitted
        self.worker_pids = worker_pids

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self.read_state()
        info = GaugeMetricFamily("headswap_model_info", "What each model's slot serves (=1)",
                                 labels=["model", "slot", "version", "arch", "num_classes"])
        weight = GaugeMetricFamily("headswap_canary_weight", "Share of a model's requests sent to its canary, percent",
                                   labels=["model"])
        shadow = GaugeMetricFamily("headswap_shadow_percent", "Share of a model's stable requests shadowed on its "
                                   "canary, percent", labels=["model"])
        for name, model in state.models.items():
            for slot, spec in model.slots().items():
                info.add_metric([name, slot, spec.version, str(spec.meta["arch"]), str(spec.meta["num_classes"])], 1)
            weight.add_metric([name], model.weight if model.canary else 0)
            shadow.add_metric([name], model.shadow if model.canary else 0)
        yield from (info, weight, shadow)
        yield GaugeMetricFamily("headswap_state_generation", "Generation of the served state", value=state.generation)
        if self.queue_depth is not None:
            yield GaugeMetricFamily("headswap_queue_depth", "Images admitted and waiting for a worker, whole server",
                                    value=self.queue_depth())
        if self.admitted is not None:
            yield GaugeMetricFamily("headswap_admitted_images", "Images admitted and not yet answered (waiting, being "
                                    "decoded or run), whole server: what --max-queue auto bounds", value=self.admitted())
        memory = GaugeMetricFamily("headswap_process_resident_memory_bytes", "Resident memory per process", labels=["role", "pid"])
        pids = {"main": [self.main_pid], "api": [os.getpid()], "worker": list(self.worker_pids())}
        for role, role_pids in pids.items():
            for pid in role_pids:
                rss = _rss(pid)
                if rss is not None:
                    memory.add_metric([role, str(pid)], rss)
        yield memory


def _rss(pid: int) -> int | None:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def exposition(collector: StateCollector) -> bytes:
    """The Prometheus text exposition: every process's files, plus the state collector."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(collector)
    return generate_latest(registry)
