"""One command for the performance claims: ours vs the sequential baseline, in one run, on the same inputs.

    python -m loadtest.bench [--sizes small|all] [--precision fp32|bf16|both] [--device auto]
                             [--out loadtest/results]

Measures (see docs/performance.md for the method):

* latency: one full 80-structure request on a warm local Ray Serve cluster,
  through its HTTP API (``--target cluster``, the default), or through the
  in-process ``serve.inference.pipeline.Segmenter`` (``--target inprocess``); the JSON
  says which. Against the baseline with model loading (a fresh process, as a
  CLI call) and without (cached models).
* throughput: ``--stream`` volumes (default 8) sent by ``--clients`` concurrent
  clients, against the baseline running them back to back with cached models.
* compute floor and the overhead ratio end-to-end / floor (:mod:`loadtest.floor`).
* scaling: time against input voxels for every measured size.
* memory: peak RSS per process, the cluster's sampled total, object-store bytes per request.
* precision: bf16 vs fp32 per-structure Dice on the demo models, and every
  ratio against the fp32 baseline and a baseline given the same precision.

Writes ``bench-<device>.json``, ``bench-<device>.md`` and ``bench-<device>.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loadtest import inputs as lt_inputs
from loadtest.inputs import SIZES, InputSize

TARGETS_CPU = {"latency_vs_baseline_with_loading": ("<=", 0.6), "stream_throughput_vs_baseline": (">=", 2.0),
               "overhead_vs_floor": ("<=", 1.15)}
TARGETS_GPU = {"stream_throughput_vs_baseline": (">=", 5.0), "overhead_vs_floor": ("<=", 1.25)}
DICE_TARGET = 0.98
DICE_MIN_VOXELS = 1000


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- environment ----------------------------------------------------------------
def device_info(requested: str) -> dict:
    import torch

    from serve.inference.modelload import cpu_model_and_flags, pick_device

    dev = pick_device(requested)
    info = {"type": dev.type, "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    if dev.type == "cuda":
        info["autocast"] = "float16, nnU-Net's own, in every run (the precision labels name the setting)"
        info["name"] = torch.cuda.get_device_name(0)
        info["label"] = "gpu-" + info["name"].lower().replace("nvidia", "").strip().replace(" ", "-")
    else:
        info["name"], flags = cpu_model_and_flags()
        info["avx512_bf16"] = "avx512_bf16" in flags
        info["label"] = f"cpu-{os.cpu_count()}core"
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def served_precisions(choice: str, device_type: str) -> list[str]:
    """The served precision settings to measure, in order.

    On CUDA only ``fp32`` (the setting): nnU-Net's predictor runs every CUDA forward under its own fp16
    autocast, which overrides an outer bf16 one, so a "bf16" run there would time the same computation
    again (the 2026-12-06 H100 run did, and spent its slot on it).
    """
    if device_type == "cuda":
        return ["fp32"]
    return {"fp32": ["fp32"], "bf16": ["bf16"], "both": ["bf16", "fp32"]}[choice]


# -- baseline ---------------------------------------------------------------------
def baseline_cli(input_path: Path, models_dir: Path, workdir: Path, precision: str, device: str,
                 threads: int) -> dict:
    """The baseline as a CLI call: a fresh Python process that imports, loads each model, predicts, combines."""
    out_json = workdir / f"baseline-{precision}.json"
    cmd = [sys.executable, "-m", "loadtest.baseline", "--input", str(input_path), "--models", str(models_dir),
           "--workdir", str(workdir / f"bl-{precision}"), "--precision", precision, "--device", device,
           "--threads", str(threads), "--json", str(out_json)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate()
    wall = time.perf_counter() - t
    # ru_maxrss of the largest waited-for child: the baseline process
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise RuntimeError(f"baseline failed ({proc.returncode}):\n{err[-3000:]}")
    t_in = json.loads(out_json.read_text())
    return {"wall_s": wall, "timings": t_in, "with_loading_s": wall,
            "without_loading_s": t_in["total_without_loading_s"],
            "load_s": sum(t_in["load_s"].values()), "import_and_start_s": wall - t_in["total_s"],
            "peak_rss_mb_max_child_so_far": round(peak_kb / 1024, 1)}


def baseline_stream(paths: list[Path], models: dict, workdir: Path, precision: str, device: str) -> dict:
    """Back to back with cached models: the best a sequential loop can do."""
    from loadtest.baseline import run_baseline

    t = time.perf_counter()
    per = []
    for i, p in enumerate(paths):
        r = run_baseline(p, None, workdir / f"bs-{i}", precision=precision, device=device, cached=models)
        per.append(r.total_s)
    wall = time.perf_counter() - t
    return {"volumes": len(paths), "wall_s": wall, "per_volume_s": per,
            "volumes_per_hour": 3600 * len(paths) / wall}


# -- ours -------------------------------------------------------------------------
class ClusterTarget:
    """Requests through the HTTP API of a local Ray Serve deployment."""

    label = "cluster (Ray Serve, HTTP API)"

    def __init__(self, models_dir: Path, precision: str, device: str, threads: int, clients: int):
        from loadtest import localcluster

        dev = "cuda" if device == "cuda" else "cpu"
        names = [sm.name for sm in _catalogue().submodels]
        # On one GPU the six replicas share it (fractional GPUs), as deployments/one-gpu.yaml does.
        gpu = {"num_gpus": 1, "gpu_fraction": 0.16} if dev == "cuda" else {}
        self.cluster = localcluster.start(models_dir, submodels=names, precision=precision, device=dev,
                                          threads=threads, slots=max(clients, 1), **gpu)
        self.settings = {"replicas_per_submodel": 1, "threads_per_replica": threads, "precision": precision,
                         "device": dev, **gpu}

    def segment(self, path: Path, site: str = "site-a") -> dict:
        import httpx

        body = path.read_bytes()
        t = time.perf_counter()
        r = httpx.post(self.cluster.url + "/v1/segmentations/upload",
                       params={"wait": "true", "filename": path.name, "outputs": "multilabel"},
                       content=body, headers={**self.cluster.headers(site),
                                              "Content-Type": "application/octet-stream"},
                       timeout=7200)
        wall = time.perf_counter() - t
        if r.status_code != 200:
            raise RuntimeError(f"request failed: {r.status_code} {r.text[:500]}")
        job = r.json()
        return {"wall_s": wall, "timings": job.get("timings", {}), "submodels": job.get("submodels", {})}

    def pids(self) -> list[int]:
        from loadtest.localcluster import cluster_pids

        return cluster_pids()

    def close(self) -> None:
        from loadtest import localcluster

        localcluster.stop(self.cluster)


class InProcessTarget:
    """The in-process ``serve.inference.pipeline.Segmenter`` (no Ray): shared preprocessing, cached models."""

    label = "in-process serve.inference.pipeline.Segmenter (no Ray)"

    def __init__(self, models_dir: Path, precision: str, device: str, threads: int, clients: int):
        from serve.inference.modelstore import ModelStore
        from serve.inference.pipeline import Segmenter

        self.seg = Segmenter(ModelStore([str(models_dir)]), device=device, threads=threads, precision=precision)
        for sm in _catalogue().submodels:
            self.seg.model(sm.name)
        self.settings = {"threads": threads, "precision": precision, "device": device}

    def segment(self, path: Path, site: str = "site-a") -> dict:
        from serve.imaging.volume_io import read_volume

        t = time.perf_counter()
        res = self.seg.segment(read_volume(path))
        return {"wall_s": time.perf_counter() - t, "timings": res.timings}

    def pids(self) -> list[int]:
        return [os.getpid()]

    def close(self) -> None:
        pass


def _catalogue():
    from serve.catalogue import load_catalogue

    return load_catalogue()


def run_stream(target, paths: list[Path], clients: int) -> dict:
    """``clients`` concurrent clients working through ``paths``; volumes/hour over the whole stream."""
    sites = ["site-a", "site-b", "site-c"]
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as ex:
        futs = [ex.submit(target.segment, p, sites[i % len(sites)]) for i, p in enumerate(paths)]
        per = [f.result()["wall_s"] for f in futs]
    wall = time.perf_counter() - t
    return {"volumes": len(paths), "clients": clients, "wall_s": wall, "request_latency_s": per,
            "volumes_per_hour": 3600 * len(paths) / wall}


def object_store_bytes(path: Path, n_models: int) -> dict:
    """Bytes a request puts through Ray's object store: the prepared 1.5 mm float32 array (once,
    shared by the six replicas) and each replica's uint8 label map coming back."""
    from serve.inference.preprocess import prepare
    from serve.imaging.volume_io import read_volume

    prep = prepare(read_volume(path), 1.5)
    inp = int(prep.data.nbytes)
    out = int(np.prod(prep.data.shape)) * n_models
    return {"prepared_input_bytes": inp, "returned_label_bytes": out, "total_bytes": inp + out,
            "method": "computed from the array sizes the router puts and the replicas return"}


# -- precision agreement -----------------------------------------------------------
def dice_bf16_vs_fp32(threads: int) -> dict:
    """Per-structure Dice of bf16 vs fp32 on the demo models and a demo/phantom volume."""
    from serve.demo import demo_volume, ensure_demo_models
    from serve.inference.modelstore import ModelStore
    from serve.inference.pipeline import Segmenter

    root = ensure_demo_models()
    vol = demo_volume()
    res = {}
    for prec in ("fp32", "bf16"):
        seg = Segmenter(ModelStore([str(root)]), device="cpu", threads=threads, precision=prec)
        res[prec] = seg.segment(vol)
    out = {}
    for name, m32 in res["fp32"].per_model.items():
        m16 = res["bf16"].per_model[name]
        for gid in np.unique(m32[m32 > 0]):
            a, b = m32 == gid, m16 == gid
            n = int(a.sum())
            dice = 2 * float((a & b).sum()) / float(n + b.sum())
            out[_catalogue().structures[int(gid)]] = {"voxels_fp32": n, "dice": round(dice, 4)}
    big = {k: v for k, v in out.items() if v["voxels_fp32"] >= DICE_MIN_VOXELS}
    worst = min((v["dice"] for v in big.values()), default=None)
    from serve.demo import demo_model_dir

    trained = (demo_model_dir() / "DEMO_MODELS.json").exists() or root == demo_model_dir()
    return {"models": str(root), "models_kind": "committed demo models" if trained else "random-init demo models",
            "volume": "serve.demo.demo_volume()", "per_structure": out,
            "min_dice_structures_ge_1000_voxels": worst, "target": DICE_TARGET,
            "structures_ge_1000_voxels": len(big),
            "met": None if worst is None else worst >= DICE_TARGET}


# -- bookkeeping -----------------------------------------------------------------
def judge(value: float | None, rule: tuple[str, float]) -> dict:
    op, target = rule
    if value is None:
        return {"value": None, "target": f"{op} {target}", "met": None}
    met = value <= target if op == "<=" else value >= target
    d = {"value": round(value, 3), "target": f"{op} {target}", "met": met}
    if not met:
        d["missed_by"] = f"{value / target:.2f}x the target ({value:.3f} vs {target})"
    return d


def write_inputs(workdir: Path, sizes: list[InputSize], stream_n: int, stream_size: InputSize) -> dict:
    paths = {s.name: lt_inputs.write_volume(s, workdir / f"{s.name}.nii.gz", seed=1) for s in sizes}
    stream = [lt_inputs.write_volume(stream_size, workdir / f"stream-{i}.nii.gz", seed=100 + i)
              for i in range(stream_n)]
    return {"sizes": paths, "stream": stream}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", choices=["small", "all"], default="small",
                    help="small: 117x91x20 @3 mm (+ the stream's tiny volume); all: + 256x256x128 and "
                         "320x320x200 @1.5 mm (hours on CPU)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="bf16",
                    help="served precision; the fp32 baseline always runs (the fair reference)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--target", choices=["cluster", "inprocess"], default="cluster")
    ap.add_argument("--stream", type=int, default=8, help="volumes in the throughput stream (>= 8)")
    ap.add_argument("--baseline-stream", type=int, default=None,
                    help="volumes the sequential baseline runs back to back (default: 4 on CPU, --stream on GPU); "
                         "it is strictly sequential, so its throughput is 1 / mean time per volume")
    ap.add_argument("--clients", type=int, default=2, help="concurrent clients in the stream")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--replica-threads", type=int, default=1, help="torch threads per sub-model replica")
    ap.add_argument("--models-dir", default=None,
                    help="reference models (generated here if missing); a folder of other nnU-Net models is "
                         "used as is and the results are labelled custom")
    ap.add_argument("--floor-max-tiles", type=int, default=None,
                    help="time at most this many tiles per model and scale (default: 1 on CPU, all on GPU)")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. 'machine contended')")
    args = ap.parse_args(argv)
    if args.stream < 8:
        ap.error("--stream must be at least 8 (the issue's definition of a stream)")

    from loadtest.baseline import load_models
    from loadtest.floor import measure_floor, preprocessed_shape
    from loadtest.memory import RssSampler, peaks
    from loadtest.refmodels import DEFAULT_DIR, REFERENCE_SPEC, write_reference_models
    from serve.inference.modelload import configure_threads

    t_run = time.perf_counter()
    threads = configure_threads(args.threads or os.cpu_count())
    dev = device_info(args.device)
    device = dev["type"]
    precisions = served_precisions(args.precision, device)
    baseline_precisions = sorted(set(precisions) | {"fp32"}, key=["fp32", "bf16"].index)
    floor_max = args.floor_max_tiles if args.floor_max_tiles is not None else (1 if device == "cpu" else None)
    baseline_n = min(args.stream, args.baseline_stream or (4 if device == "cpu" else args.stream))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mriseg-bench-"))
    log(f"device {dev['name']} ({device}), precisions {precisions}, work dir {work}")

    models_dir = Path(args.models_dir or DEFAULT_DIR)
    if args.models_dir and not (models_dir / ".refmodels.json").exists():
        # someone else's models (e.g. tiny ones for a quick check): used as they are, and labelled so
        params = {"custom models, not the reference architecture": str(models_dir)}
        log(f"using custom models from {models_dir}: results are NOT reference-architecture numbers")
    else:
        params = write_reference_models(models_dir)
    sizes = [SIZES["small"]] + ([SIZES["medium"], SIZES["large"]] if args.sizes == "all" else [])
    stream_size = SIZES["tiny"] if device == "cpu" else SIZES["small"]
    lat_sizes = [stream_size] + [s for s in sizes if s != stream_size]  # scaling points for ours and the floor
    inp = write_inputs(work, lat_sizes, args.stream, stream_size)
    six = [sm.name for sm in _catalogue().submodels]

    result: dict = {
        "command": "python -m loadtest.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": dev, "note": args.note, "target_measured": None,
        # both sides resample the input with TotalSegmentator's default -ro (ours: the API's default)
        "resampling_order": DEFAULT_RESAMPLING_ORDER,
        "reference_models": {"parameters": params, "spec": {
            "features": list(REFERENCE_SPEC.features), "patch": list(REFERENCE_SPEC.patch_size),
            "n_conv_per_stage": REFERENCE_SPEC.n_conv_per_stage, "spacing_mm": 1.5, "weights": "random"}},
        "inputs": {s.name: {"shape": list(s.shape), "spacing_mm": s.spacing_mm, "voxels": s.voxels}
                   for s in lat_sizes},
        "stream_input": stream_size.name, "baseline": {}, "ours": {}, "floor": {}, "ratios": {}, "targets": {},
    }

    label = dev["label"]
    partial = out_dir / f"bench-{label}.partial.json"

    def checkpoint(phase: str) -> None:
        """Keep what is measured so far: a run cut short still leaves its numbers (marked partial)."""
        result["completed_phases"] = result.get("completed_phases", []) + [phase]
        result["elapsed_s"] = time.perf_counter() - t_run
        partial.write_text(json.dumps(result, indent=1, default=_json_default))

    # 1. baseline as a CLI call (fresh process per request; it pays imports and loading)
    for bp in baseline_precisions:
        for s in sizes:
            log(f"baseline CLI {bp} on {s.name}")
            result["baseline"].setdefault(bp, {})[s.name] = baseline_cli(
                inp["sizes"][s.name], models_dir, work, bp, args.device, threads)
            checkpoint(f"baseline-cli-{bp}-{s.name}")

    # 2. ours: warm latency per size, stream throughput, memory
    target_cls = ClusterTarget if args.target == "cluster" else InProcessTarget
    for p in precisions:
        log(f"starting {target_cls.label} ({p})")
        t0 = time.perf_counter()
        target = target_cls(models_dir, p, device, args.replica_threads if args.target == "cluster" else threads,
                            args.clients)
        ours: dict = {"target": target.label, "settings": target.settings, "startup_s": time.perf_counter() - t0}
        result["target_measured"] = target.label
        try:
            log("warm-up request (not counted)")
            target.segment(inp["stream"][0])
            ours["latency"] = {}
            for s in lat_sizes:
                log(f"ours {p} latency on {s.name}")
                ours["latency"][s.name] = target.segment(inp["sizes"][s.name])
                result["ours"][p] = ours
                checkpoint(f"ours-{p}-latency-{s.name}")
            log(f"ours {p} stream of {args.stream} x {stream_size.name}, {args.clients} clients")
            with RssSampler(target.pids) as sampler:
                ours["stream"] = run_stream(target, inp["stream"], args.clients)
            ours["memory"] = {"cluster_total_peak_rss_mb_sampled": sampler.max_total_mb,
                              "per_process_peak_rss": peaks(target.pids())}
        finally:
            target.close()
        result["ours"][p] = ours
        checkpoint(f"ours-{p}-stream")
    result["ours_object_store"] = {s.name: object_store_bytes(inp["sizes"][s.name], len(six)) for s in sizes}

    # 3. baseline stream (cached models, back to back) and the compute floor, in this process
    for p in precisions:
        log(f"loading the six models in this process for the cached baseline and the floor ({p})")
        models = load_models(models_dir, six, args.device)
        log(f"baseline stream {p}: {baseline_n} x {stream_size.name} back to back")
        bstream = inp["stream"][:baseline_n]
        result["baseline"].setdefault(p, {})["stream"] = baseline_stream(bstream, models, work, p, args.device)
        if p != "fp32" and "fp32" not in precisions:
            log("baseline stream fp32 (the fair reference)")
            checkpoint(f"baseline-stream-{p}")
            result["baseline"].setdefault("fp32", {})["stream"] = baseline_stream(
                bstream, models, work, "fp32", args.device)
        checkpoint("baseline-stream")
        from serve.inference.preprocess import prepare
        from serve.imaging.volume_io import read_volume

        shapes = {}
        for s in lat_sizes:
            prep = prepare(read_volume(inp["sizes"][s.name]), 1.5)
            shapes[s.name] = {n: preprocessed_shape(m, prep.data, 1.5) for n, m in models.items()}
        log(f"floor {p}")
        floors = measure_floor(models, shapes, p, batch_size=2, max_tiles=floor_max)
        result["floor"][p] = {k: v.to_dict() for k, v in floors.items()}
        checkpoint(f"floor-{p}")
        del models

    # 4. precision agreement
    if "bf16" in precisions and device == "cpu":
        log("bf16 vs fp32 Dice on the demo models")
        result["precision_agreement"] = dice_bf16_vs_fp32(threads)

    # 5. ratios and targets
    compute_ratios(result, precisions, sizes, lat_sizes, device)
    result["bench_wall_s"] = time.perf_counter() - t_run
    result["device"]["loadavg_at_end"] = os.getloadavg()
    result["complete"] = True
    (out_dir / f"bench-{label}.json").write_text(json.dumps(result, indent=1, default=_json_default))
    from loadtest.report import write_markdown, write_plot

    write_plot(result, out_dir / f"bench-{label}.png")
    write_markdown(result, out_dir / f"bench-{label}.md", f"bench-{label}.png")
    partial.unlink(missing_ok=True)
    log(f"wrote {out_dir}/bench-{label}.json/.md/.png in {result['bench_wall_s'] / 60:.1f} min")
    return 0


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def compute_ratios(result: dict, precisions: list[str], sizes: list[InputSize], lat_sizes: list[InputSize],
                   device: str) -> None:
    """Every speed ratio twice: against the fp32 baseline and against the same-precision baseline."""
    targets = TARGETS_CPU if device == "cpu" else TARGETS_GPU
    small = sizes[0].name
    for p in precisions:
        ours = result["ours"][p]
        lat = ours["latency"][small]["wall_s"]
        floor = result["floor"][p][small]["total_s"]
        r: dict = {"latency_s": lat, "floor_s": floor, "overhead_vs_floor": lat / floor}
        for ref in sorted({"fp32", p}):
            bl = result["baseline"][ref][small]
            bs = result["baseline"][ref]["stream"]
            r[f"vs_baseline_{ref}"] = {
                "latency_vs_baseline_with_loading": lat / bl["with_loading_s"],
                "latency_vs_baseline_without_loading": lat / bl["without_loading_s"],
                "stream_throughput_vs_baseline": ours["stream"]["volumes_per_hour"] / bs["volumes_per_hour"],
            }
            r[f"targets_vs_baseline_{ref}"] = {k: judge(r[f"vs_baseline_{ref}"].get(k), rule)
                                              for k, rule in targets.items() if k != "overhead_vs_floor"}
        r["overhead_target"] = judge(r["overhead_vs_floor"], targets["overhead_vs_floor"])
        r["scaling"] = [{"size": s.name, "voxels": s.voxels, "ours_s": ours["latency"][s.name]["wall_s"],
                         "baseline_with_loading_s": result["baseline"][p][s.name]["with_loading_s"]
                         if s.name in result["baseline"].get(p, {}) else None,
                         "floor_s": result["floor"][p][s.name]["total_s"]} for s in lat_sizes]
        result["ratios"][p] = r


if __name__ == "__main__":
    sys.exit(main())
