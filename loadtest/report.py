"""Markdown table and plot for a bench result (``loadtest/bench.py``)."""

from __future__ import annotations

from pathlib import Path


def _f(x, nd: int = 1, unit: str = "") -> str:
    if x is None:
        return "n/a"
    return f"{x:.{nd}f}{unit}"


def _met(d: dict) -> str:
    if d.get("met") is None:
        return "n/a"
    return "met" if d["met"] else f"**missed** ({d['missed_by']})"


def write_markdown(result: dict, path: Path, plot_name: str) -> Path:
    dev = result["device"]
    small = [k for k in result["inputs"] if k != result["stream_input"]][0] if len(result["inputs"]) > 1 \
        else result["stream_input"]
    lines = [f"# Benchmark: {dev['name']} ({dev['label']})", "",
             f"- command: `{result['command']}`",
             f"- started (UTC): {result['started_utc']}; wall {result['bench_wall_s'] / 60:.1f} min; "
             f"load average at start {_load(dev.get('loadavg_at_start'))}, at end {_load(dev.get('loadavg_at_end'))}",
             f"- ours measured through: **{result['target_measured']}**",
             f"- models: {_models(result)}",
             f"- inputs: " + ", ".join(f"{k} {'x'.join(map(str, v['shape']))} @ {v['spacing_mm']} mm"
                                      for k, v in result["inputs"].items()),
             ]
    if result.get("note"):
        lines.append(f"- note: **{result['note']}**")
    if dev.get("type") == "cpu":
        lines.append("- GPU: measured apart, where a GPU machine was lent (bench-gpu-<name>.*; "
                     "docs/performance.md says what was measured there)")
    if not result.get("complete", True) or not result.get("ratios"):
        lines.append("- **partial run**: completed phases " + ", ".join(result.get("completed_phases", [])))
    lines.append("")
    for p, r in result["ratios"].items():
        lines += [f"## Served precision {p}", "",
                  "| measure | ours | baseline fp32 | baseline " + p + " |", "|---|---|---|---|"]
        bl32 = result["baseline"]["fp32"]
        blp = result["baseline"].get(p, bl32)
        lines.append(f"| latency, {small}, with model loading (CLI) | {_f(r['latency_s'])} s | "
                     f"{_f(bl32[small]['with_loading_s'])} s | {_f(blp[small]['with_loading_s'])} s |")
        lines.append(f"| latency, {small}, models cached (CLI run minus its measured loads) | {_f(r['latency_s'])} s | "
                     f"{_f(bl32[small]['without_loading_s'])} s | {_f(blp[small]['without_loading_s'])} s |")
        so = result["ours"][p]["stream"]
        nb = bl32["stream"].get("volumes", "?")
        lines.append(f"| throughput, {result['stream_input']} volumes: ours {so['volumes']} from {so['clients']} "
                     f"clients; baseline {nb} back to back, models cached | {_f(so['volumes_per_hour'])} vol/h | "
                     f"{_f(bl32['stream']['volumes_per_hour'])} vol/h | {_f(blp['stream']['volumes_per_hour'])} vol/h |")
        lines.append(f"| compute floor, {small} | {_f(r['floor_s'])} s | | |")
        lines += ["", "| ratio | vs baseline fp32 | target | vs baseline " + p + " | target |", "|---|---|---|---|---|"]
        for k in ("latency_vs_baseline_with_loading", "latency_vs_baseline_without_loading",
                  "stream_throughput_vs_baseline"):
            a, b = r["vs_baseline_fp32"], r.get(f"vs_baseline_{p}", r["vs_baseline_fp32"])
            ta = r["targets_vs_baseline_fp32"].get(k, {})
            tb = r.get(f"targets_vs_baseline_{p}", r["targets_vs_baseline_fp32"]).get(k, {})
            lines.append(f"| {k} | {_f(a[k], 3)} | {ta.get('target', '')} {_met(ta) if ta else ''} | "
                         f"{_f(b[k], 3)} | {tb.get('target', '')} {_met(tb) if tb else ''} |")
        lines.append(f"| overhead end-to-end / floor | {_f(r['overhead_vs_floor'], 3)} | "
                     f"{r['overhead_target']['target']} {_met(r['overhead_target'])} | | |")
        lines += ["", "| scaling: size | voxels | ours (s) | floor (s) | baseline CLI (s) |", "|---|---|---|---|---|"]
        for row in r["scaling"]:
            lines.append(f"| {row['size']} | {row['voxels']:,} | {_f(row['ours_s'])} | {_f(row['floor_s'])} | "
                         f"{_f(row['baseline_with_loading_s'])} |")
        mem = result["ours"][p]["memory"]
        lines += ["", f"Memory: cluster total peak RSS (sampled, shared pages counted per process) "
                      f"{_f(mem['cluster_total_peak_rss_mb_sampled'], 0)} MB; largest process "
                      f"{_f(max((v['peak_rss_mb'] for v in mem['per_process_peak_rss'].values()), default=None), 0)}"
                      f" MB; baseline process peak {_f(bl32[small].get('peak_rss_mb_max_child_so_far'), 0)} MB.", ""]
    osb = result.get("ours_object_store", {})
    if osb:
        lines.append("Object store per request: " + "; ".join(
            f"{k}: {v['total_bytes'] / 2**20:.1f} MiB" for k, v in osb.items()) + " (" +
            next(iter(osb.values()))["method"] + ").")
        lines.append("")
    pa = result.get("precision_agreement")
    if pa:
        lines += [f"bf16 vs fp32 agreement ({pa['models_kind']}, {pa['volume']}): minimum Dice over "
                  f"{pa['structures_ge_1000_voxels']} structures of 1000+ voxels = {_f(pa['min_dice_structures_ge_1000_voxels'], 4)}"
                  f" (target {pa['target']}: {'met' if pa['met'] else 'missed' if pa['met'] is False else 'n/a'}).", ""]
    lines += [f"![time vs voxels]({plot_name})", ""]
    path.write_text("\n".join(lines))
    return path


def _load(x) -> str:
    return "n/a" if not x else "/".join(f"{v:.1f}" for v in x)


def _models(result: dict) -> str:
    p = result["reference_models"]["parameters"]
    if all(isinstance(v, int) for v in p.values()):
        return f"reference architecture, random weights, {min(p.values()):,}-{max(p.values()):,} parameters each"
    return str(p)


def write_plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for p, r in result["ratios"].items():
        rows = sorted(r["scaling"], key=lambda x: x["voxels"])
        vx = [x["voxels"] for x in rows]
        ax.plot(vx, [x["ours_s"] for x in rows], "o-", label=f"ours ({p})")
        ax.plot(vx, [x["floor_s"] for x in rows], "x--", label=f"compute floor ({p})")
        bl = [(x["voxels"], x["baseline_with_loading_s"]) for x in rows if x["baseline_with_loading_s"]]
        if bl:
            ax.plot(*zip(*bl), "s", label=f"baseline CLI ({p})")
    bl32 = [(result["inputs"][k]["voxels"], v["with_loading_s"]) for k, v in result["baseline"].get("fp32", {}).items()
            if k in result["inputs"] and isinstance(v, dict) and "with_loading_s" in v]
    if bl32 and "fp32" not in result["ratios"]:
        ax.plot(*zip(*bl32), "^", label="baseline CLI (fp32)")
    ax.set_xscale("log")
    ax.set_xlabel("input voxels")
    ax.set_ylabel("seconds per volume")
    ax.set_title(f"{result['device']['label']}: one 80-structure request")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
