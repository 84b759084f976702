"""The benchmark's markdown table (with the targets checked) and its PNG chart."""

from __future__ import annotations

import statistics
from pathlib import Path

RSS_SLACK = 400e6


def _find(results: dict, name: str, tp: int, cache: str) -> dict | None:
    for run in results["runs"]:
        if (run["name"], run["tp"], run["cache"]) == (name, tp, cache) and "seconds" in run:
            return run
    return None


def _ratio(results: dict, fast: str, slow: str, tp: int, cache: str) -> float | None:
    a, b = _find(results, fast, tp, cache), _find(results, slow, tp, cache)
    return b["seconds"] / a["seconds"] if a and b and a["seconds"] else None


def _fmt(value: float | None, suffix: str = "x") -> str:
    return "n/a" if value is None else f"{value:.2f}{suffix}"


def targets(results: dict) -> list[str]:
    tps = sorted({run["tp"] for run in results["runs"]})
    lines = []
    for mode in ("sharded read", "sharded mmap"):
        for cache in ("warm", "cold"):
            ratios = ", ".join(f"TP={tp} {_fmt(_ratio(results, mode, 'limit (readinto)', tp, cache))}" for tp in tps)
            lines.append(f"- {mode} throughput / limit ({cache}; target >= 0.85): {ratios}")
        for tp, cache in ((4, "warm"), (2, "warm"), (2, "cold"), (4, "cold")):
            if tp in tps:
                lines.append(f"- {mode} vs default speed-up, TP={tp} {cache} (target >= 3 at TP=4 warm): "
                             f"{_fmt(_ratio(results, mode, 'default', tp, cache))}")
        for cache in ("warm", "cold"):
            ratios = ", ".join(f"TP={tp} {_fmt(_ratio(results, mode, 'vLLM sharded_state', tp, cache))}" for tp in tps)
            lines.append(f"- {mode} vs vLLM sharded_state speed-up ({cache}; target >= 1.5): {ratios}")
        for cache in ("warm", "cold"):
            ratios = ", ".join(f"TP={tp} {_fmt(_ratio(results, mode, 'transformers tp_plan=auto', tp, cache))}"
                               for tp in tps)
            lines.append(f"- {mode} vs transformers tp_plan=auto speed-up ({cache}; no target): {ratios}")
    for tp in tps:  # the first load of a checkpoint: read once across the ranks and exchanged, or TP x / sliced
        for cache in ("warm", "cold"):
            scatter = _find(results, "scatter", tp, cache)
            if scatter is None:
                continue
            read = sum(r["bytes_read"] for r in scatter["per_rank"]) / 1e9
            lines.append(f"- scatter TP={tp} {cache}: {read:.2f} GB read in all; vs default "
                         f"{_fmt(_ratio(results, 'scatter', 'default', tp, cache))}, vs sliced "
                         f"{_fmt(_ratio(results, 'scatter', 'sliced', tp, cache))} (speed-up; no target)")
    for cost in results.get("verify_cost", []):
        lines.append(f"- --verify cost, warm, --io {cost['io']}, TP={cost['tp']} (target < 0.10 of the load time): "
                     f"{cost['extra_fraction']:+.2f} ({cost['extra_seconds']:+.3f}s on a median of "
                     f"{statistics.median(cost['seconds']):.3f}s, {len(cost['seconds'])} alternating rounds)")
    cold = [f"TP={tp} {ratio - 1:+.2f}" for tp in tps
            if (ratio := _ratio(results, "sharded read", "sharded read + verify", tp, "cold")) is not None]
    lines.append(f"- --verify cost, cold, --io read (one load each): {', '.join(cold) or 'n/a'}")
    for run in results["runs"]:
        if len(run.get("seconds_each", [])) > 1:
            each = ", ".join(f"{t:.2f}" for t in run["seconds_each"])
            lines.append(f"- {run['name']} TP={run['tp']} {run['cache']}: loads took {each} s (table: median)")
    rss = []
    for tp in tps:
        run = _find(results, "sharded read", tp, "warm")
        if run:
            worst = max(r["peak_rss"] / (1.1 * r["bytes_read"] + RSS_SLACK) for r in run["per_rank"])
            rss.append(f"TP={tp} {worst:.2f}")
    lines.append(f"- peak RSS per rank / (1.1 x rank bytes + 400 MB) (target <= 1): {', '.join(rss)}")
    conv = ", ".join(f"TP={c['tp']} {c['ratio_to_raw']:.2f}" for c in results["convert"])
    lines.append(f"- convert time vs raw read + raw write of the same bytes (target >= 0.7): {conv}")
    for tp in tps:
        ours = {tuple(r["tokens"]) for r in results["runs"] if r["tp"] == tp and r.get("shardstate")}
        lines.append(f"- TP={tp}: every shardstate load path gave the same tokens: {'yes' if len(ours) == 1 else 'NO'}")
        for peer in results["runs"]:
            if peer["tp"] == tp and "tokens" in peer and not peer.get("shardstate") and peer["cache"] == "warm":
                same = "the same" if {tuple(peer["tokens"])} == ours else f"different ({peer['tokens']})"
                lines.append(f"- TP={tp}: {peer['name']} gave {same} tokens")
    return lines


def markdown(results: dict) -> str:
    tps = sorted({run["tp"] for run in results["runs"]})
    names = list(dict.fromkeys(run["name"] for run in results["runs"]))
    out = [f"Model: {results['model']['bytes'] / 1e9:.2f} GB bf16 Llama; machine: {results['machine']['cpus']} CPUs, "
           f"{results['machine']['platform']}. Cell: slowest rank's load seconds (aggregate GB/s).", ""]
    for cache in ("warm", "cold"):
        out.append(f"**{cache} page cache**")
        out.append("")
        out.append("| load path | " + " | ".join(f"TP={tp}" for tp in tps) + " |")
        out.append("|---|" + "---|" * len(tps))
        for name in names:
            cells = []
            for tp in tps:
                run = next((r for r in results["runs"] if (r["name"], r["tp"], r["cache"]) == (name, tp, cache)), None)
                if run is None:
                    cells.append("")
                elif "seconds" in run:
                    rate = f" ({run['gb_per_s']:.2f} GB/s)" if run.get("gb_per_s") else ""
                    cells.append(f"{run['seconds']:.3f}s{rate}")
                else:
                    cells.append(run["error"])
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("Targets:")
    out.extend(targets(results))
    return "\n".join(out) + "\n"


def write_reports(results: dict, out_dir: Path) -> None:
    (out_dir / "results.md").write_text(markdown(results))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tps = sorted({run["tp"] for run in results["runs"]})
    names = [n for n in dict.fromkeys(run["name"] for run in results["runs"])
             if any(r["name"] == n and "seconds" in r for r in results["runs"])]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    width = 0.8 / max(len(tps), 1)
    for ax, cache in zip(axes, ("warm", "cold"), strict=True):
        for i, tp in enumerate(tps):
            values = []
            for name in names:
                run = _find(results, name, tp, cache)
                values.append(run["seconds"] if run else 0)
            ax.barh([n + i * width for n in range(len(names))], values, height=width, label=f"TP={tp}")
        ax.set_yticks([n + width * (len(tps) - 1) / 2 for n in range(len(names))], names)
        ax.set_title(f"{cache} page cache")
        ax.set_xlabel("load seconds, slowest rank (lower is faster)")
        ax.invert_yaxis()
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "results.png", dpi=110)
    plt.close(fig)
