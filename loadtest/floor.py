"""The compute floor: pure network-forward time for exactly the tiles a request needs.

For each sub-model, the number of sliding-window tiles is what nnU-Net's own
``compute_steps_for_sliding_window`` gives for the array the model's
predictor sees (nnU-Net's preprocessing of the 1.5 mm input: crop to
non-zero, then padding to at least one patch), with the model's tile step.
The floor runs that many forward passes through the same network, batched,
under the same precision, and nothing else: no preprocessing, no Gaussian
accumulation, no export, no transfers. ``end-to-end / floor`` is the serving
overhead.

On CPU a forward pass costs the same for every tile of a given shape, so with
``max_tiles`` set the floor times up to that many tiles per model and scales
by the exact tile count (the result says so: ``method``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class FloorResult:
    tiles: dict[str, int]                # sub-model -> tiles the request needs
    seconds: dict[str, float]            # sub-model -> forward seconds for those tiles
    timed_tiles: dict[str, int]          # tiles actually run (== tiles unless scaled)
    precision: str
    batch_size: int
    device: str
    method: dict[str, str] = field(default_factory=dict)  # "measured" | "per-tile rate x tiles"

    @property
    def total_s(self) -> float:
        return float(sum(self.seconds.values()))

    def to_dict(self) -> dict:
        return asdict(self) | {"total_s": self.total_s}


def preprocessed_shape(model, data_xyz: np.ndarray, spacing_mm: float) -> tuple[int, ...]:
    """Shape of the array ``model``'s sliding window sees for ``data_xyz`` (nnU-Net's own preprocessing)."""
    pm, cm = model.predictor.plans_manager, model.predictor.configuration_manager
    pre = cm.preprocessor_class(verbose=False)
    arr = np.ascontiguousarray(data_xyz.transpose(2, 1, 0), dtype=np.float32)[None]  # readers give (z, y, x)
    props = {"spacing": [float(spacing_mm)] * 3}
    data, _, _ = pre.run_case_npy(arr, None, props, pm, cm, model.predictor.dataset_json)
    return tuple(int(s) for s in data.shape[1:])


def tile_count(model, shape: tuple[int, ...]) -> int:
    """Tiles nnU-Net's sliding window runs on an array of ``shape`` (after padding to the patch)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    patch = model.predictor.configuration_manager.patch_size
    padded = [max(s, p) for s, p in zip(shape, patch)]
    steps = compute_steps_for_sliding_window(padded, patch, model.predictor.tile_step_size)
    return int(np.prod([len(s) for s in steps]))


def autocast_for(precision: str, device_type: str):
    """The autocast a served forward runs under. The ``fp32`` setting on CUDA is nnU-Net's fp16
    autocast, which its predictor enters for every CUDA forward; on the CPU it is plain float32."""
    import contextlib

    import torch

    if precision == "fp32":
        if device_type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type, dtype=dtype)


def time_forward(network, n_tiles: int, patch, batch_size: int, precision: str, device) -> float:
    """Seconds for ``n_tiles`` forward passes in batches of ``batch_size`` (one warm-up batch not counted)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast_for(precision, device.type):
        x = torch.randn((1, 1, *patch), generator=gen).to(device)
        network(x)  # warm-up: kernel selection, allocator
        sync()
        t = time.perf_counter()
        done = 0
        while done < n_tiles:
            b = min(batch_size, n_tiles - done)
            x = torch.randn((b, 1, *patch), generator=gen).to(device)
            network(x)
            done += b
        sync()
        return time.perf_counter() - t


def measure_floor(models: dict, shapes: dict[str, dict[str, tuple[int, ...]]], precision: str = "fp32",
                  batch_size: int = 2, max_tiles: int | None = None) -> dict[str, FloorResult]:
    """Forward-only time of every model over exactly its tiles, for each input in ``shapes``
    (input name -> sub-model -> shape from :func:`preprocessed_shape`).

    With ``max_tiles``, each model's per-tile rate is timed once on that many
    tiles and applied to every input's exact tile count.
    """
    counts = {inp: {n: tile_count(m, shp[n]) for n, m in models.items()} for inp, shp in shapes.items()}
    rates: dict[str, tuple[float, int]] = {}
    if max_tiles is not None:
        for n, m in models.items():
            p = m.predictor
            s = time_forward(p.network, max_tiles, tuple(p.configuration_manager.patch_size), batch_size,
                             precision, p.device)
            rates[n] = (s / max_tiles, max_tiles)
    out = {}
    for inp, tiles in counts.items():
        seconds, timed, method = {}, {}, {}
        for n, m in models.items():
            p = m.predictor
            if n in rates and rates[n][1] != tiles[n]:
                seconds[n], timed[n], method[n] = rates[n][0] * tiles[n], rates[n][1], "per-tile rate x tiles"
            elif n in rates:
                seconds[n], timed[n], method[n] = rates[n][0] * tiles[n], tiles[n], "measured"
            else:
                seconds[n] = time_forward(p.network, tiles[n], tuple(p.configuration_manager.patch_size),
                                          batch_size, precision, p.device)
                timed[n], method[n] = tiles[n], "measured"
        device = str(next(iter(models.values())).predictor.device)
        out[inp] = FloorResult(tiles, seconds, timed, precision, batch_size, device, method)
    return out
