"""Does batching tiles raise a sub-model replica's throughput? Measure it, don't assume it.

Cross-request batching (``@serve.batch``: tiles of several requests in one
forward pass) only pays if a batch of B tiles takes less than B times one
tile. This times the reference-architecture network (31M parameters, 128^3
tiles, ``loadtest.refmodels``) at several batch sizes on this machine and
writes tiles/s and the speed-up over batch 1::

    python -m loadtest.batching --tiles 4 --batch-sizes 1 2 4 --label cpu-2core

Results: ``loadtest/results/batching-<label>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from loadtest.floor import time_forward
from loadtest.refmodels import REFERENCE_SPEC

RESULTS = Path(__file__).resolve().parent / "results"


def reference_network(device):
    from serve.catalogue import load_catalogue
    from serve.inference.modelfolder import build_network, make_dataset_json, make_plans

    sm = load_catalogue().submodel("organs")
    plans = make_plans("Dataset850_reference", sm.spacing_mm, REFERENCE_SPEC)
    return build_network(plans, make_dataset_json(sm.labels)).to(device).eval()


def measure(tiles: int, batch_sizes: list[int], precision: str, device_name: str) -> dict:
    import torch

    device = torch.device(device_name)
    net = reference_network(device)
    patch = tuple(REFERENCE_SPEC.patch_size)
    rows = []
    for b in batch_sizes:
        n = max(tiles, b) // b * b  # whole batches only
        s = time_forward(net, n, patch, b, precision, device)
        rows.append({"batch_size": b, "tiles": n, "seconds": round(s, 3), "tiles_per_s": round(n / s, 4)})
    base = rows[0]["tiles_per_s"]
    for r in rows:
        r["speedup_vs_batch1"] = round(r["tiles_per_s"] / base, 3)
    from serve.inference.modelload import cpu_model_and_flags

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_and_flags()[0] or "cpu"
    return {"device": name,
            "torch_threads": torch.get_num_threads(), "precision": precision, "patch": list(patch),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}


def markdown(res: dict) -> str:
    out = [f"Batching on {res['device']} ({res['precision']}, {res['torch_threads']} torch threads, "
           f"tile {'x'.join(map(str, res['patch']))}, {res['measured_at']}):", "",
           "| batch size | tiles | seconds | tiles/s | speed-up vs batch 1 |", "|---|---|---|---|---|"]
    out += [f"| {r['batch_size']} | {r['tiles']} | {r['seconds']} | {r['tiles_per_s']} | {r['speedup_vs_batch1']} |"
            for r in res["rows"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=4, help="tiles per batch size (rounded to whole batches)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="cpu-2core")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    res = measure(args.tiles, sorted(set(args.batch_sizes)), args.precision, args.device)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"batching-{args.label}.json").write_text(json.dumps(res, indent=1))
    (RESULTS / f"batching-{args.label}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
