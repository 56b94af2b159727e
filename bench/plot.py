"""The benchmark's figure: throughput and latency against concurrency, from ``bench/results.json``.

Left: requests/s for headswap and the plain LitServe reference, with the bare model's best
images/s and the decode capacity as ceilings. Right: p50/p95/p99 latency, log scale.
matplotlib is needed (the ``bench`` extra); the Agg backend draws without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(results: dict[str, Any], out: Path) -> Path:
    """Draw ``results`` (as ``bench.run`` writes them) into the PNG ``out``; returns ``out``."""
    import matplotlib  # noqa: PLC0415 - optional dependency, imported only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [("headswap (defaults)" if "flags" in results["settings"] else "headswap", results["headswap"]["points"], "tab:blue"),
              ("plain LitServe (JSON base64)", results.get("reference", {}).get("points", []), "tab:orange")]
    for label, points, colour in series:
        if points:
            xs = [p["concurrency"] for p in points]
            left.plot(xs, [p["rps"] for p in points], "o-", color=colour, label=label)
    for variant, marker in zip(results.get("variants", []), "s^Dv"):
        left.plot([p["concurrency"] for p in variant["points"]], [p["rps"] for p in variant["points"]], marker,
                  color="tab:purple", linestyle="none", label=f"headswap, {variant['name']}")
    bare = results["bare"]["best"]
    left.axhline(bare["images_per_s"], color="tab:green", linestyle="--",
                 label=f"bare model best ({bare['layout']}, batch {bare['batch']})")
    left.axhline(0.85 * bare["images_per_s"], color="tab:green", linestyle=":", label="0.85 x bare (target)")
    top = 1.3 * max([bare["images_per_s"]] + [p["rps"] for _, points, _ in series for p in points]
                    + [p["rps"] for v in results.get("variants", []) for p in v["points"]])
    decode = results["decode"]["capacity"]
    label = f"decode capacity ({decode['threads']} threads)"
    if decode["images_per_s"] <= top:
        left.axhline(decode["images_per_s"], color="tab:gray", linestyle="--", label=label)
    else:  # on CPU decoding is far cheaper than the model: a line at that height would flatten the plot
        left.plot([], [], " ", label=f"{label}: {decode['images_per_s']:.0f}/s, off scale")
    left.set(xscale="log", xlabel="concurrency (closed-loop users)", ylabel="requests/s (images/s)",
             title="Throughput", ylim=(0, top))
    left.set_xticks([p["concurrency"] for p in results["headswap"]["points"]])
    left.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for label, points, colour in series:
        xs = [p["concurrency"] for p in points]
        for q, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^:")):
            if points:
                right.plot(xs, [p[q] for p in points], style, color=colour, label=f"{label.split(' (')[0]} {q[:3]}")
    right.set(xscale="log", yscale="log", xlabel="concurrency (closed-loop users)", ylabel="latency (ms)",
              title="Latency percentiles")
    right.set_xticks([p["concurrency"] for p in results["headswap"]["points"]])
    right.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.get_yaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.legend(fontsize=8, ncol=2)
    right.grid(alpha=0.3, which="both")
    machine = results["machine"]
    fig.suptitle(f"{results['arch']} {results['precision']} on {machine['device_name']} "
                 f"({machine['cores']} cores), max batch {results['settings']['max_batch_size']}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
