#!/usr/bin/env python
"""Train the seven demo models (six sub-models + the fast 3 mm one) on synthetic phantoms.

DEMO MODELS - NOT FOR CLINICAL USE. Usage:

    python scripts/train_demo_models.py --out serve/demo_models --budget 600

``--budget`` is the total training time in seconds, shared between the
models in proportion to how many labels they have.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from serve.catalogue import load_catalogue
from serve.modelload import configure_threads
from serve.phantoms import HELDOUT_SEEDS
from serve.training import (DEMO_DESCRIPTION, evaluate_heldout, make_cases, model_labels, report_markdown,
                            train_model)

WEIGHT = {"organs": 2.2, "muscles": 2.0, "thigh_shoulder_muscles": 1.6, "appendicular_bones": 1.3,
          "tissue_types": 0.8, "face": 0.5, "total_fast": 1.6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="serve/demo_models")
    ap.add_argument("--budget", type=float, default=600, help="total training seconds")
    ap.add_argument("--cases", type=int, default=24, help="training phantoms (seeds 0..N-1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="sub-model names to train (default all)")
    ap.add_argument("--evaluate", type=int, default=0, metavar="N",
                    help="after training (or with --budget 0: instead), report Dice on N held-out phantoms")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    configure_threads(args.threads)
    if args.budget > 0:
        train_all(args)
    if args.evaluate:
        t = time.time()
        report = evaluate_heldout(args.out, HELDOUT_SEEDS[:args.evaluate], threads=args.threads)
        print(report_markdown(report))
        print(f"(evaluated {args.evaluate} held-out phantoms in {time.time() - t:.0f}s)")
        Path(args.out, "heldout_dice.json").write_text(json.dumps(report, indent=1, sort_keys=True))


def train_all(args: argparse.Namespace) -> None:
    cat = load_catalogue()
    sms = [sm for sm in list(cat.submodels) + list(cat.fast_variants) if not args.only or sm.name in args.only]
    total_w = sum(WEIGHT.get(sm.name, 1.0) for sm in sms)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for spacing in sorted({sm.spacing_mm for sm in sms}):
        group = [sm for sm in sms if sm.spacing_mm == spacing]
        t = time.time()
        cases = make_cases(range(args.cases), spacing, group)
        logging.info("%d cases at %g mm in %.0fs", len(cases), spacing, time.time() - t)
        for sm in group:
            for old in out.glob(f"{sm.folder_prefix}*"):
                shutil.rmtree(old)
            secs = args.budget * WEIGHT.get(sm.name, 1.0) / total_w
            s = train_model(sm, cases, out, seconds=secs)
            s["labels"] = len(model_labels(sm))
            logging.info("trained %s", s)
            summary.append(s)
    (out / "DEMO_MODELS.json").write_text(json.dumps(
        {"notice": DEMO_DESCRIPTION, "kind": "trained-on-phantoms", "training_seeds": f"0..{args.cases - 1}",
         "models": summary}, indent=1))


if __name__ == "__main__":
    main()
