"""Reference-architecture nnU-Net v2 models for the benchmark (random weights).

The six TotalSegmentator MRI sub-models (and the 3 mm fast model) at the size
of the real ones: PlainConvUNet, 6 stages, features 32..320, 3x3x3 kernels,
2 convs per stage, patch 128^3, ZScore. The weights are random, so the output
means nothing, but every convolution a real model runs is run here: the cost
is real. The folders are generated at benchmark time and never committed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from serve.catalogue import SubModel, load_catalogue
from serve.inference.modelfolder import UNetSpec, build_network, make_dataset_json, make_plans, write_model_folder

REFERENCE_SPEC = UNetSpec(
    features=(32, 64, 128, 256, 320, 320),
    patch_size=(128, 128, 128),
    n_conv_per_stage=2,
    kernel=3,
    strides=[[1, 1, 1]] + [[2, 2, 2]] * 5,
    normalization="ZScoreNormalization",
)
# A real TotalSegmentator MRI model has ~31M parameters; refuse anything far off.
EXPECTED_PARAMS = 31_000_000
PARAM_TOLERANCE = 0.05

DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".mriseg" / "refmodels"
_MARKER = ".refmodels.json"


def reference_submodels(include_fast: bool = True) -> list[SubModel]:
    """The catalogue's six sub-models, plus the fast 3 mm model when asked."""
    cat = load_catalogue()
    return list(cat.submodels) + (list(cat.fast_variants) if include_fast else [])


def count_parameters(sm: SubModel, spec: UNetSpec = REFERENCE_SPEC) -> int:
    """Parameter count of ``sm``'s network under ``spec`` (built by nnunetv2)."""
    plans = make_plans(f"{sm.folder_prefix}{sm.name}", sm.spacing_mm, spec, sm.configuration, sm.plans)
    net = build_network(plans, make_dataset_json(sm.labels), sm.configuration)
    return sum(p.numel() for p in net.parameters())


def _share_storage(folder: Path, sm: SubModel) -> None:
    """Re-save the checkpoint as nnU-Net does, from ``network.state_dict()``.

    PlainConvUNet's decoder keeps a reference to the encoder, so its state dict
    lists the encoder weights twice over shared storage; nnU-Net's own
    checkpoints store them once. A cloned state dict stores them twice (2.7x
    the bytes), which would inflate every model-load time we measure.
    """
    import torch

    path = folder / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    net = build_network(ckpt["init_args"]["plans"], ckpt["init_args"]["dataset_json"], sm.configuration)
    net.load_state_dict(ckpt["network_weights"])
    ckpt["network_weights"] = net.state_dict()
    torch.save(ckpt, path)


def _fingerprint(spec: UNetSpec, sms: list[SubModel]) -> str:
    blob = json.dumps({"arch": spec.arch_kwargs(), "patch": list(spec.patch_size),
                       "models": [(s.name, s.task_id, s.trainer, s.spacing_mm, list(s.labels)) for s in sms]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_reference_models(root: str | Path = DEFAULT_DIR, include_fast: bool = True,
                           spec: UNetSpec = REFERENCE_SPEC, check_size: bool = True,
                           force: bool = False) -> dict[str, int]:
    """Write the reference folders under ``root`` (reused if already there); return name -> parameter count."""
    root = Path(root)
    sms = reference_submodels(include_fast)
    marker = root / _MARKER
    fp = _fingerprint(spec, sms)
    if not force and marker.is_file():
        meta = json.loads(marker.read_text())
        if meta.get("fingerprint") == fp and all((root / f"{sm.folder_prefix}{sm.name}").is_dir() for sm in sms):
            return meta["parameters"]
    counts = {}
    for sm in sms:
        n = count_parameters(sm, spec)
        if check_size and abs(n - EXPECTED_PARAMS) > PARAM_TOLERANCE * EXPECTED_PARAMS:
            raise ValueError(f"{sm.name}: {n:,} parameters, expected about {EXPECTED_PARAMS:,}; "
                             f"the reference spec no longer matches a TotalSegmentator MRI model")
        # distinct seeds: six different networks, as in the real deployment
        folder = write_model_folder(root, sm, spec, seed=sm.task_id,
                                    description="mriseg-serve benchmark reference model: random weights")
        _share_storage(folder, sm)
        counts[sm.name] = n
    marker.write_text(json.dumps({"fingerprint": fp, "parameters": counts}, indent=1))
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_DIR), help="where to write the model folders")
    ap.add_argument("--no-fast", action="store_true", help="skip the 3 mm fast model (852)")
    ap.add_argument("--force", action="store_true", help="rewrite even if present")
    args = ap.parse_args(argv)
    counts = write_reference_models(args.out, include_fast=not args.no_fast, force=args.force)
    for name, n in counts.items():
        print(f"{name:24s} {n:,} parameters")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
