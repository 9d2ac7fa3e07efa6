"""Load an nnU-Net v2 trainer folder into a ready ``nnUNetPredictor``.

We build the network from ``plans.json`` with nnunetv2's own
``get_network_from_plans`` and hand it to ``nnUNetPredictor.manual_initialization``.
nnunetv2's usual path (``initialize_from_trained_model_folder``) first looks
the trainer class up by name, which imports every trainer module, and some of
those import timm/torchvision, which crash beside the CPU torch build. Any
trainer name therefore loads, as long as the trainer used the standard
architecture from its plans (true for every TotalSegmentator MRI model).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import platform
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from serve.catalogue import SubModel
from serve.errors import ModelFolderError

log = logging.getLogger(__name__)


def read_dataset_labels(dataset_json: dict) -> dict[str, int]:
    """nnU-Net's ``labels`` map (name -> id); a label given as a one-id list is that id.

    Region-based models (a label made of several ids, e.g. ``"whole": [1, 2, 3]``) are refused: their
    exported ids follow ``regions_class_order``, not the labels map, so reading ids from it would merge
    wrong structures without a word.
    """
    labels = {}
    for name, value in dataset_json.get("labels", {}).items():
        if isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise ModelFolderError(f"dataset.json gives label {name!r} as the region {list(value)}: region-based "
                                       f"nnU-Net models are not supported; use a model trained on plain labels")
            value = value[0]
        labels[name] = int(value)
    return labels


def check_labels(sm: SubModel, dataset_json: dict) -> list[str]:
    """Raise if a catalogue label is missing; return the auxiliary labels to drop."""
    labels = read_dataset_labels(dataset_json)
    missing = [n for n in sm.labels if n not in labels]
    if missing:
        raise ModelFolderError(
            f"{sm.name} (Dataset{sm.task_id}): dataset.json lacks catalogue label(s) "
            f"{', '.join(missing)}; these weights are not the TotalSegmentator MRI "
            f"{sm.name} model. Re-import the right DatasetNNN folder.")
    return [n for n in labels if n != "background" and n not in sm.labels]


def configure_threads(n_threads: int | None = None) -> int:
    """Bound torch's intra-op threads and nnunetv2's worker count to ``n_threads``.

    nnunetv2 reads ``nnUNet_def_n_proc`` when it is first imported and
    defaults to 8, far more than a 2-core replica should use.
    """
    n = int(n_threads or os.cpu_count() or 1)
    os.environ["nnUNet_def_n_proc"] = str(n)
    # lazy: torch takes seconds to import; only model loading and prediction need it
    import torch

    torch.set_num_threads(n)
    try:
        # lazy: nnunetv2 imports torch; only model loading needs it
        import nnunetv2.configuration as cfg

        cfg.default_num_processes = n
        # lazy: nnunetv2 imports torch; only model loading needs it
        import nnunetv2.inference.predict_from_raw_data as pfrd

        pfrd.default_num_processes = n
    except ImportError:  # pragma: no cover - nnunetv2 is a hard dependency
        pass
    return n


def pick_device(requested: str = "auto"):
    """``auto`` takes CUDA when present, else CPU."""
    # lazy: torch takes seconds to import; only model loading and prediction need it
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelFolderError("device 'cuda' requested but no CUDA device is visible; use --device cpu")
    return dev


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and instruction-set flags, from ``/proc/cpuinfo`` (Linux);
    elsewhere ``platform.processor()`` and no flags."""
    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.is_file() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return model, set(flags)


#: Set to 1 (the operator's decision) to load checkpoints that need full unpickling.
TRUST_PICKLED_ENV = "MRISEG_TRUST_PICKLED_CHECKPOINTS"

# The only globals a checkpoint of nnU-Net v2's trainer references beyond torch's own
# weights-only set (tensors, OrderedDict, torch.device, _codecs.encode). nnUNetTrainer.save_checkpoint
# pickles: network_weights (OrderedDict of tensors), optimizer_state and grad_scaler_state (dicts of
# tensors, floats, ints, bools, None), logging (lists of Python floats and numpy float32/float64
# scalars), _best_ema (a numpy scalar or None), current_epoch (int), init_args (plans and
# dataset_json as plain dicts, configuration str, fold int or str, device a torch.device),
# trainer_name (str) and inference_allowed_mirroring_axes (a tuple of ints or None).
# A numpy scalar pickles as scalar(dtype, bytes); numpy 1.x (the TotalSegmentator weights)
# named the function numpy.core.multiarray.scalar, numpy 2 numpy._core.multiarray.scalar. The
# dtype is rebuilt through np.dtype and its state set on the dtype's class, hence those classes.
_NNUNET_GLOBALS = [
    (np._core.multiarray.scalar, "numpy._core.multiarray.scalar"),
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    np.dtypes.Float32DType,
    np.dtypes.Float64DType,
]
# torch.serialization.safe_globals changes a process-wide set for its duration: loads
# in two threads must not add and remove it under each other.
_SAFE_LOAD_LOCK = threading.Lock()


def trust_pickled_checkpoints() -> bool:
    """Whether the operator allows checkpoints that need full unpickling (``$MRISEG_TRUST_PICKLED_CHECKPOINTS``).

    Returns:
        True when the variable is ``1``, ``true`` or ``yes`` (any case).
    """
    return os.environ.get(TRUST_PICKLED_ENV, "").strip().lower() in {"1", "true", "yes"}


def load_checkpoint(path: Path, data: bytes | None = None, *, trust_pickled: bool | None = None) -> dict[str, Any]:
    """An nnU-Net v2 checkpoint, unpickled with torch's weights-only loader and nothing beyond what
    nnU-Net's trainer saves.

    A checkpoint that needs anything else (a pickled object of any other class, whose
    unpickling may run code) is refused unless the operator trusts pickled checkpoints.

    Args:
        path: The checkpoint file (named in errors; read when ``data`` is None).
        data: The file's bytes, already read (and checked against a pinned manifest).
        trust_pickled: Allow full unpickling; None reads ``$MRISEG_TRUST_PICKLED_CHECKPOINTS``.

    Returns:
        The checkpoint dictionary, tensors on the CPU.

    Raises:
        ModelFolderError: the file is not a loadable checkpoint, or needs full unpickling
            without the operator's trust.
    """
    # lazy: torch takes seconds to import; only model loading and prediction need it
    import torch

    source = io.BytesIO(data) if data is not None else path
    try:
        with _SAFE_LOAD_LOCK, torch.serialization.safe_globals(_NNUNET_GLOBALS):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's refusal of a global or opcode outside the allow-list
        why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), type(e).__name__)
        unsafe = e
    except Exception as e:  # noqa: BLE001 - truncated, not a checkpoint at all, or from another tool
        raise ModelFolderError(f"{path} cannot be loaded as a PyTorch checkpoint ({type(e).__name__}); "
                               f"the file is damaged or not nnU-Net weights: import the model again") from e
    if not (trust_pickled_checkpoints() if trust_pickled is None else trust_pickled):
        raise ModelFolderError(
            f"{path} holds pickled objects beyond what nnU-Net's trainer saves ({why[:300]}); unpickling them "
            f"could run code from the file, so it was not loaded. Use weights saved by nnU-Net, or, only if you "
            f"trust where this file came from, set {TRUST_PICKLED_ENV}=1 for the processes that load models") \
            from unsafe
    log.warning("checkpoint %s needs full unpickling (%s); loading it because %s is set",
                path.name, why[:200], TRUST_PICKLED_ENV)
    if data is not None:
        source.seek(0)
    try:
        return torch.load(source, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - whatever the pickled objects raise
        raise ModelFolderError(f"{path} cannot be loaded as a PyTorch checkpoint ({type(e).__name__}); "
                               f"the file is damaged or not nnU-Net weights: import the model again") from e


@dataclass
class LoadedModel:
    """A sub-model ready to predict, plus what it was loaded from."""

    submodel: SubModel
    folder: Path
    predictor: Any  # nnunetv2.inference.predict_from_raw_data.nnUNetPredictor
    dataset_json: dict
    trainer_name: str
    folds: tuple[str, ...]
    label_names: dict[int, str]  # local id -> name, auxiliary labels included
    dropped_labels: tuple[str, ...]
    checksum: str  # over checkpoints, labels and plans; part of job idempotency keys

    @property
    def mirroring_axes(self):
        return self.predictor.allowed_mirroring_axes if self.predictor.use_mirroring else None


def _read_pinned(folder: Path, rel: str, pinned: Mapping[str, str] | None) -> tuple[bytes, str]:
    """A model file's bytes and sha256; with ``pinned``, refused unless the sha256 is the pinned one.

    The bytes checked are the bytes then parsed, so a file swapped after the store inspected it
    is caught here.
    """
    path = folder / rel
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if pinned is not None:
        want = pinned.get(rel)
        if want is None:
            raise ModelFolderError(f"{path} is not in the model's pinned manifest; it was not loaded: import the "
                                   f"model again")
        if want != digest:
            raise ModelFolderError(f"{path} does not match its pinned sha256 (got {digest[:16]}..., pinned "
                                   f"{want[:16]}...); it was not loaded: import the model again")
    return data, digest


def load_model(folder: str | os.PathLike, submodel: SubModel, *, device: str = "auto",
               tile_step_size: float | None = None, folds: tuple[str, ...] | None = None,
               use_mirroring: bool = True, checkpoint_name: str = "checkpoint_final.pth",
               pinned: Mapping[str, str] | None = None) -> LoadedModel:
    """Build ``submodel``'s predictor from an nnU-Net trainer folder.

    Args:
        folder: The ``Trainer__Plans__config`` folder.
        submodel: The catalogue's sub-model these weights must be.
        device: ``auto``, ``cpu`` or ``cuda``.
        tile_step_size: Sliding-window step; defaults to the catalogue's (0.8 or 0.5).
        folds: Folds to ensemble; default every ``fold_*`` with ``checkpoint_name`` (with
            ``pinned``: every pinned one).
        use_mirroring: Mirror at test time, only where the checkpoint allows it; the
            TotalSegmentator MRI models were trained without mirroring and so never mirror.
        checkpoint_name: The checkpoint file in each fold.
        pinned: sha256 of the folder's files by path inside it (``ModelStatus.pinned``); every
            file read must match its pin. ``ModelStore.load`` passes it.

    Returns:
        The loaded model.

    Raises:
        ModelFolderError: a file is unreadable, unpinned or differs from its pin, a checkpoint is
            damaged or needs full unpickling without the operator's trust, or the weights do not
            fit the plans.
    """
    # lazy: nnunetv2 imports torch; only model loading needs it
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(folder)
    try:
        dataset_json = json.loads(_read_pinned(folder, "dataset.json", pinned)[0])
        plans = json.loads(_read_pinned(folder, "plans.json", pinned)[0])
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{folder}: cannot read dataset.json/plans.json ({e})") from e
    dropped = check_labels(submodel, dataset_json)

    if folds is None and pinned is not None:  # a pinned fold that went missing fails below, not silently
        folds = tuple(sorted(k[len("fold_"):-len(checkpoint_name) - 1] for k in pinned
                             if k.startswith("fold_") and k.endswith("/" + checkpoint_name)))
    elif folds is None:
        folds = tuple(sorted(p.name[len("fold_"):] for p in folder.glob("fold_*")
                             if (p / checkpoint_name).is_file()))
    if not folds:
        raise ModelFolderError(f"{folder}: no fold_*/{checkpoint_name}")

    params, digest = [], hashlib.sha256()
    trainer_name, configuration, mirror_axes = folder.name.split("__")[0], None, None
    for i, f in enumerate(folds):
        ckpt_path = folder / f"fold_{f}" / checkpoint_name
        try:
            data, sha = _read_pinned(folder, f"fold_{f}/{checkpoint_name}", pinned)
        except OSError as e:
            raise ModelFolderError(f"{ckpt_path} cannot be read ({e.strerror}); import the model again") from e
        ckpt = load_checkpoint(ckpt_path, data)
        del data
        digest.update(sha.encode())
        if i == 0:
            trainer_name = ckpt.get("trainer_name", trainer_name)
            configuration = ckpt.get("init_args", {}).get("configuration")
            mirror_axes = ckpt.get("inference_allowed_mirroring_axes")
        params.append(ckpt["network_weights"])
    configuration = configuration or folder.name.split("__")[-1]

    pm = PlansManager(plans)
    try:
        cm = pm.get_configuration(configuration)
    except (KeyError, RuntimeError) as e:
        raise ModelFolderError(f"{folder}: plans.json has no configuration {configuration!r}") from e
    lm = pm.get_label_manager(dataset_json)
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    network = get_network_from_plans(
        cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
        n_in, lm.num_segmentation_heads, allow_init=False, deep_supervision=False)
    try:
        network.load_state_dict(params[0])
    except RuntimeError as e:
        raise ModelFolderError(f"{folder}: checkpoint does not fit the network in plans.json ({e})") from e

    dev = pick_device(device)
    # nnU-Net prints a notice for every non-CUDA device, even when told not to use the device path
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(
            tile_step_size=submodel.tile_step_size if tile_step_size is None else tile_step_size,
            use_gaussian=True,
            use_mirroring=bool(use_mirroring and mirror_axes),
            perform_everything_on_device=dev.type == "cuda",
            device=dev, verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, pm, cm, params, dataset_json, trainer_name,
                                    tuple(mirror_axes) if mirror_axes else None)
    network.to(dev).eval()

    label_names = {v: k for k, v in read_dataset_labels(dataset_json).items() if k != "background"}
    # The checksum also covers the label map and plans, which change the output.
    digest.update(json.dumps(dataset_json.get("labels"), sort_keys=True).encode())
    digest.update(json.dumps(plans, sort_keys=True).encode())
    return LoadedModel(submodel, folder, predictor, dataset_json, trainer_name, tuple(folds),
                       label_names, tuple(dropped), digest.hexdigest()[:16])
