"""The Overload stage of ``make bench``: open-loop arrivals at multiples of the saturation rate.

Saturation is the best closed-loop requests/s the default server reached in the sweep. Each
point offers ``factor x saturation`` requests/s (Poisson, seeded: the same arrivals for every
server) for a short warm-up and a measured window (``bench.openloop``), waits for the answers,
then lets the server settle (nothing in flight, nothing queued) before the next point, so that
one point's backlog is never the next one's load. It runs once on the server with its defaults
(shedding on, ``--max-queue auto``) and once with ``--max-queue 0`` (unbounded), beside it.

A shared machine's speed drifts by 10% and more within minutes, so the sweep's best requests/s,
measured minutes earlier (and the best of several noisy windows), is a poor yardstick for one
point's goodput. Given a ``capacity`` probe (a closed-loop window at the saturation concurrency),
the points are measured between such windows (capacity, 1x, capacity, 2x, ...), and each point
keeps the two around it: its goodput is judged against the server's capacity of that minute.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.loadgen import LoadSpec, finish_load, scrape, start_load
from bench.openloop import IDLE_S, summarize_open


def has_max_queue(headswap: str) -> bool:
    """Whether this ``headswap serve`` takes ``--max-queue`` (load shedding)."""
    text = subprocess.run([headswap, "serve", "--help"], capture_output=True, text=True, timeout=120).stdout
    return "--max-queue" in text


def settle(port: int, limit_s: float) -> float:
    """Wait until the server has nothing in flight and nothing queued (per its /metrics), at most
    ``limit_s``; returns the seconds waited (``limit_s`` or more: it did not settle)."""
    began = time.monotonic()
    while time.monotonic() - began < limit_s:
        try:
            values = scrape(port, "/metrics", ("headswap_inflight_requests", "headswap_queue_depth"))
        except OSError:
            values = {"unreachable": 1.0}
        if not any(values.values()):
            break
        time.sleep(0.2)
    return time.monotonic() - began


def open_loop_points(port: int, sid: int, spec: LoadSpec, saturation: float, factors: tuple[float, ...],
                     warmup_s: float, measure_s: float, drain_s: float, label: str, work: Path,
                     say: Callable[[str], None], capacity: Callable[[], float] | None = None) -> list[dict[str, Any]]:
    """One open-loop point per factor against the server on ``port`` (session ``sid``); with
    ``capacity`` (closed-loop requests/s now), each point also gets ``capacity_around``: the
    capacity measured just before and just after it (the server settled first)."""
    points = []
    before = _capacity(port, drain_s, capacity, say) if capacity else None
    for i, factor in enumerate(factors):
        waited = settle(port, drain_s)
        time.sleep(IDLE_S)  # the server idle, as it will be at the point's last sample
        run = replace(spec, port=port, sid=sid, concurrency=0, rate=factor * saturation, seed=i + 1, warmup_s=warmup_s,
                      measure_s=measure_s, drain_s=drain_s, watch_s=1.0, metrics_path="/metrics")
        point = {"factor": factor, "settle_s": round(waited, 2), **summarize_open(finish_load(start_load(run, work), run))}
        points.append(point)
        other = {s: n for s, n in point["statuses"].items() if s not in ("200", "503")}
        say(f"  {label} {factor:g}x ({point['offered_rps']:.1f} req/s offered): goodput {point['goodput_rps']:.1f}/s  "
            f"p50/p99 {point['p50_ms']:.0f}/{point['p99_ms']:.0f} ms  503s {point['rejected_503']} "
            f"(p99 {point['p99_503_ms']:.1f} ms)  other {other or 0}  lag p99 {point['lag_p99_ms']:.1f} ms  "
            f"server RSS {sum(point['rss']['before'].values()) / 2**20:.0f} -> {sum(point['rss']['close'].values()) / 2**20:.0f} MiB")
        if capacity:
            after = _capacity(port, drain_s, capacity, say)
            point["capacity_around"] = [before, after]
            before = after
    return points


def _capacity(port: int, drain_s: float, capacity: Callable[[], float], say: Callable[[str], None]) -> float:
    settle(port, drain_s)
    rps = capacity()
    say(f"  capacity now (closed loop): {rps:.1f} req/s")
    return rps
