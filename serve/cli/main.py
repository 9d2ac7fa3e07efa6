"""``mriseg``: segment locally, manage model folders, run the demo.

Every subcommand is declared in :func:`build_parser`: the local ones here, the
others by the ``register(subparsers)`` of their module (``up`` and the cluster's
``demo``: :mod:`serve.cli.stack`; ``bulk``: :mod:`serve.cli.bulk`; ``records``:
:mod:`serve.jobs.records`). A handler takes the parsed ``argparse.Namespace``
and returns an exit code.

Errors a user can cause (:class:`serve.errors.MrisegError`) print one line on
stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from serve.cachedir import cache_root
from serve.cli import bulk, stack
from serve.demo import demo_volume, ensure_demo_models
from serve.errors import MrisegError
from serve.imaging.sandbox import decode_untrusted
from serve.imaging.nifti import write_nifti
from serve.inference.modelstore import import_totalseg_home
from serve.inference.pipeline import Segmenter
from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER, add_resampling_order_arg, check_resampling_order
from serve.jobs import records
from serve.outputs.summary import summary_table
from serve.outputs.writers import write_outputs
from serve.storage.models import open_model_store

log = logging.getLogger("mriseg")


def default_import_dir() -> Path:
    return cache_root() / "models" / "local"


def _model_sources(args) -> list[str]:
    """--models, else $MRISEG_MODELS, else imported weights, else the demo models."""
    if getattr(args, "models", None):
        return list(args.models)
    env = os.environ.get("MRISEG_MODELS")
    if env:
        return env.split(",")
    local = default_import_dir()
    if local.is_dir() and any(local.glob("Dataset*")):
        return [str(local)]

    return [str(ensure_demo_models())]


def _store(args):
    return open_model_store(_model_sources(args), cache_dir=getattr(args, "cache_dir", None),
                            pins=getattr(args, "model_pins", None))


def _progress_bar(total_hint: int = 1):
    bar = tqdm(total=total_hint, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)

    def progress(name: str, done: int, total: int) -> None:
        bar.total = total
        bar.set_description(name)
        bar.n = done
        bar.refresh()

    return bar, progress


def run_segment(input_path: str | Path, outdir: str | Path, *, sources: Sequence[str] | None = None,
                roi_subset: Sequence[str] | None = None, fast: bool = False, statistics: bool = True,
                preview: bool = True, multilabel: bool = True, per_structure: bool = False,
                device: str = "auto", threads: int | None = None, quiet: bool = False,
                model_pins: str | None = None, resampling_order: int | None = None) -> dict:
    """Read, segment and write; returns the written paths and the summary text.

    ``model_pins`` is the operator's pinned model manifest (default ``$MRISEG_MODEL_PINS``);
    ``resampling_order`` the input's spline order (TotalSegmentator's ``-ro``, 0..5; None: its default, 1).
    """
    resampling_order = check_resampling_order(DEFAULT_RESAMPLING_ORDER if resampling_order is None
                                              else resampling_order)
    try:  # before the work: an unwritable destination found after segmenting wastes it all
        Path(outdir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MrisegError(f"cannot create the output folder {outdir} ({e.strerror}); choose a writable one") from e
    # a scan from elsewhere is as hostile here as on the server: decoded in the sandbox, but a user's own
    # .mhd/.nhdr may keep its voxels beside it
    volume = decode_untrusted(input_path, self_contained=False)
    if sources is None:
        sources = [str(ensure_demo_models())]
    seg = Segmenter(open_model_store(list(sources), pins=model_pins), device=device, threads=threads)
    bar, progress = (None, None) if quiet else _progress_bar()
    try:
        result = seg.segment(volume, roi_subset=roi_subset, fast=fast, progress=progress,
                             resampling_order=resampling_order)
    finally:
        if bar is not None:
            bar.close()
    written = write_outputs(result, volume, outdir, multilabel=multilabel, per_structure=per_structure,
                            statistics=statistics, preview=preview, roi_subset=roi_subset)
    stats = None
    if "statistics" in written:
        stats = json.loads(Path(written["statistics"]).read_text())
    return {"written": written, "summary": summary_table(stats, result), "result": result}


# -- handlers -----------------------------------------------------------------

def cmd_segment(args) -> int:
    roi = args.roi_subset
    out = run_segment(args.input, args.output, sources=_model_sources(args), roi_subset=roi, fast=args.fast,
                      statistics=args.statistics, preview=args.preview, multilabel=True, per_structure=not args.ml,
                      device=args.device, threads=args.threads, quiet=args.quiet, model_pins=args.model_pins,
                      resampling_order=args.resampling_order)
    print(out["summary"])
    for kind, path in out["written"].items():
        print(f"{kind}: {path}")
    return 0


def cmd_models_list(args) -> int:
    store = _store(args)
    rows = store.status()
    w = max(len(r.submodel) for r in rows)
    print(f"{'sub-model':<{w}}  task  {'state':<10}  detail")
    for r in rows:
        detail = r.path or ""
        if r.detail:
            detail = f"{detail} ({r.detail})" if detail else r.detail
        if r.extra_labels:
            detail += f" [auxiliary labels dropped: {', '.join(r.extra_labels)}]"
        print(f"{r.submodel:<{w}}  {r.task_id:>4}  {r.state:<10}  {detail}")
    missing = [r for r in rows if r.state != "present" and r.submodel in {s.name for s in store.catalogue.submodels}]
    if missing:
        unavailable = [n for r in missing for n in store.catalogue.submodel(r.submodel).labels]
        print(f"{len(unavailable)} structure(s) unavailable: {', '.join(unavailable[:10])}"
              + (" ..." if len(unavailable) > 10 else ""))
    if args.require is not None:  # a gate (the k8s init container): staging that failed must stop the pod
        wanted = args.require or [s.name for s in store.catalogue.submodels]
        unknown = sorted(set(wanted) - {r.submodel for r in rows})
        if unknown:
            raise MrisegError(f"--require names unknown sub-model(s) {unknown}; known: "
                              f"{', '.join(r.submodel for r in rows)}")
        short = [r for r in rows if r.submodel in wanted and r.state != "present"]
        if short:
            print(f"required sub-model(s) not present: {', '.join(f'{r.submodel} ({r.state})' for r in short)}",
                  file=sys.stderr)
            return 1
    return 0


def cmd_models_import(args) -> int:
    dest = Path(args.dest).expanduser() if args.dest else default_import_dir()
    skipped: dict[str, str] = {}
    imported = import_totalseg_home(Path(args.totalseg_home), dest, link=args.link, skipped=skipped)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    if not imported:
        print(f"no usable TotalSegmentator MRI models found under {args.totalseg_home}/nnunet/results",
              file=sys.stderr)
        return 1
    print(f"imported {', '.join(imported)} into {dest}")
    print(f"use them with: mriseg segment --models {dest} ...")
    return 1 if skipped else 0


def cmd_demo(args) -> int:
    """Segment a synthetic phantom in-process and print the summary and preview path."""
    outdir = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="mriseg-demo-"))
    outdir.mkdir(parents=True, exist_ok=True)
    vol = demo_volume()
    src = write_nifti(outdir / "phantom.nii.gz", vol.data, vol.affine)
    out = run_segment(src, outdir / "result", sources=_model_sources(args), device=args.device,
                      threads=args.threads, quiet=args.quiet, model_pins=args.model_pins)
    print(out["summary"])
    print(f"preview: {out['written']['preview']}")
    print(f"outputs: {outdir / 'result'}")
    return 0


# -- parser ----------------------------------------------------------------------

def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", metavar="DIR_OR_S3",
                   help="model sources: local folders or s3://bucket/prefix holding DatasetNNN_* folders "
                        "(default: $MRISEG_MODELS, else the bundled demo models)")
    p.add_argument("--model-pins", metavar="FILE",
                   help="pinned model manifest (the mriseg-pins.json 'models import' writes) that every source's "
                        "checkpoints, plans.json and dataset.json must match; required for s3:// sources "
                        "(default: $MRISEG_MODEL_PINS, else a local folder's own mriseg-pins.json)")
    p.add_argument("--cache-dir", help="where S3 model folders are cached")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mriseg", description="MRI segmentation of 80 structures "
                                     "(TotalSegmentator MRI sub-models) served on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("segment", help="segment one volume locally (no cluster)")
    p.add_argument("-i", "--input", required=True, help="NIfTI, .mha/.nrrd, DICOM folder or zip")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--roi-subset", "--roi_subset", "-rs", dest="roi_subset", nargs="+", metavar="STRUCTURE",
                   help="only these structures (runs only the sub-models needed)")
    p.add_argument("--fast", action="store_true", help="3 mm model, structures 1-50 only")
    p.add_argument("--statistics", "-s", action="store_true",
                   help="write statistics.json (volume mm3, mean/std intensity, voxel count, QC flags)")
    p.add_argument("--preview", "-p", action="store_true", help="write preview.png")
    p.add_argument("--ml", action="store_true",
                   help="only the multilabel file, no per-structure files (TotalSegmentator's --ml)")
    p.add_argument("--device", "-d", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", "-nr", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_resampling_order_arg(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_segment)

    pm = sub.add_parser("models", help="list or import model folders")
    msub = pm.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True
    pl = msub.add_parser("list", help="present / missing / mismatched sub-models")
    pl.add_argument("--require", nargs="*", metavar="SUBMODEL",
                    help="exit 1 unless these sub-models (none named: the six) are present, e.g. to gate a pod")
    _add_model_args(pl)
    pl.set_defaults(func=cmd_models_list)
    pi = msub.add_parser("import", help="import weights downloaded by TotalSegmentator")
    pi.add_argument("--totalseg-home", required=True, help="TotalSegmentator's folder (usually ~/.totalsegmentator)")
    pi.add_argument("--dest", help="destination model folder (default $MRISEG_CACHE/models/local, "
                                   "else ~/.cache/mriseg/models/local)")
    pi.add_argument("--link", action="store_true", help="symlink instead of copying")
    pi.set_defaults(func=cmd_models_import)

    pd = sub.add_parser("demo", help="segment a synthetic phantom and show the result")
    pd.add_argument("-o", "--output", help="output folder (default: a new temporary folder)")
    pd.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    pd.add_argument("--threads", type=int, default=None)
    pd.add_argument("--quiet", "-q", action="store_true")
    _add_model_args(pd)
    pd.set_defaults(func=cmd_demo)

    stack.register(sub)  # after "demo": sends it through the running stack
    bulk.register(sub)
    records.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MrisegError as e:
        print(f"mriseg: error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mriseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
