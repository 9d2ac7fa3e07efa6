#!/usr/bin/env python
"""Train the seven demo models (six sub-models + the fast 3 mm one) on synthetic phantoms.

DEMO MODELS - NOT FOR CLINICAL USE. Usage:

    python -m training.train_demo_models --out serve/demo_models --budget 600

``--budget`` is the total training time in seconds. The six 1.5 mm
sub-models train together (one shared trunk, one output head each; see
``training.train.train_models``) and get ``--fast-share`` less of it than the
budget; the 3 mm fast model trains on its own with the rest.

``--mirror-from DIR`` trains nothing: it writes DIR's models mirrored along the
network's left-right axis (``training.train.mirror_models``), their stride-2
kernels refitted on patches of the ``--cases`` training phantoms.

``--evaluate N`` reports Dice on N held-out (validation) phantoms, which pick
between candidate weights; ``--test`` reports it on the test phantoms
(``serve.phantoms.TEST_SEEDS``), for weights already picked.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from serve.catalogue import load_catalogue
from serve.evaluation import evaluate_heldout, report_markdown
from serve.inference.modelload import configure_threads, cpu_model_and_flags, pick_device
from serve.phantoms import HELDOUT_SEEDS, TEST_SEEDS, TRAIN_SEEDS
from training.train import (DEMO_SPEC, FAST_SPEC, SAMPLERS, compact_checkpoint, make_cases, mirror_models,
                            mirrored_record, model_labels, train_models, training_record)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="serve/demo_models")
    ap.add_argument("--budget", type=float, default=600, help="total training seconds")
    ap.add_argument("--cases", type=int, default=48, help="training phantoms (seeds F..F+N-1, F from --first-case)")
    ap.add_argument("--first-case", type=int, default=0, metavar="F",
                    help="seed of the first training phantom: a later stage can train on phantoms the trunk has "
                         "never seen without holding the earlier ones in memory too")
    ap.add_argument("--fast-share", type=float, default=0.15, help="share of the budget for the 3 mm fast model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1,
                    help="processes that build the training phantoms (the same phantoms, sooner on many cores)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast for the forward pass (default: on for CUDA, off for CPU; on a CPU with "
                         "AVX512_BF16 it trains about 1.6x faster)")
    ap.add_argument("--batch", type=int, default=2, help="patches per iteration (2 on CPU; more on a GPU)")
    ap.add_argument("--only", nargs="*", help="sub-model names to train (default all)")
    ap.add_argument("--sampler", choices=SAMPLERS, default="case",
                    help="patch centres: 'case' (nnU-Net's: a case, then one of its structures) or 'structure' "
                         "(a structure uniformly over the training set, then a case holding it)")
    ap.add_argument("--init-from", metavar="DIR",
                    help="continue from the demo model folders in DIR (same architecture), e.g. the committed ones")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (poly decay over the budget)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of patch sampling and augmentation (use a new one when continuing a training)")
    ap.add_argument("--save-every", type=float, default=900, metavar="S", help="write the model folders every S seconds")
    ap.add_argument("--mirror-from", metavar="DIR",
                    help="instead of training, write DIR's models mirrored along the network's left-right axis, "
                         "their stride-2 kernels refitted on patches of the --cases training phantoms")
    ap.add_argument("--patches", type=int, default=96, help="patches the --mirror-from refit sees")
    ap.add_argument("--evaluate", type=int, default=0, metavar="N",
                    help="after training (or with --budget 0: instead), report Dice on N held-out (validation) "
                         "phantoms, which pick between candidate weights")
    ap.add_argument("--test", action="store_true",
                    help="report Dice on the test phantoms (serve.phantoms.TEST_SEEDS), into test_dice.json: only "
                         "for weights already picked, never to pick them")
    args = ap.parse_args()
    last = args.first_case + args.cases - 1
    if args.first_case not in TRAIN_SEEDS or last not in TRAIN_SEEDS:
        ap.error(f"training phantoms {args.first_case}..{last} leave the training seeds "
                 f"{TRAIN_SEEDS[0]}..{TRAIN_SEEDS[-1]} (held-out and demo seeds lie above them); choose another "
                 f"--first-case or fewer --cases")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    configure_threads(args.threads)
    if args.mirror_from:
        mirror_all(args)
    elif args.budget > 0:
        train_all(args)
    for wanted, seeds, what, name in ((args.evaluate, HELDOUT_SEEDS[:args.evaluate], "held-out", "heldout_dice.json"),
                                      (args.test, TEST_SEEDS, "test", "test_dice.json")):
        if wanted:
            t = time.time()
            report = evaluate_heldout(args.out, seeds, threads=args.threads)
            print(report_markdown(report))
            print(f"(evaluated {len(seeds)} {what} phantoms in {time.time() - t:.0f}s)")
            Path(args.out, name).write_text(json.dumps(report, indent=1, sort_keys=True))


def train_all(args: argparse.Namespace) -> None:
    cat = load_catalogue()
    sms = [sm for sm in list(cat.submodels) + list(cat.fast_variants) if not args.only or sm.name in args.only]
    device = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init = None
    if args.init_from:  # a copy: the output folders are replaced before training starts
        init = Path(tempfile.mkdtemp(prefix="mriseg-init-"))
        shutil.copytree(args.init_from, init, dirs_exist_ok=True)
    summary = []
    spacings = sorted({sm.spacing_mm for sm in sms})
    for spacing in spacings:
        group = [sm for sm in sms if sm.spacing_mm == spacing]
        fast = all(sm.is_fast_variant for sm in group)
        share = args.fast_share if fast else 1 - args.fast_share
        secs = args.budget * (share if len(spacings) > 1 else 1.0)
        t = time.time()
        cases = make_cases(range(args.first_case, args.first_case + args.cases), spacing, group,
                           workers=args.workers)
        logging.info("%d cases at %g mm in %.0fs", len(cases), spacing, time.time() - t)
        for sm in group:
            for old in out.glob(f"{sm.folder_prefix}*"):
                shutil.rmtree(old)
        done = train_models(group, cases, out, seconds=secs, spec=FAST_SPEC if fast else DEMO_SPEC,
                            init_from=init, save_every_s=args.save_every, lr=args.lr, seed=args.seed,
                            batch=args.batch, device=str(device), bf16=args.bf16, sampler=args.sampler,
                            prefetch=4 if device.type == "cuda" else 0)
        for s in done:
            s["labels"] = len(model_labels(next(sm for sm in group if sm.name == s["model"])))
            logging.info("trained %s", s)
        summary.extend(done)
    if init is not None:
        shutil.rmtree(init)
    for ckpt in out.glob("Dataset*/*/fold_0/checkpoint_final.pth"):
        logging.info("%s: %d bytes", ckpt, compact_checkpoint(ckpt.parent.parent))
    record = out / "DEMO_MODELS.json"
    how = f"--budget {args.budget:g} --cases {args.cases} --lr {args.lr:g} --seed {args.seed}"
    if args.first_case:
        how = f"{how} --first-case {args.first_case}"
    if args.batch != 2 or device.type != "cpu":
        how = f"{how} --batch {args.batch} --device {device}"
    if args.bf16 is not None:
        how = f"{how} --{'' if args.bf16 else 'no-'}bf16"
    if args.sampler != "case":
        how = f"{how} --sampler {args.sampler}"
    if args.init_from:
        how = f"--init-from (previous stage) {how}"
    init_record = _read_record(Path(args.init_from, "DEMO_MODELS.json")) if args.init_from else None
    record.write_text(json.dumps(training_record(summary, how=how, cases=args.cases, first_case=args.first_case,
                                                 previous=_read_record(record), init=init_record,
                                                 machine=_machine(device, args.threads)),
                                 indent=1))


def mirror_all(args: argparse.Namespace) -> None:
    """``--mirror-from``: every model of ``args.mirror_from`` (or those of ``--only``) mirrored into ``--out``."""
    cat = load_catalogue()
    sms = [sm for sm in list(cat.submodels) + list(cat.fast_variants) if not args.only or sm.name in args.only]
    record = _read_record(Path(args.mirror_from, "DEMO_MODELS.json"))
    if record is None:
        raise SystemExit(f"{args.mirror_from} has no DEMO_MODELS.json: only recorded demo models are mirrored")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(tempfile.mkdtemp(prefix="mriseg-mirror-"))  # a copy: --out may be the same folder
    shutil.copytree(args.mirror_from, src, dirs_exist_ok=True)
    run = []
    for spacing in sorted({sm.spacing_mm for sm in sms}):
        group = [sm for sm in sms if sm.spacing_mm == spacing]
        fast = all(sm.is_fast_variant for sm in group)
        t = time.time()
        cases = make_cases(range(args.first_case, args.first_case + args.cases), spacing, group,
                           workers=args.workers)
        logging.info("%d cases at %g mm in %.0fs", len(cases), spacing, time.time() - t)
        for sm in group:
            for old in out.glob(f"{sm.folder_prefix}*"):
                shutil.rmtree(old)
        done = mirror_models(group, cases, out, init_from=src, spec=FAST_SPEC if fast else DEMO_SPEC,
                             patches=args.patches, seed=args.seed)
        for d in done:
            logging.info("mirrored %s: %s", d["model"], d["refit"])
        run.extend(done)
    for ckpt in out.glob("Dataset*/*/fold_0/checkpoint_final.pth"):
        logging.info("%s: %d bytes", ckpt, compact_checkpoint(ckpt.parent.parent))
    shutil.rmtree(src)
    how = (f"--mirror-from (previous stage) --cases {args.cases} --first-case {args.first_case} --patches "
           f"{args.patches} --seed {args.seed}: no training; every kernel flipped along the network's x "
           f"(left-right) axis for phantoms whose left and right were fixed, the stride-2 kernels moved one voxel "
           f"and refitted by least squares to the exact mirror on {args.patches} patches of training phantoms "
           f"{args.first_case}..{args.first_case + args.cases - 1}")
    previous = _read_record(out / "DEMO_MODELS.json")
    (out / "DEMO_MODELS.json").write_text(json.dumps(
        mirrored_record(record, run, how=how, machine=_machine(pick_device("cpu"), args.threads), previous=previous),
        indent=1))


def _machine(device, threads: int) -> str:
    """What a stage ran on, for its record: "2 CPU threads (AMD EPYC, AVX-512, AVX512_BF16)" or the GPU's name."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = cpu_model_and_flags()
    extras = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512_BF16"), ("amx_bf16", "AMX"))
              if flag in flags]
    return f"{threads} CPU thread{'s' if threads != 1 else ''} ({', '.join([model or 'unknown CPU', *extras])})"


def _read_record(path: Path) -> dict | None:
    """A ``DEMO_MODELS.json`` record, or None where there is none yet."""
    return json.loads(path.read_text()) if path.is_file() else None


if __name__ == "__main__":
    main()
