"""BENCHMARKS.md from the results of ``bench.run``: the tables, the targets and their verdicts.

Pure functions of the results dictionary (``bench/results.json``), so a report can be
re-rendered without measuring anything (``python -m bench.run --from-json``).
"""

from __future__ import annotations

from typing import Any

RSS_SLACK_MIB = 16.0  # allocator noise: the soak (docs/soak.md) saw every process within 9.4 MiB over 20,000 requests


def _best(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(points, key=lambda p: p["rps"]) if points else None


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the issue with what was measured, all on the server with its defaults;
    ``met`` is None where it cannot be judged, ``applies`` is False for the other device's
    targets (shown for information)."""
    cuda = r["device"] == "cuda"
    hs = r["headswap"]["points"]
    best = _best(hs)
    bare = r["bare"]["best"]["images_per_s"]
    ref_points = r.get("reference", {}).get("points", [])
    ref = _best(ref_points)
    top = hs[-1]
    who = "headswap (defaults)" if "flags" in r["settings"] else "headswap"
    out = [
        _ratio(f"{who} req/s ≥ 0.85 × bare model's best images/s", best["rps"], bare, 0.85, not cuda,
               f"{best['rps']:.1f} req/s (c={best['concurrency']}) vs {bare:.1f} images/s"),
        _ratio(f"{who} req/s ≥ 1.3 × plain LitServe reference", best["rps"], ref["rps"] if ref else None, 1.3,
               not cuda, f"{best['rps']:.1f} vs {ref['rps']:.1f} req/s (c={ref['concurrency']})" if ref else "reference not run"),
        _ratio(f"mean executed batch ≥ 75% of max batch ({r['settings']['max_batch_size']}) at saturation",
               top["mean_batch"] or 0.0, r["settings"]["max_batch_size"], 0.75, not cuda,
               f"{(top['mean_batch'] or 0):.2f} at c={top['concurrency']}"),
    ]
    out += _lone_targets(r, hs, ref_points)
    nothing = r["stack"]["do_nothing"]["rps"]
    ceiling = min(bare, r["decode"]["capacity"]["images_per_s"], nothing)
    out.append(_ratio("GPU: end to end ≥ 0.70 × min(bare, decode capacity, do-nothing endpoint)", best["rps"], ceiling, 0.70, cuda,
                      f"{best['rps']:.1f} vs min({bare:.1f}, {r['decode']['capacity']['images_per_s']:.1f}, {nothing:.1f})"))
    one = next((v for v in r.get("variants", []) if v["max_batch_size"] == 1), None)
    same = next((p for p in hs if one and p["concurrency"] == one["points"][0]["concurrency"]), None)
    out.append(_ratio("GPU: batching ≥ 3 × req/s of max batch size 1", same["rps"] if same else 0.0,
                      one["points"][0]["rps"] if one else None, 3.0, cuda,
                      f"{same['rps']:.1f} vs {one['points'][0]['rps']:.1f} req/s at c={same['concurrency']}" if one and same else "not run"))
    sw = r["swap"]
    out.append({"name": "swap: 0 failed requests", "applies": True, "required": "0", "measured": str(sw["failed"]),
                "ratio": None, "met": sw["failed"] == 0 and all(s["status"] == 200 for s in sw["swaps"])})
    out.append(_ratio("swap: p99 around a swap ≤ 2 × steady p99", sw["p99_near_ms"], sw["p99_steady_ms"], 2.0, True,
                      f"{sw['p99_near_ms']:.1f} vs {sw['p99_steady_ms']:.1f} ms", at_most=True))
    if r.get("overload"):
        out += overload_targets(r["overload"])
    if r.get("grpc"):
        g = r["grpc"]
        grpc_rps, http_rps = (sum(p["rps"] for p in g[k]) / len(g[k]) for k in ("grpc", "http"))
        out.append(_ratio(f"gRPC req/s ≥ 1.0 × HTTP raw bodies at the same concurrency ({g['grpc'][0]['concurrency']}), "
                          "mean of its windows", grpc_rps, http_rps, 1.0, True,
                          f"{grpc_rps:.1f} vs {http_rps:.1f} req/s"))
    return out


def _lone_targets(r: dict[str, Any], hs: list[dict[str, Any]], ref_points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The two concurrency-1 targets: from the alternating windows of the lone-client stage where the
    run has one, else (older results) from the sweep's c=1 point and the reference stage's."""
    lone = r.get("lone")
    decode = r["decode"]["one_thread"]["ms_per_image"]
    peers = "plain LitServe"
    if lone:
        c1, forward = lone["p50_ms"]["headswap"], lone["bare_ms"]
        measured = {PEER_NAMES[k]: v for k, v in lone["p50_ms"].items() if k != "headswap"}
        peers, ref1 = min(measured.items(), key=lambda kv: kv[1])
        rounds = sum(1 for w in lone["windows"] if w["system"] == "headswap")
        others = "".join(f"; {name} {p50:.1f} ms" for name, p50 in measured.items() if name != peers)
        skipped = f"; TorchServe not run: {lone['torchserve_skipped']}" if lone.get("torchserve_skipped") else ""
        peer = (f"{c1:.1f} vs {ref1:.1f} ms, the mean p50 of {rounds} alternating window{'s' if rounds != 1 else ''} each "
                f"(Lone client{others}{skipped})")
        where = f"; the forward measured before each window: mean {forward:.1f} ms" + (
            f" back to back, {lone['paced_ms']:.1f} ms paced as a lone client (Lone client)" if "paced_ms" in lone else "")
    else:
        point = next((p for p in hs if p["concurrency"] == 1), None)
        ref_point = next((p for p in ref_points if p["concurrency"] == 1), None)
        c1 = point["p50_ms"] if point else None
        ref1 = ref_point["p50_ms"] if ref_point else None
        around = r["headswap"].get("bare_batch1_around_ms") or []
        forward = sum(around) / len(around) if around else r["bare"]["batch1_ms"]
        peer = f"{c1:.1f} vs {ref1:.1f} ms" if c1 is not None and ref1 is not None else "not run"
        where = (f"; the forward measured just before and after the c=1 window: {around[0]:.1f}, {around[1]:.1f} ms "
                 f"(the ceilings table's, minutes apart: {r['bare']['batch1_ms']:.1f} ms)" if around else "")
    budget = forward + decode + 5
    return [
        _ratio(f"p50 at concurrency 1 ≤ 1.0 × the fastest peer's ({peers}) p50 at concurrency 1",
               c1 if c1 is not None else float("nan"), ref1, 1.0, True, peer, at_most=True),
        {"name": f"p50 at concurrency 1 ≤ bare batch-1 forward ({r['bare']['threads']} threads) + decode + 5 ms",
         "applies": r["device"] != "cuda", "required": f"≤ {budget:.1f} ms ({forward:.1f} + {decode:.1f} + 5)",
         "measured": f"{c1:.1f} ms{where}" if c1 is not None else "not run", "ratio": c1 / budget if c1 is not None else None,
         "met": (c1 <= budget) if c1 is not None else None},
    ]


def _ratio(name: str, measured: float, reference: float | None, bound: float, applies: bool, detail: str,
           at_most: bool = False) -> dict[str, Any]:
    ratio = measured / reference if reference else None
    met = None if ratio is None or ratio != ratio else (ratio <= bound if at_most else ratio >= bound)
    return {"name": name, "applies": applies, "required": f"{'≤' if at_most else '≥'} {bound:g}×",
            "measured": detail, "ratio": ratio, "met": met}


def _f(value: Any, digits: int = 1) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def _row(system: str, p: dict[str, Any]) -> str:
    batch = _f(p.get("mean_batch"), 2)
    return (f"| {system} | {p['concurrency']} | {_f(p['rps'])} | {_f(p['p50_ms'])} | {_f(p['p95_ms'])} | {_f(p['p99_ms'])} "
            f"| {batch} | {p['failed']} | {_f(p['server_cores'], 2)} | {_f(p['loadgen_cores'], 2)} | {_f(p.get('other_cores'), 2)} |")


def render(r: dict[str, Any], figure: str) -> str:
    """BENCHMARKS.md from the results."""
    m, s, bare, dec = r["machine"], r["settings"], r["bare"], r["decode"]
    lines = [
        "# headswap benchmarks", "",
        "Generated by `make bench` (`.venv/bin/python -m bench.run`); do not edit by hand. `make bench-quick` "
        "(`--quick`, about 5 minutes) checks the benchmark itself; `--device cuda` measures resnet50 bf16 on a GPU; "
        "`python -m bench.run --from-json bench/results.json` re-renders this page and the plot from the raw results.", "",
        f"**Run:** {r['date']}, {r['mode']} mode, {r['elapsed_s'] / 60:.1f} min.", "",
        "## Machine", "",
        "| | |", "|---|---|",
        f"| CPU | {m['cpu']}, {m['cores']} cores |", f"| Memory | {m['memory_mib'] / 1024:.1f} GiB |",
        f"| GPU | {m['gpu'] or 'none'} |",
        f"| Software | Linux {m['kernel']}, Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, litserve {m['litserve']} |",
        f"| Load average before / after | {' '.join(f'{x:.2f}' for x in m['load_before'])} / "
        f"{' '.join(f'{x:.2f}' for x in m.get('load_after', []))} |", "",
        "The *other* column in the tables is the machine's busy cores during the measured window minus the server's "
        "and the load generator's: other tenants of the machine. Where it is well above 0, the numbers are depressed "
        "by work this benchmark does not control."
        + (" Linux autogroup scheduling is on here: CPU time is shared equally between busy sessions, and each server "
           "runs in a session of its own, so with one other busy session a server gets about half of the machine "
           "(server cores ≈ other cores ≈ 1 in the table below)." if m.get("autogroup") else ""), "",
        "## Setup", "",
        *_setup_server(r),
        f"- Requests: {r['images']['count']} JPEGs, {r['images']['size']}, {r['images']['kb_min']:.0f}–{r['images']['kb_max']:.0f} KB "
        f"(mean {r['images']['kb_mean']:.0f} KB), drawn from the built-in `shapes` task with photo-like noise; "
        "headswap gets raw `image/jpeg` bodies on `/predict`.",
        "- Plain LitServe reference (`bench/reference_server.py`): LitServe's defaults (1 worker, max batch size 1), "
        "PIL decode + `eval_transform` in `decode_request`, same checkpoint. LitServe hands `decode_request` only "
        "`request.json()`, so **the reference receives the same JPEG base64-encoded in JSON** `{\"image\": ...}` "
        "(33% more bytes and a base64 decode).",
        "- Load (`bench/loadgen.py`): closed loop, one keep-alive HTTP/1.1 connection per virtual user, over 127.0.0.1, "
        f"in its own process ({r['plan']['warmup_s']:g} s warm-up, {r['plan']['measure_s']:g} s measured per point). "
        "Its CPU use is reported: on a small machine it competes with the server. It runs as `SCHED_BATCH`, so that "
        "its wakeups (each arrival, each answer) do not preempt the server mid-slice, as a client on another machine "
        "never would; it still gets its fair share of the CPU. A user refused with 503 (a server "
        "shedding load) waits as the answer's `Retry-After` says, at most 5 s, before it asks again, as a well-behaved "
        "client does; the refusals count as *Failed*.", "",
        "## Results", "",
        "| System | Concurrency | Requests/s | p50 ms | p95 ms | p99 ms | Mean batch | Failed | Server cores | Loadgen cores | Other cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_row("headswap (defaults)" if "flags" in s else "headswap", p) for p in r["headswap"]["points"]]
    for v in r.get("variants", []):
        lines += [_row(f"headswap, {v['name']}", p) for p in v["points"]]
    lines += [_row("plain LitServe (JSON base64)", p) for p in r.get("reference", {}).get("points", [])]
    lines += [_row("headswap GET /health (HTTP only)", r["stack"]["health"]),
              _row("headswap do-nothing (HTTP + queue + worker, no decode/forward)", r["stack"]["do_nothing"])]
    if r.get("grpc"):
        g = r["grpc"]
        windows = g.get("order") or [p for pair in zip(["http"] * len(g["http"]), ["grpc"] * len(g["grpc"])) for p in pair]
        taken = {"http": iter(g["http"]), "grpc": iter(g["grpc"])}
        for i, protocol in enumerate(windows):
            label = "HTTP raw JPEG" if protocol == "http" else "V2 gRPC, raw IMAGE BYTES"
            lines.append(_row(f"headswap + --grpc-port: {label} (window {i + 1})", next(taken[protocol])))
        lines += [_row("headswap + --grpc-port: HTTP do-nothing", g["http_do_nothing"]),
                  _row("headswap + --grpc-port: gRPC do-nothing", g["grpc_do_nothing"])]
    lines += ["", "Mean batch: images per executed forward pass, from the server's `headswap_batch_size` histogram over the "
              "window. Requests/s: answers with the expected status (200; 400 for do-nothing, which the worker "
              "refuses without a forward pass) per second of the window, as the least-squares slope of their count over it "
              "(`bench.loadgen.steady_rate`): answers come in whole batches, and a plain count over a window moves by a "
              "batch with where its edges fall between them (3.8% of a 10 s window at 42 req/s; a closed loop started "
              "the same way every time puts them in the same place, so the error does not average out). The results "
              "keep the plain count beside it (`rps_counted`).", "",
              *(["The *--grpc-port* rows are one server (the defaults plus `--grpc-port`) in one run: V2 over "
                 "gRPC as `tritonclient.grpc` sends it (IMAGE as raw BYTES; six virtual users share each channel, a "
                 "connection of its own, as Triton's client library and so `perf_analyzer` share them) "
                 f"beside HTTP raw bodies at the same concurrency, in windows of {r['grpc']['http'][0]['seconds']:g} s "
                 "(long, so that the machine's noise averages out over many batches) ordered HTTP, gRPC, gRPC, HTTP (a steady "
                 "drift of the machine's speed weighs on both alike), and each protocol's do-nothing "
                 "capacity (the 1×1 PIXELS request the worker refuses).", ""] if r.get("grpc") else []),
              f"![throughput and latency]({figure})", "",
              "### Ceilings", "",
              f"Bare model ({bare['threads']} threads, ready-made normalised tensors, `torch.inference_mode`):", "",
              "| Layout | Batch | Images/s | ms per batch | median ms |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {b['layout']} | {b['batch']} | {_f(b['images_per_s'])} | {_f(b['ms_per_batch'])} | {_f(b['median_ms_per_batch'])} |"
              for b in bare["runs"]]
    lines += ["", "Decode (JPEG bytes to normalised tensor, no model):", "",
              "| Path | Threads | Images/s | ms per image (per thread) |", "|---|---:|---:|---:|",
              f"| headswap (torchvision decode_jpeg, resize, crop, normalise) | 1 | {_f(dec['one_thread']['images_per_s'])} | {_f(dec['one_thread']['ms_per_image'])} |",
              f"| headswap, capacity | {dec['capacity']['threads']} | {_f(dec['capacity']['images_per_s'])} | {_f(dec['capacity']['ms_per_image'])} |",
              f"| reference (PIL open + eval_transform) | 1 | {_f(dec['pil_one_thread']['images_per_s'])} | {_f(dec['pil_one_thread']['ms_per_image'])} |",
              "", "## Targets", "", "| Target | Required | Measured | Ratio | Verdict |", "|---|---|---|---:|---|"]
    for t in targets(r):
        verdict = ("n/a (other device)" if not t["applies"] else "not judged" if t["met"] is None
                   else "**met**" if t["met"] else "**MISSED**")
        lines.append(f"| {t['name']} | {t['required']} | {t['measured']} | {_f(t['ratio'], 2)} | {verdict} |")
    missed = [t["name"] for t in targets(r) if t["applies"] and t["met"] is False]
    lines += ["", f"**{len(missed)} target(s) missed:** " + "; ".join(missed) + "." if missed else "**All targets met.**", ""]
    if r.get("lone"):
        lines += _lone_section(r["lone"])
    lines += _swap_section(r["swap"], next((p for p in r["headswap"]["points"] if p["concurrency"] == r["swap"]["concurrency"]), None))
    if r.get("overload"):
        lines += overload_section(r["overload"])
    top = r["headswap"]["points"][-1]
    roles = ", ".join(f"{role} {cores:.2f}" for role, cores in top["server_cores_by_role"].items())
    lines += ["## Cold start", "",
              f"Process start to `/ready` 200: headswap {r['headswap']['cold_start_s']:.1f} s"
              + "".join(f", {v['name']} {v['cold_start_s']:.1f} s" for v in r.get("variants", []))
              + (f"; plain LitServe to `/health` 200: {r['reference']['cold_start_s']:.1f} s." if r.get("reference") else "."), "",
              "## Where the CPU goes at saturation", "",
              f"headswap at concurrency {top['concurrency']}: server {top['server_cores']:.2f} cores ({roles}), "
              f"load generator {top['loadgen_cores']:.2f}, other tenants {_f(top.get('other_cores'), 2)}, "
              f"of {m['cores']}. Roles: *worker* runs the forward pass; *api* is the uvicorn process (HTTP, decode threads); "
              "*queue* is the process that holds the request queue (`service/inference/request_queue.py`); *manager* is "
              "LitServe's multiprocessing manager (its response queues, used only where an answer socket cannot be); "
              "*main* is the parent process.", "",
              "Server CPU per answered request (core-milliseconds): " + ", ".join(
                  f"{label} {1000 * p['server_cores'] / p['rps']:.1f}" + (
                      f" (worker {1000 * p['server_cores_by_role'].get('worker', 0) / p['rps']:.1f}, "
                      f"api {1000 * p['server_cores_by_role'].get('api', 0) / p['rps']:.1f}, "
                      f"queue {1000 * p['server_cores_by_role'].get('queue', 0) / p['rps']:.1f}, "
                      f"manager {1000 * p['server_cores_by_role'].get('manager', 0) / p['rps']:.1f})")
                  for label, p in (("headswap at saturation", top), ("do-nothing", r["stack"]["do_nothing"]),
                                   ("GET /health", r["stack"]["health"])) if p["rps"]) + ".", ""]
    return "\n".join(lines)


def _setup_server(r: dict[str, Any]) -> list[str]:
    """The Setup lines on the model and the server's command line and layout."""
    s = r["settings"]
    if "flags" not in s:  # results from before the benchmark measured the defaults
        return [f"- Model: {r['arch']}, {r['num_classes']} classes (fresh seeded head), {r['precision']}, {r['memory_format']}, "
                f"{s['torch_threads_per_worker']} torch threads per worker (`os.cpu_count() // workers`, as the server).",
                f"- headswap: `headswap serve --max-batch-size {s['max_batch_size']} --workers-per-device "
                f"{s['workers_per_device']} --decode-on {s.get('decode_on', 'api')}` (batch timeout {s['batch_timeout_ms']:g} ms, "
                f"{s['decode_threads']} decode threads: the defaults)."]
    flags = " ".join(s["flags"])
    layout = r["headswap"].get("layout") or {}
    each = "; ".join(f"`{e}`" for e in layout.get("each", [])) or "not found in its log"
    lines = [f"- Model: {r['arch']}, {r['num_classes']} classes (fresh seeded head), {r['precision']}, {r['memory_format']}.",
             f"- headswap (defaults): `headswap serve --checkpoint CKPT --port PORT{' ' + flags if flags else ''}`, the admin "
             "token from the environment: every other setting is the server's default "
             f"(max batch {s['max_batch_size']}, batch timeout {s['batch_timeout_ms']:g} ms, {s['decode_threads']} decode threads, "
             f"decode on {s.get('decode_on', 'api')}, workers per device and their threads chosen by the server). "
             f"The layout it chose, from its workers' start-up lines: {layout.get('workers', '?')} worker(s), {each}."]
    if r.get("variants"):
        lines.append("- Labelled variants beside it: " + "; ".join(
            f"*headswap, {v['name']}*: `{' '.join(v.get('flags', [])) or 'defaults'}`"
            + (f" ({v['layout']['workers']} worker(s), {'; '.join(v['layout']['each'])})" if v.get("layout") else "")
            for v in r["variants"]) + ". No target is judged on them.")
    return lines


LONE_NAMES = {"headswap": "headswap (defaults)", "reference": "plain LitServe (JSON base64)",
              "torchserve": "TorchServe (defaults, raw JPEG)"}
PEER_NAMES = {"reference": "plain LitServe", "torchserve": "TorchServe"}


def _lone_section(lone: dict[str, Any]) -> list[str]:
    torchserve = "torchserve" in lone["p50_ms"]
    lines = ["## Lone client", "",
             "Concurrency 1, the two concurrency-1 targets' source: headswap (defaults) and its peers, the plain LitServe "
             f"reference{' and TorchServe' if torchserve else ''}, all started, measured in alternating "
             f"{lone['seconds']:g} s windows while the others are stopped (SIGSTOP), the bare "
             "batch-1 forward measured just before each window with all of them stopped, so that they share each minute of "
             "this machine's drifting speed (the sweep's c=1 row and the reference's, minutes apart, do not)."
             + (" TorchServe (`bench/torchserve_peer.py`): its defaults (a worker per core, batch size 1) and a handler "
                "that loads the same checkpoint and opens each raw JPEG body with PIL, as the LitServe reference does; "
                "its request logs off." if torchserve else "")
             + (f" **TorchServe was not run:** {lone['torchserve_skipped']}." if lone.get("torchserve_skipped") else ""), "",
             "| Window | System | Bare batch-1 forward before it, ms | Paced, ms | Requests/s | p50 ms | p99 ms | Server cores |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for i, w in enumerate(lone["windows"]):
        p = w["point"]
        name = LONE_NAMES[w["system"]]
        lines.append(f"| {i + 1} | {name} | {_f(w['bare_ms'])} | {_f(w.get('paced_ms'))} | {_f(p['rps'])} | {_f(p['p50_ms'])} "
                     f"| {_f(p['p99_ms'])} | {_f(p['server_cores'], 2)} |")
    p50 = lone["p50_ms"]
    lines += ["", "Mean of the windows' p50: " + ", ".join(f"{LONE_NAMES[k]} **{v:.1f} ms**" for k, v in p50.items())
              + f"; bare batch-1 forward {lone['bare_ms']:.1f} ms."]
    if "paced_ms" in lone:
        lines += ["", f"*Paced*: the same bare forward with the machine idle {lone['gap_ms']:g} ms before each one, as a lone "
                  f"client's requests leave it (decode, HTTP, queues): {lone['paced_ms']:.1f} ms, "
                  f"{lone['paced_ms'] - lone['bare_ms']:+.1f} ms on the back-to-back forward that the bound uses. A served lone "
                  "request pays that too, whichever server answers it; it is shown, not taken off the bound."]
    return lines + [""]


def _swap_section(sw: dict[str, Any], sweep_point: dict[str, Any] | None) -> list[str]:
    lines = ["## Swap under load", "",
             f"Closed loop at concurrency {sw['concurrency']}, {sw['requests']} requests, {len(sw['swaps'])} swap(s) through "
             "`POST /admin/load`; *around* a swap means requests in flight from "
             f"{sw['margin_s']:g} s before the admin call to {sw['margin_s']:g} s after it returned.", "",
             "| Checkpoint | Status | Admin call to all workers switched | server's own count (`seconds`) "
             "| First new-version answer | Last old-version answer |",
             "|---|---:|---:|---:|---:|---:|"]
    for x in sw["swaps"]:
        lines.append(f"| {x['checkpoint']} | {x['status']} | {_f(x['client_s'], 2)} s | {_f(x['seconds'], 2)} s "
                     f"| {_f(x['first_new_after_s'], 2)} s | {_f(x['last_old_after_s'], 2)} s |")
    lines += ["", "The admin call returns once every worker has switched, so its wall time is the swap time; the response's "
              "`seconds` is the server's own count of the same span (validation, publishing, every worker's "
              "acknowledgement) without the HTTP round trip. Answer times are from the admin call's start."]
    errors = f" ({', '.join(f'{k}: {v}' for k, v in sw['errors'].items())})" if sw["errors"] else ""
    lines += ["", f"Failed requests: **{sw['failed']}**{errors}. p50/p99 around swaps "
              f"{_f(sw['p50_near_ms'])}/{_f(sw['p99_near_ms'])} ms ({sw['near_requests']} requests) against steady "
              f"{_f(sw['p50_steady_ms'])}/{_f(sw['p99_steady_ms'])} ms ({sw['steady_requests']} requests) in the same run"
              + (f"; the sweep's p50/p99 at this concurrency was {_f(sweep_point['p50_ms'])}/{_f(sweep_point['p99_ms'])} ms."
                 if sweep_point else "."), ""]
    return lines


# --------------------------------------------------------------------------- overload


def rss_change(a: dict[str, Any], a_edge: str, b: dict[str, Any], b_edge: str) -> tuple[float, str]:
    """The largest growth (MiB) of one server process's RSS from sample ``a_edge`` of point ``a`` to
    sample ``b_edge`` of point ``b``, and that process's role; NaN when no process is in both."""
    first, last = a["rss"].get(a_edge, {}), b["rss"].get(b_edge, {})
    growth = [((rss - first[pid]) / 2**20, a["roles"].get(pid, "")) for pid, rss in last.items() if pid in first]
    return max(growth, default=(float("nan"), ""))


def rss_flat(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The RSS-flat target: every process idle after the heaviest point against idle after the 2× one."""
    at = {p["factor"]: p for p in points}
    base, top = at.get(2.0), points[-1] if points else None
    growth, role = rss_change(base, "drained", top, "drained") if base and top else (float("nan"), "")
    judged = growth == growth  # NaN: not run, or no process sampled at both ends
    return {"name": f"overload: RSS flat (each server process, idle after {top['factor']:g}× vs idle after 2×)"
            if top else "overload: RSS flat", "applies": True, "required": f"≤ {RSS_SLACK_MIB:g} MiB",
            "measured": f"{growth:+.1f} MiB ({role})" if judged else "not measured",
            "ratio": growth / RSS_SLACK_MIB if judged else None, "met": growth <= RSS_SLACK_MIB if judged else None}


def overload_targets(ov: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's overload targets, judged on the first system (the defaults: shedding on)."""
    points = ov["systems"][0]["points"]
    at = {p["factor"]: p for p in points}
    sat, one = ov["saturation_rps"], at.get(1.0)
    nan = float("nan")
    out = []
    for factor in (2.0, 4.0):
        p = at.get(factor)
        out.append(_goodput_target(factor, p, sat, ov["saturation_concurrency"]))
    for factor in (2.0, 4.0):
        p = at.get(factor)
        out.append(_ratio(f"overload {factor:g}×: admitted p99 ≤ 2 × admitted p99 at 1×", p["p99_ms"] if p else nan,
                          one["p99_ms"] if one else None, 2.0, True,
                          f"{p['p99_ms']:.1f} vs {one['p99_ms']:.1f} ms" if p and one else "not run", at_most=True))
    shed = [p for p in points if p["rejected_503"]]
    worst = max((p["p99_503_ms"] for p in shed), default=None)
    sent = max((p["p99_503_sent_ms"] for p in shed if "p99_503_sent_ms" in p), default=None)
    out.append({"name": "overload: p99 of a 503 ≤ 20 ms (worst load)", "applies": True, "required": "≤ 20 ms",
                "measured": f"{worst:.1f} ms ({sum(p['rejected_503'] for p in shed)} 503s"
                + (f"; from the write, without the generator's lag: {sent:.1f} ms)" if sent is not None else ")")
                if shed else "no 503 answered",
                "ratio": worst / 20 if shed else None, "met": worst <= 20 if shed else None})
    other = sum(p["other_5xx"] for p in points)
    unanswered = sum(p["no_answer"] for p in points)
    out.append({"name": "overload: no 5xx but 503, every request answered", "applies": True, "required": "0",
                "measured": f"{other} other 5xx, {unanswered} unanswered", "ratio": None,
                "met": other == 0 and unanswered == 0 if points else None})
    out.append(rss_flat(points))
    return out


def _goodput_target(factor: float, p: dict[str, Any] | None, sat: float, concurrency: int) -> dict[str, Any]:
    """Goodput at ``factor``× against the capacity measured around the point (closed loop, just
    before and just after it) where the run has it, else against the sweep's best requests/s."""
    name = f"overload {factor:g}×: goodput (200s/s) ≥ 0.95 × saturation"
    if p is None:
        return _ratio(name, float("nan"), sat, 0.95, True, "not run")
    around = p.get("capacity_around")
    if not around:
        return _ratio(name, p["goodput_rps"], sat, 0.95, True, f"{p['goodput_rps']:.1f} vs {sat:.1f} req/s")
    capacity = sum(around) / len(around)
    return _ratio(name, p["goodput_rps"], capacity, 0.95, True,
                  f"{p['goodput_rps']:.1f} vs {capacity:.1f} req/s, the capacity around the point (closed loop at c={concurrency} "
                  f"just before and after: {around[0]:.1f}, {around[1]:.1f}); against the sweep's best, {sat:.1f}: "
                  f"{p['goodput_rps'] / sat:.2f}×")


def overload_section(ov: dict[str, Any]) -> list[str]:
    """The Overload section: one table of every system's points, and how to read it."""
    lines = ["## Overload", "",
             f"Open loop (`bench/openloop.py`): Poisson arrivals at 1×, 2× and 4× the saturation rate, "
             f"{ov['saturation_rps']:.1f} req/s (the best closed-loop requests/s of the defaults, at concurrency "
             f"{ov['saturation_concurrency']}), seeded so that both servers get the same arrivals. Each request goes out at its "
             "scheduled time on an idle keep-alive connection, or a new one, however many are unanswered; its latency counts "
             "from the scheduled time. Rows count the requests scheduled in the measured window; *goodput* is the rate of "
             "200s answered in the window (the same slope as *Requests/s* above; the plain count is kept in the results as "
             "`goodput_counted_rps`). *Lag*: how late the generator wrote its requests (over 10 ms at p99: it fell "
             "behind, marked ⚠). Between points the server is left to settle (nothing in flight, nothing queued) and then idle "
             "for 2 s; *RSS growth* is the largest growth of one server process from that idle state before the point's first "
             "arrival to the idle state 2 s after its last answer is in (an idle worker gives its free heap back after 1 s; "
             "sampled in the middle of the load, a worker's RSS swings by the working memory of the forward pass it is "
             "running). *Capacity around*: for the defaults, each point runs between two "
             f"closed-loop windows at concurrency {ov['saturation_concurrency']} (the server settled before each), the "
             "server's requests/s just before and just after the point; its goodput is judged against their mean, since this "
             "machine's speed drifts by 10% and more between the sweep and the overload points.", "",
             "| System | Load | Offered req/s | Goodput 200/s | Capacity around req/s | Admitted p50 ms | Admitted p99 ms | 503s "
             "| 503 p99 ms | Other statuses | Queue depth max | Lag p99 ms | RSS growth MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for system in ov["systems"]:
        for p in system["points"]:
            other = ", ".join(f"{'no answer' if s == '0' else s}: {n}" for s, n in sorted(p["statuses"].items())
                              if s not in ("200", "503")) or "0"
            growth, role = rss_change(p, "before", p, "drained")
            around = " / ".join(_f(c) for c in p.get("capacity_around", [])) or "–"
            lines.append(f"| {system['name']} | {p['factor']:g}× | {_f(p['offered_rps'])} | {_f(p['goodput_rps'])} | {around} "
                         f"| {_f(p['p50_ms'])} | {_f(p['p99_ms'])} | {p['rejected_503']} | {_f(p['p99_503_ms'])} | {other} "
                         f"| {_f(p['queue_depth_max'], 0)} | {_f(p['lag_p99_ms'])}{' ⚠' if p['behind'] else ''} "
                         f"| {growth:+.1f}{f' ({role})' if growth > 0 else ''} |")
        if system.get("skipped"):
            lines.append(f"| {system['name']} | – | – | – | – | – | – | – | – | not run: {system['skipped']} | – | – | – |")
    lines.append("")
    for system in ov["systems"]:
        if system["points"]:
            points = system["points"]
            growth, role = rss_change(points[0], "before", points[-1], "drained")
            shed = {}
            for p in system["points"]:
                for reason, n in p["rejected_by_server"].items():
                    shed[reason] = shed.get(reason, 0) + n
            lines.append(f"- {system['name']}: from before the first point to the end of the last, the largest growth of one "
                         f"process's RSS was {growth:.1f} MiB ({role or '–'}); "
                         f"the server counted {', '.join(f'{n:.0f} {k}' for k, n in sorted(shed.items())) or 'no'} "
                         "rejections (`headswap_rejected_total`) in the windows.")
    lines += ["", "Targets are judged on the defaults (shedding on); the unbounded server is shown for comparison. The defaults' "
              "`--max-queue auto` bounds the images in the server, waiting or running (at least two full batches per worker), "
              "so *queue depth*, the images waiting, peaks below it by the batches being run. *RSS flat*: "
              "the 1× and 2× points bring the server to its working set under overload (full batches, a full queue); idle "
              f"again after 4×, no process may hold more than {RSS_SLACK_MIB:g} MiB beyond what it held idle after 2× (the "
              "allocator's noise: the soak saw every process within 9.4 MiB over 20,000 requests). Memory kept per request or "
              "per rejection grows with the 4× point's extra load; a queue without bound keeps what its backlog held.", ""]
    if not ov.get("shedding", True):
        lines += ["This server has no `--max-queue`: the defaults do not shed, and the unbounded comparison was not run.", ""]
    return lines
