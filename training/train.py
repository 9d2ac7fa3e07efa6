"""Train the tiny demo models on synthetic phantoms (DEMO MODELS - NOT FOR CLINICAL USE).

Training data goes through exactly the inference path's preprocessing:
:func:`serve.inference.preprocess.prepare` (closest canonical, order-3 resampling to
the model spacing), labels through :func:`serve.inference.preprocess.prepare_labels_like`
(order 0), then nnU-Net's ZScoreNormalization (whole image, no mask), as the
plans written by :func:`serve.inference.modelfolder.make_plans` say. The network is
nnunetv2's own, built from those plans. Loss is cross-entropy + soft Dice
(nnU-Net's DC_and_CE) with deep supervision. No mirroring augmentation:
the models are lateralised (left/right labels) and the trainers are
``*_NoMirroring``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from serve.catalogue import SubModel, load_catalogue
from serve.inference.modelfolder import UNetSpec, build_network, make_dataset_json, make_plans, write_model_folder
from serve.phantoms import make_phantom
from serve.inference.preprocess import prepare, prepare_labels_like

log = logging.getLogger(__name__)

DEMO_DESCRIPTION = "DEMO MODEL trained on synthetic phantoms - NOT FOR CLINICAL USE"
# Patches are (z, y, x), the axis order nnU-Net's readers give the network:
# the full prepared cross-section (y, most of x) and 60 mm of z, so every
# patch shows the body outline and midline that left/right depends on.
DEMO_SPEC = UNetSpec(features=(16, 32, 64, 128), patch_size=(40, 56, 80))
FAST_SPEC = UNetSpec(features=(8, 16, 32, 64), patch_size=(48, 32, 48))


def model_labels(sm: SubModel) -> list[str]:
    """Local labels in order (the fast model predicts the labels of the models it replaces)."""
    if sm.is_fast_variant:
        cat = load_catalogue()
        return [n for name in sm.replaces for n in cat.submodel(name).labels]
    return list(sm.labels)


def global_to_local(sm: SubModel) -> np.ndarray:
    """A lookup table global id -> local id of ``sm`` (0 elsewhere)."""
    ids = load_catalogue().structure_ids
    lut = np.zeros(256, np.uint8)
    for i, n in enumerate(model_labels(sm), start=1):
        lut[ids[n]] = i
    return lut


def zscore(data: np.ndarray) -> np.ndarray:
    """nnU-Net's ZScoreNormalization without a mask."""
    d = data.astype(np.float32)
    return (d - d.mean()) / max(float(d.std()), 1e-8)


@dataclass
class Case:
    image: np.ndarray               # normalised, canonical, model spacing, (z, y, x)
    labels: dict[str, np.ndarray]   # sub-model name -> local ids, (z, y, x)
    voxels: dict[int, np.ndarray]   # global id -> flat indices (int32) of its voxels, for class-balanced sampling


def make_cases(seeds: Sequence[int], spacing_mm: float, submodels: Sequence[SubModel],
               workers: int = 1) -> list[Case]:
    """Phantoms preprocessed exactly as inference does, with each sub-model's local labels.

    Arrays are transposed to (z, y, x): ``serve.inference.predict`` hands the network
    its input in that order, as every nnU-Net v2 reader does. ``workers`` > 1
    builds the phantoms in that many processes, in seed order all the same.
    """
    seeds = list(seeds)
    if workers > 1 and len(seeds) > 1:
        import multiprocessing
        from functools import partial

        # spawn, not fork: the parent may already run torch's thread pools
        with multiprocessing.get_context("spawn").Pool(min(workers, len(seeds))) as pool:
            return pool.map(partial(make_case, spacing_mm=spacing_mm, submodels=list(submodels)), seeds,
                            chunksize=max(1, len(seeds) // (8 * workers)))
    return [make_case(seed, spacing_mm, submodels) for seed in seeds]


def make_case(seed: int, spacing_mm: float, submodels: Sequence[SubModel]) -> Case:
    """One phantom as :func:`make_cases` prepares it."""
    ph = make_phantom(seed)
    prep = prepare(ph.volume, spacing_mm)
    labels, voxels = {}, {}
    for sm in submodels:
        parts = sm.replaces or (sm.name,)
        glob = np.zeros(ph.truth.shape, np.uint8)
        for p in parts:  # models are disjoint in structures; the fast one takes organs + muscles
            m = ph.truth_per_model[p]
            glob = np.where(m > 0, m, glob)
        glob = np.ascontiguousarray(prepare_labels_like(glob, prep.grid, spacing_mm).transpose(2, 1, 0))
        labels[sm.name] = global_to_local(sm)[glob]
        flat = glob.ravel()
        order = np.argsort(flat, kind="stable")
        ids, starts = np.unique(flat[order], return_index=True)
        for gid, lo, hi in zip(ids, starts, [*starts[1:], flat.size]):
            if gid:  # a copy: a slice would keep the whole argsort (every voxel, int64) alive per model
                voxels[int(gid)] = order[lo:hi].astype(np.int32)
    image = np.ascontiguousarray(zscore(prep.data).transpose(2, 1, 0))
    return Case(image, labels, voxels)


SAMPLERS = ("case", "structure")


class PatchSampler:
    """Which case, and which structure's voxel, each training patch is centred on.

    Both samplers centre 2/3 of the patches on a voxel of a structure and put
    the rest anywhere. ``"case"`` is nnU-Net's: a case drawn uniformly, then a
    structure present in it. ``"structure"`` draws the structure first,
    uniformly over every structure of the training set, then a case holding
    it, so a structure found in few cases (the phalanges are in the field of
    view of about a quarter of the phantoms) is centred on as often as one
    found in all of them.
    """

    def __init__(self, cases: Sequence[Case], kind: str = "case", foreground: float = 0.67):
        if kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {kind!r}: use one of {', '.join(SAMPLERS)}")
        self.cases, self.kind, self.foreground = list(cases), kind, foreground
        holders: dict[int, list[int]] = {}
        for i, case in enumerate(self.cases):
            for gid in case.voxels:
                holders.setdefault(gid, []).append(i)
        self.holders = {gid: np.array(idx) for gid, idx in sorted(holders.items())}

    def draw(self, rng: np.random.Generator) -> tuple[Case, int | None]:
        """A case and the global id of the structure to centre on (None: anywhere)."""
        if self.kind == "structure":
            if rng.random() < self.foreground and self.holders:
                gids = list(self.holders)
                gid = gids[rng.integers(len(gids))]
                idx = self.holders[gid]
                return self.cases[int(idx[rng.integers(len(idx))])], gid
            return self.cases[rng.integers(len(self.cases))], None
        case = self.cases[rng.integers(len(self.cases))]  # the draws in the order stages 1-10 were trained with
        if rng.random() < self.foreground and case.voxels:
            ids = list(case.voxels)
            return case, ids[rng.integers(len(ids))]
        return case, None


def _crop(case: Case, names: Sequence[str], patch, rng: np.random.Generator, structure: int | None = None):
    """A patch centred near a random voxel of ``structure`` (jittered by up to a quarter patch), or anywhere."""
    img = case.image
    shape = img.shape
    pad = [(0, max(0, p - s)) for p, s in zip(patch, shape)]
    labs = [case.labels[n] for n in names]
    if structure is not None:
        vox = case.voxels[structure]
        centre = np.unravel_index(int(vox[rng.integers(len(vox))]), shape)
        centre = [int(c) + int(rng.integers(-p // 4, p // 4 + 1)) for c, p in zip(centre, patch)]
    else:
        centre = [int(rng.integers(s)) for s in shape]
    if any(p[1] for p in pad):
        img = np.pad(img, pad, constant_values=float(img.min()))
        labs = [np.pad(lab, pad) for lab in labs]
    start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, img.shape)]
    sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
    return img[sl], [lab[sl] for lab in labs]


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensity-only augmentation (no mirroring: the models are lateralised)."""
    lo, hi = float(x.min()), float(x.max())
    if rng.random() < 0.3:  # gamma, as nnU-Net's GammaTransform, sometimes on the inverted image
        inv = rng.random() < 0.15
        u = (hi - x) if inv else (x - lo)
        u = (u / max(hi - lo, 1e-6)) ** float(rng.uniform(0.7, 1.5)) * (hi - lo)
        x = (hi - u) if inv else (u + lo)
    x = x * float(rng.uniform(0.85, 1.15)) + float(rng.normal(0, 0.1))
    if rng.random() < 0.2:
        x = x + rng.normal(0, float(rng.uniform(0, 0.1)), x.shape).astype(np.float32)
    return x.astype(np.float32)


def _heads(submodels: Sequence[SubModel]) -> list[tuple[str, int, int]]:
    """(name, first channel, number of channels incl. background) of each sub-model's output head."""
    heads, c = [], 0
    for sm in submodels:
        n = len(model_labels(sm)) + 1
        heads.append((sm.name, c, n))
        c += n
    return heads


def train_models(submodels: Sequence[SubModel], cases: list[Case], out_root: Path, *, seconds: float,
                 spec: UNetSpec = DEMO_SPEC, max_iters: int = 1_000_000, seed: int = 0, lr: float = 3e-3,
                 batch: int = 2, save_every_s: float = 900, init_from: str | Path | None = None,
                 log_every: int = 50, device: str = "cpu", bf16: bool | None = None,
                 sampler: str = "case", prefetch: int = 0) -> list[dict]:
    """Train the sub-models of one spacing together and write one nnU-Net folder each.

    Multi-task training: one PlainConvUNet trunk whose final 1x1x1
    segmentation convolution has one block of output channels per sub-model
    (background + its labels, softmax within the block). Each exported model
    is nnU-Net's own network for its plans, holding the shared trunk weights
    and its own block of the segmentation layer. Sharing the trunk costs one
    forward/backward pass per patch for all six instead of six, which is what
    makes CPU training of the demo models feasible.

    Deep supervision as nnU-Net trains: every decoder stage's output gets the
    loss against the labels downsampled (nearest) to its resolution, weighted
    1/2^i. ``init_from`` (a folder of model folders written by this function
    with the same ``spec``) continues from those weights.

    ``device`` is where the network trains ("cpu", "cuda", "cuda:1"). ``bf16``
    runs the forward pass under bf16 autocast (the loss stays float32); the
    default is on for CUDA, off for CPU, where it pays only on processors with
    bf16 instructions (AVX512_BF16, AMX). Patches are always cut and augmented
    on the CPU; ``prefetch`` > 0 cuts that many batches ahead in a background
    thread, the same batches in the same order (for a GPU, which would
    otherwise wait for them). ``sampler`` picks the patch centres (see
    ``PatchSampler``).
    """
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    draws = PatchSampler(cases, sampler)
    heads, n_out, plans, net = _joint_trunk(submodels, spec)
    widened_from = _load_or_widen(net, submodels, init_from, spec, plans, n_out) if init_from is not None else None
    dev = torch.device(device)
    bf16 = dev.type == "cuda" if bf16 is None else bf16
    if dev.type == "cuda":  # fixed patch shapes: let cuDNN pick its fastest 3D convolutions once
        torch.backends.cudnn.benchmark = True
    # channels-last convolutions are about 25 % faster on CPU (oneDNN)
    net = net.to(dev, memory_format=torch.channels_last_3d)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    patch = tuple(spec.patch_size)
    names = [sm.name for sm in submodels]
    n_scales = len(spec.features) - 1
    ds_weights = np.array([1 / 2 ** i for i in range(n_scales)])
    ds_weights = ds_weights / ds_weights.sum()
    t0 = last_save = time.time()
    it = 0
    losses: list[float] = []

    def save() -> list[dict]:
        net.eval()
        out = []
        for sm, (name, c0, n) in zip(submodels, heads):
            state = _head_state(net.state_dict(), c0, n)
            write_model_folder(out_root, sm, spec, labels=model_labels(sm), state_dict=state,
                               description=DEMO_DESCRIPTION, epochs=it)
            out.append({"model": name, "iterations": it, "seconds": round(time.time() - t0, 1),
                        "final_loss": float(np.mean(losses[-100:])) if losses else None,
                        "trained_with": names}
                       | ({"widened_from": list(widened_from), "widened_to": list(spec.features)}
                          if widened_from else {}))
        net.train()
        return out

    batches = _batches(draws, names, patch, batch, rng)
    if prefetch:
        batches = _prefetched(batches, prefetch)
    while it < max_iters and time.time() - t0 < seconds:
        xb, yb = next(batches)
        x = torch.from_numpy(xb).to(dev, memory_format=torch.channels_last_3d)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = net(x)
        loss = torch.zeros((), device=dev)
        for h, (name, c0, n) in enumerate(heads):
            y = torch.from_numpy(yb[h]).to(dev).long()  # uint8 over the bus, a quarter of int64's bytes
            for s, (w, lg) in enumerate(zip(ds_weights, outputs)):
                ys_ = y[:, ::2 ** s, ::2 ** s, ::2 ** s]  # nearest downsampling to the stage's grid
                loss = loss + float(w) * _ce_dice(lg[:, c0:c0 + n], ys_, n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
        for g in opt.param_groups:  # poly decay over the time budget
            g["lr"] = lr * max(0.02, 1 - (time.time() - t0) / seconds) ** 0.9
        losses.append(loss.item() / len(heads))
        it += 1
        if it % log_every == 0:
            log.info("%s it %d loss %.3f (%.0fs)", "+".join(names), it, np.mean(losses[-log_every:]),
                     time.time() - t0)
        if time.time() - last_save > save_every_s:
            save()
            last_save = time.time()
    batches.close()
    return save()


def _batches(draws: PatchSampler, names: Sequence[str], patch, batch: int, rng: np.random.Generator):
    """Endless training batches: images (batch, 1, z, y, x) float32, and per head labels (batch, z, y, x) uint8."""
    while True:
        xs, ys = [], []
        for _ in range(batch):
            case, structure = draws.draw(rng)
            x, labs = _crop(case, names, patch, rng, structure)
            xs.append(_augment(x, rng))
            ys.append(labs)
        yield np.stack(xs)[:, None], [np.stack([b[h] for b in ys]) for h in range(len(names))]


def _prefetched(source, depth: int):
    """``source``'s items, made ``depth`` ahead in a background thread (so a GPU is not kept waiting for
    the CPU's patch cutting); the same items in the same order. Closing it stops the thread."""
    import queue
    import threading

    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def fill() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        items.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            items.put((None, exc))

    threading.Thread(target=fill, name="patch-prefetch", daemon=True).start()
    try:
        while True:
            item, exc = items.get()
            if exc is not None:
                raise exc
            yield item
    finally:
        stop.set()


def _ce_dice(logits, y, n: int):
    """Cross-entropy + (1 - batch soft Dice over the foreground classes present), nnU-Net's DC_and_CE.

    The Dice terms come from a gather and per-class sums rather than a one-hot
    target: the same numbers at a fraction of the memory traffic on CPU.
    """
    import torch

    logp = torch.log_softmax(logits.contiguous().float(), 1)
    ce = torch.nn.functional.nll_loss(logp, y)
    prob = logp.exp()
    flat = y.reshape(-1)
    hit = prob.gather(1, y[:, None]).reshape(-1)  # each voxel's probability of its true class
    zeros = torch.zeros(n, dtype=prob.dtype, device=prob.device)
    # scatter_add, not bincount, for the counts: bincount on CUDA reads the labels' maximum back to the host
    counts = zeros.scatter_add(0, flat, torch.ones_like(hit))[1:]
    inter = zeros.scatter_add(0, flat, hit)[1:]
    denom = prob.sum((0, 2, 3, 4))[1:] + counts
    present = (counts > 0).to(prob.dtype)  # batch Dice; classes absent from the batch are left out
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    # a weighted mean, not dice[present]: boolean indexing would wait for the GPU once per head and iteration
    return ce + ((1 - dice) * present).sum() / present.sum().clamp(min=1)


def _joint_trunk(submodels, spec):
    """The shared trunk of ``submodels`` (heads, output channels, plans of the first, the network), untrained;
    training and mirroring build it alike."""
    heads = _heads(submodels)
    n_out = sum(n for _, _, n in heads)
    first = submodels[0]
    plans = make_plans(f"{first.folder_prefix}{first.name}", first.spacing_mm, spec, first.configuration,
                       first.plans)
    return heads, n_out, plans, _trunk(plans, n_out)


def _trunk(plans: dict, n_out: int):
    """The shared multi-head training network: ``n_out`` output channels (all heads), deep supervision on."""
    return build_network(plans, make_dataset_json([f"c{i}" for i in range(1, n_out)]), deep_supervision=True)


def _load_or_widen(net, submodels: Sequence[SubModel], init_from: str | Path, spec: UNetSpec, plans: dict,
                   n_out: int) -> tuple[int, ...] | None:
    """Load the trunk saved in ``init_from``; a narrower one (fewer features per stage) is widened
    into ``net`` without changing what it computes (``training.widen``).

    Returns the narrower trunk's features per stage where it widened, else None.
    """
    import json
    from dataclasses import replace

    from training.widen import widen_into

    state = _joined_state(submodels, init_from)
    first = submodels[0]
    src_plans = next(Path(init_from).glob(f"{first.folder_prefix}{first.name}/*/plans.json"))
    src = json.loads(src_plans.read_text())["configurations"][first.configuration]["architecture"]
    features = tuple(src["arch_kwargs"]["features_per_stage"])
    if features == tuple(spec.features):
        net.load_state_dict(state)
        log.info("continuing from the models in %s", init_from)
        return None
    narrow_plans = make_plans(plans["dataset_name"], first.spacing_mm, replace(spec, features=features),
                              first.configuration, first.plans)
    narrow = _trunk(narrow_plans, n_out)
    narrow.load_state_dict(state)
    widen_into(narrow, net)
    log.info("continuing from the models in %s, widened from features %s to %s", init_from, list(features),
             list(spec.features))
    return features


def _joined_state(submodels: Sequence[SubModel], root: str | Path) -> dict:
    """Rebuild the multi-head trunk's weights from the per-sub-model folders that ``train_models`` wrote."""
    import torch

    states = []
    for sm in submodels:
        ckpt = next(Path(root).glob(f"{sm.folder_prefix}{sm.name}/*/fold_0/checkpoint_final.pth"), None)
        if ckpt is None:
            raise FileNotFoundError(f"no {sm.folder_prefix}{sm.name}/*/fold_0/checkpoint_final.pth under {root}: "
                                    "--init-from needs a folder with every sub-model being trained "
                                    "(e.g. serve/demo_models)")
        states.append(torch.load(ckpt, map_location="cpu", weights_only=False)["network_weights"])
    out = {}
    for k, v in states[0].items():
        v = torch.cat([s[k] for s in states]) if ".seg_layers." in k else v
        out[k] = v.float() if v.is_floating_point() else v
    return out


def _head_state(state: dict, c0: int, n: int) -> dict:
    """The trunk's weights with the segmentation layers cut to one head's channels."""
    out = {}
    for k, v in state.items():
        # a slice keeps the whole storage alive (torch.save would write all of it); the trunk stays shared.
        # Checkpoints hold CPU tensors wherever the network trained.
        out[k] = v[c0:c0 + n].detach().cpu().clone() if ".seg_layers." in k else v.detach().cpu()
    return out


def compact_checkpoint(trainer_folder: str | Path, fold: str = "0") -> int:
    """Store a demo checkpoint's weights as float16, each shared tensor once; returns the new size.

    Keeps the repository small. nnU-Net loads the weights with
    ``load_state_dict``, which copies them into its float32 parameters.
    """
    import json

    import torch

    folder = Path(trainer_folder)
    path = folder / f"fold_{fold}" / "checkpoint_final.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    net = build_network(plans, dataset_json)
    net.load_state_dict(ckpt["network_weights"])
    # the decoder holds the encoder, so the state dict names those tensors twice; convert each once
    memo: dict[int, object] = {}
    weights = {}
    for k, v in net.state_dict().items():
        if v.is_floating_point():
            v = memo.setdefault(v.data_ptr(), v.detach().to(torch.float16))
        weights[k] = v
    ckpt["network_weights"] = weights
    torch.save(ckpt, path)
    return path.stat().st_size


# -- mirroring trained weights --------------------------------------------------
#: The axis of the network's spatial input (z, y, x) along which the patient's left and right lie. The
#: network sees the closest-canonical (RAS) array transposed to (z, y, x), both in training
#: (:func:`make_case`) and at inference (``serve.inference.predict``), so world x is its last axis; a test finds
#: it from a phantom's left and right structures.
NETWORK_LR_AXIS = 2


def mirror_kernels_(net, axis: int = NETWORK_LR_AXIS) -> None:
    """Flip every convolution and transposed convolution kernel of ``net`` along spatial ``axis``, in place.

    Where every convolution has stride 1, the flipped network computes on a
    mirrored input exactly what ``net`` computes on the input, mirrored
    (instance norm, nonlinearities and 1x1x1 layers commute with the mirror
    anyway). nnU-Net's U-Net is not such a network: a stride-2 convolution
    samples even voxels, centred on them, and its transposed convolution
    spreads voxel ``i`` over ``2i`` and ``2i + 1``; the mirror turns both
    into the other parity, so flipping alone puts each coarser level's
    features one voxel of the finer level off (about 0.55 of the foreground
    right on demo phantom patches, against 0.82 for the exact mirror).
    :func:`mirror_network` adds what fixes that.

    Args:
        net: A torch network whose convolutions are ``torch.nn`` 3D (transposed) convolutions.
        axis: The spatial axis (0, 1, 2 of the input's (z, y, x)) to mirror along.
    """
    import torch

    _check_axis(axis)
    # modules() visits a module once, though PlainConvUNet's decoder holds the encoder too
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            with torch.no_grad():  # weight dims: (out or in, in or out, z, y, x)
                m.weight.copy_(m.weight.flip(2 + axis))


def _check_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be a spatial axis 0, 1 or 2 of (z, y, x), not {axis!r}")


def _strided_convs(net, axis: int) -> list:
    """The convolutions of ``net`` with stride 2 along ``axis``, in forward order (encoder stages 1..n-1)."""
    import torch

    out = []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv3d) and m.stride[axis] == 2:
            if m.kernel_size[axis] != 3 or m.padding[axis] != 1:
                raise ValueError(f"{name}: mirroring handles stride-2 convolutions of kernel 3 and padding 1, "
                                 f"not kernel {m.kernel_size} padding {m.padding}")
            out.append(m)
    return out


def mirror_network(net, patches: np.ndarray, axis: int = NETWORK_LR_AXIS, batch: int = 4,
                   max_rows: int = 400_000, seed: int = 0) -> tuple[object, list[dict]]:
    """A copy of ``net`` that computes on a mirrored input what ``net`` computes on the input, mirrored.

    Three steps. (1) Every kernel is flipped along ``axis`` (:func:`mirror_kernels_`):
    exact for every layer but the stride-2 convolutions. (2) Each stride-2 kernel is
    moved one voxel toward the high end of ``axis``, so that it samples the voxels
    the exact mirror samples (offsets 0..2 of the even output voxel rather than
    -1..1); its third tap, which the 3-voxel kernel cannot reach, is added to the
    second. (3) Those stride-2 convolutions alone, in forward order, are refitted by
    least squares (ridge toward step 2's weights) so that their outputs on
    ``patches`` match the exact mirror's: ``net``'s outputs for the mirrored patches,
    mirrored back. Nothing else is fitted; no loss is trained.

    Label channels stay as they are: a ``_left`` output keeps following the structure
    it learned, which the mirror carries to the other side.

    Args:
        net: An nnU-Net PlainConvUNet (3x3x3 kernels, stride-2 downsampling), any number of output channels.
        patches: Network inputs (n, 1, z, y, x), float32, e.g. training patches: the fit's data.
        axis: The spatial axis to mirror along (default: the patient's left-right).
        batch: Patches per forward pass.
        max_rows: Output voxels (rows of the least-squares problem) drawn per layer at most.
        seed: Seed of that draw.

    Returns:
        The mirrored network (in eval mode) and, per refitted layer, its mean squared error against
        the exact mirror's output before and after the fit and that output's variance.
    """
    import copy

    import torch

    _check_axis(axis)
    old = copy.deepcopy(net).eval()
    new = copy.deepcopy(net).eval()
    mirror_kernels_(new, axis)
    d = 2 + axis
    for conv in _strided_convs(new, axis):
        with torch.no_grad():
            f = conv.weight.clone()
            w = torch.zeros_like(f)
            w.narrow(d, 1, 1).copy_(f.narrow(d, 0, 1))
            w.narrow(d, 2, 1).copy_(f.narrow(d, 1, 1) + f.narrow(d, 2, 1))
            conv.weight.copy_(w)
    x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32))
    rng = np.random.default_rng(seed)
    fits = []
    for conv_old, conv_new in zip(_strided_convs(old, axis), _strided_convs(new, axis)):
        fits.append(_refit(conv_new, conv_old, old, new, x, axis, batch, max_rows, rng))
    return new, fits


def _refit(conv_new, conv_old, old, new, x, axis: int, batch: int, max_rows: int, rng: np.random.Generator) -> dict:
    """Least-squares refit of ``conv_new`` (see :func:`mirror_network`): accumulates the normal equations
    over batches of ``x`` in float64 and solves them with a small ridge toward the current weights."""
    import torch

    def grab(net, module, inputs, what: str):
        box = []
        hook = module.register_forward_hook(lambda m, i, o: box.append(i[0] if what == "in" else o))
        try:
            net(inputs)
        finally:
            hook.remove()
        return box[0].float()

    cout = conv_new.weight.shape[0]
    k, s, pad = conv_new.kernel_size, conv_new.stride, conv_new.padding
    w0 = torch.cat([conv_new.weight.detach().reshape(cout, -1), conv_new.bias.detach()[:, None]], 1).double().T
    n_feat = w0.shape[0]
    xtx = torch.zeros(n_feat, n_feat, dtype=torch.float64)
    xty = torch.zeros(n_feat, cout, dtype=torch.float64)
    yy = ysum = rows_seen = 0.0
    per_batch = max(1, max_rows // max(1, -(-len(x) // batch)))
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            # the exact mirror's output of this layer: the original network on the mirrored input, mirrored back
            target = grab(old, conv_old, xb.flip(2 + axis), "out").flip(2 + axis)
            inp = grab(new, conv_new, xb, "in")
            cols = torch.nn.functional.pad(inp, (pad[2], pad[2], pad[1], pad[1], pad[0], pad[0]))
            cols = cols.unfold(2, k[0], s[0]).unfold(3, k[1], s[1]).unfold(4, k[2], s[2])  # b c z y x kz ky kx
            cols = cols.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, n_feat - 1)
            y = target.permute(0, 2, 3, 4, 1).reshape(-1, cout)
            if len(cols) > per_batch:
                pick = torch.from_numpy(rng.choice(len(cols), per_batch, replace=False))
                cols, y = cols[pick], y[pick]
            a = torch.cat([cols, torch.ones(len(cols), 1)], 1)
            xtx += (a.T @ a).double()
            xty += (a.T @ y).double()
            yy += float((y.double() ** 2).sum())
            ysum += float(y.double().sum())
            rows_seen += len(y)
    ridge = 1e-3 * float(xtx.diagonal().mean())
    sol = torch.linalg.solve(xtx + ridge * torch.eye(n_feat, dtype=torch.float64), xty + ridge * w0)

    def mse(w):  # the mean squared error from the normal equations: (w'X'Xw - 2 w'X'y + y'y) / (rows * cout)
        return float(((w * (xtx @ w)).sum() - 2 * (w * xty).sum() + yy) / (rows_seen * cout))

    with torch.no_grad():
        conv_new.weight.copy_(sol[:-1].T.reshape(conv_new.weight.shape).float())
        conv_new.bias.copy_(sol[-1].float())
    var = yy / (rows_seen * cout) - (ysum / (rows_seen * cout)) ** 2
    return {"mse_before": mse(w0), "mse_after": mse(sol), "target_variance": var, "rows": int(rows_seen)}


def mirror_models(submodels: Sequence[SubModel], cases: list[Case], out_root: Path, *, init_from: str | Path,
                  spec: UNetSpec = DEMO_SPEC, patches: int = 96, seed: int = 0,
                  axis: int = NETWORK_LR_AXIS) -> list[dict]:
    """Write the demo models in ``init_from`` mirrored along the network's left-right axis into ``out_root``.

    The sub-models of one spacing share one trunk (:func:`train_models`); it is
    rejoined from their folders, mirrored by :func:`mirror_network` with
    ``patches`` training patches cut from ``cases`` (as training cuts them, without
    augmentation), and each model is exported with its own head again.

    Args:
        submodels: The sub-models of one spacing that ``init_from`` holds, trained together.
        cases: Training phantoms (:func:`make_cases`) for the refit's patches.
        out_root: Where to write the model folders.
        init_from: The folder of the models to mirror (e.g. ``serve/demo_models``).
        spec: Their architecture.
        patches: How many patches the refit sees.
        seed: Seed of the patch draw.
        axis: The network's spatial axis to mirror along.

    Returns:
        One entry per model, as :func:`train_models` returns them, with the refit's
        per-layer errors under ``"refit"``.
    """
    t0 = time.time()
    heads, n_out, plans, net = _joint_trunk(submodels, spec)
    net.load_state_dict(_joined_state(submodels, init_from))
    rng = np.random.default_rng(seed)
    draws = PatchSampler(cases)
    names = [sm.name for sm in submodels]
    xs = []
    for _ in range(patches):
        case, structure = draws.draw(rng)
        xs.append(_crop(case, names, tuple(spec.patch_size), rng, structure)[0])
    mirrored, fits = mirror_network(net, np.stack(xs)[:, None], axis=axis, seed=seed)
    state = mirrored.state_dict()
    out = []
    for sm, (name, c0, n) in zip(submodels, heads):
        write_model_folder(out_root, sm, spec, labels=model_labels(sm), state_dict=_head_state(state, c0, n),
                           description=DEMO_DESCRIPTION)
        out.append({"model": name, "iterations": 0, "seconds": round(time.time() - t0, 1), "final_loss": None,
                    "trained_with": names, "refit": fits})
    return out


def mirrored_record(record: dict, run: Sequence[dict], *, how: str, machine: str | None = None,
                    previous: dict | None = None) -> dict:
    """The ``DEMO_MODELS.json`` record after :func:`mirror_models`: the mirroring appended as a stage.

    Args:
        record: The record of the models that were mirrored.
        run: What :func:`mirror_models` returned, one entry per model mirrored.
        how: What was done, for the new stage's ``how``.
        machine: What it ran on.
        previous: The record already in the output folder: models not mirrored keep their entries from it.

    Returns:
        A new record of the mirrored models (and the kept ones). The stage has no iterations; each
        model's iteration total and ``final_loss`` (that of its last training) stay, and the stage
        keeps the refit's errors.
    """
    import copy

    done = {r["model"]: r for r in run}
    models = []
    for m in copy.deepcopy(record).get("models", []):
        r = done.get(m["model"])
        if r is None:
            continue
        stage = {"iterations": 0, "seconds": r["seconds"], "final_loss": None, "how": how,
                 "refit": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in f.items()}
                           for f in r["refit"]]}
        m.setdefault("stages", []).append(stage | ({"machine": machine} if machine else {}))
        m["seconds"] = round(m.get("seconds", 0) + r["seconds"], 1)
        models.append(m)
    kept = [m for m in (previous or {}).get("models", []) if m["model"] not in done]
    return {**{k: v for k, v in record.items() if k != "models"}, "models": models + kept}


# -- held-out evaluation ------------------------------------------------------
def training_record(run: Sequence[dict], *, how: str, cases: int, first_case: int = 0,
                    previous: dict | None = None, init: dict | None = None, machine: str | None = None) -> dict:
    """The ``DEMO_MODELS.json`` record after a training run.

    ``run`` is what :func:`train_models` returned (one entry per model, this
    run's iterations and seconds). ``previous`` is the record already in the
    output folder: models this run did not train keep their entries from it.
    ``init`` is the record of the ``--init-from`` folder: a continued model
    keeps its earlier stages, gets this run appended as a new stage, and its
    ``iterations``/``seconds`` become the totals over all stages, so the
    record always says how much training the committed weights have had.
    A run that widened its starting trunk (``training.widen``) says so in its
    stage's ``how``; ``machine`` (what it ran on) goes into the stage too.
    """
    earlier = {m["model"]: m for m in (init or {}).get("models", [])}
    models = []
    for entry in run:
        entry = dict(entry)
        widened = entry.pop("widened_from", None), entry.pop("widened_to", None)
        how_here = how
        if widened[0]:
            how_here += f"; trunk widened from features {_slashed(widened[0])} to {_slashed(widened[1])} first"
        stage = {"iterations": entry["iterations"], "seconds": entry["seconds"],
                 "final_loss": entry["final_loss"], "how": how_here} | ({"machine": machine} if machine else {})
        before = earlier.get(entry["model"])
        stages = []
        if before is not None:
            stages = list(before.get("stages") or [
                {k: before.get(k) for k in ("iterations", "seconds", "final_loss")} | {"how": "(not recorded)"}])
        stages.append(stage)
        models.append({**entry, "iterations": sum(s["iterations"] or 0 for s in stages),
                       "seconds": round(sum(s["seconds"] or 0 for s in stages), 1), "stages": stages})
    trained = {m["model"] for m in models}
    base = previous or init or {}
    kept = [m for m in (previous or {}).get("models", []) if m["model"] not in trained]
    return {**{k: v for k, v in base.items() if k != "models"}, "notice": DEMO_DESCRIPTION,
            "kind": "trained-on-phantoms", "training_seeds": f"{first_case}..{first_case + cases - 1}",
            "models": models + kept}


def _slashed(features: Sequence[int]) -> str:
    """Features per stage as the records write them: 8/16/32/64."""
    return "/".join(str(f) for f in features)
