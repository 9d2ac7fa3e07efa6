"""Checkpoints are unpickled with torch's weights-only loader: what nnU-Net's trainer saves loads, code never runs."""

from __future__ import annotations

import json
import pickle
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from serve.catalogue import load_catalogue
from serve.errors import ModelFolderError
from serve.inference.modelfolder import UNetSpec, make_dataset_json, make_plans, write_model_folder
from serve.inference.modelload import TRUST_PICKLED_ENV, load_checkpoint, load_model

CAT = load_catalogue()
ORGANS = CAT.submodel("organs")


def _plant(path: str) -> str:
    """What a hostile checkpoint's pickle calls: it leaves a file behind, so a test sees whether it ran."""
    Path(path).write_text("ran")
    return "planted"


class _Planted:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return _plant, (self.path,)


@pytest.fixture(scope="module")
def trainer_folder(tmp_path_factory) -> Path:
    """A trainer folder whose checkpoint nnU-Net's own nnUNetTrainer wrote after one (tiny) epoch.

    The epoch runs nnU-Net's real train, validation and logging steps, so the checkpoint holds
    exactly the types save_checkpoint pickles: the optimizer's and grad scaler's state, numpy
    scalars in the logging lists and _best_ema, a torch.device in init_args, a mirroring tuple.
    """
    import torch

    root = tmp_path_factory.mktemp("nnunet")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(var, str(root / var))
        try:
            import seaborn  # noqa: F401
        except ImportError:  # only nnU-Net's progress plot (not run here) uses it, and it is not installed
            mp.setitem(sys.modules, "seaborn", types.ModuleType("seaborn"))
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        plans = make_plans("Dataset850_trained", ORGANS.spacing_mm, UNetSpec(features=(4, 8, 16),
                                                                            patch_size=(16, 16, 16)))
        dataset_json = make_dataset_json(ORGANS.labels)
        # nnUNetv2_train's run_training adds this before building the trainer
        plans["continue_training"] = False
        # nnU-Net's dataset class is chosen from the preprocessed files' suffix
        pre = root / "nnUNet_preprocessed" / "Dataset850_trained" / "nnUNetPlans_3d_fullres"
        pre.mkdir(parents=True)
        (pre / "case.npz").touch()
        trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
        trainer.initialize()
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        # on CUDA nnU-Net keeps a GradScaler; one on the CPU puts the same state in the checkpoint
        trainer.grad_scaler = torch.amp.GradScaler("cpu")
        n_scales = len(trainer._get_deep_supervision_scales())

        def batch() -> dict:
            seg = torch.randint(0, len(dataset_json["labels"]), (2, 1, 16, 16, 16)).float()
            return {"data": torch.randn(2, 1, 16, 16, 16),
                    "target": [seg[:, :, ::2 ** i, ::2 ** i, ::2 ** i] for i in range(n_scales)]}

        torch.manual_seed(0)
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        trainer.on_train_epoch_end([trainer.train_step(batch())])
        trainer.on_validation_epoch_start()
        trainer.on_validation_epoch_end([trainer.validation_step(batch())])
        # on_epoch_end without its progress plot: the same logging and best-EMA bookkeeping
        trainer.logger.log("epoch_end_timestamps", time.time(), trainer.current_epoch)
        trainer._best_ema = trainer.logger.get_value("ema_fg_dice", step=-1)
        # on_train_end saves checkpoint_final.pth with the last epoch's number, as here
        trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
        folder = Path(trainer.output_folder_base)
        (folder / "plans.json").write_text(json.dumps(trainer.plans_manager.plans))
        (folder / "dataset.json").write_text(json.dumps(dataset_json))
    return folder


def _resave(path: Path, ckpt: dict, pickler: type | None = None) -> None:
    import torch

    if pickler is None:
        torch.save(ckpt, path)
    else:
        torch.save(ckpt, path, pickle_module=types.SimpleNamespace(Pickler=pickler, __name__="pickle"))


class _Numpy1Pickler(pickle._Pickler):
    """Names numpy's scalar constructor as numpy 1.x did (numpy.core), as in the TotalSegmentator weights."""

    def save_global(self, obj, name=None):
        if obj is np._core.multiarray.scalar:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def test_a_checkpoint_of_nnunets_trainer_loads_without_trust(trainer_folder, monkeypatch):
    import torch

    monkeypatch.delenv(TRUST_PICKLED_ENV, raising=False)
    ckpt = load_checkpoint(trainer_folder / "fold_0" / "checkpoint_final.pth")
    # the fixture put every type save_checkpoint pickles into the file
    assert isinstance(ckpt["init_args"]["device"], torch.device)
    assert isinstance(ckpt["_best_ema"], np.floating) and isinstance(ckpt["logging"]["val_losses"][0], np.floating)
    assert ckpt["inference_allowed_mirroring_axes"] == (0, 1, 2) and ckpt["optimizer_state"]["state"]
    assert ckpt["grad_scaler_state"]["scale"] > 0 and ckpt["trainer_name"] == "nnUNetTrainer"
    model = load_model(trainer_folder, ORGANS, device="cpu")
    assert model.trainer_name == "nnUNetTrainer" and model.mirroring_axes == (0, 1, 2)


def test_a_checkpoint_pickled_under_numpy_1_loads_without_trust(trainer_folder, tmp_path, monkeypatch):
    """TotalSegmentator's weights were saved under numpy 1.x, whose scalars name numpy.core, not numpy._core."""
    monkeypatch.delenv(TRUST_PICKLED_ENV, raising=False)
    ckpt = load_checkpoint(trainer_folder / "fold_0" / "checkpoint_final.pth")
    # numpy 1.x turned float32 * Python float into float64: such checkpoints carry both
    ckpt["_best_ema"] = np.float64(0.25)
    ckpt["logging"]["ema_fg_dice"] = [np.float64(0.25)]
    path = tmp_path / "checkpoint_final.pth"
    _resave(path, ckpt, _Numpy1Pickler)
    assert b"numpy.core.multiarray\nscalar" in _pickle_bytes(path)
    again = load_checkpoint(path, trust_pickled=False)
    assert again["_best_ema"] == np.float64(0.25) and type(again["_best_ema"]) is np.float64
    data = path.read_bytes()
    assert load_checkpoint(path, data, trust_pickled=False)["current_epoch"] == 1


def _pickle_bytes(path: Path) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


def _hostile_folder(root: Path, marker: Path) -> Path:
    """A model folder whose checkpoint also pickles an object that runs code when unpickled."""
    import torch

    folder = write_model_folder(root, ORGANS, UNetSpec(features=(4, 8), patch_size=(16, 16, 16)))
    path = folder / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, weights_only=True)
    ckpt["logging"] = {"note": _Planted(marker)}
    torch.save(ckpt, path)
    return folder


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path, monkeypatch):
    from serve.inference.modelstore import ModelStore
    from serve.inference.pipeline import Segmenter

    monkeypatch.delenv(TRUST_PICKLED_ENV, raising=False)
    marker = tmp_path / "ran.txt"
    folder = _hostile_folder(tmp_path / "models", marker)
    with pytest.raises(ModelFolderError) as ei:
        load_model(folder, ORGANS, device="cpu")
    assert TRUST_PICKLED_ENV in ei.value.message and "_plant" in ei.value.message
    assert ei.value.message.startswith(str(folder / "fold_0" / "checkpoint_final.pth"))
    with pytest.raises(ModelFolderError, match=TRUST_PICKLED_ENV):
        Segmenter(ModelStore([tmp_path / "models"]), device="cpu").model("organs")
    monkeypatch.setenv(TRUST_PICKLED_ENV, "0")
    with pytest.raises(ModelFolderError, match=TRUST_PICKLED_ENV):
        load_model(folder, ORGANS, device="cpu")
    assert not marker.exists()


def test_the_operators_trust_flag_loads_a_pickled_checkpoint(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(TRUST_PICKLED_ENV, "1")
    marker = tmp_path / "ran.txt"
    folder = _hostile_folder(tmp_path / "models", marker)
    model = load_model(folder, ORGANS, device="cpu")
    assert model.label_names[5] == "liver"
    assert marker.read_text() == "ran"  # trusted: the file's code ran, as the flag's name says
    assert TRUST_PICKLED_ENV in caplog.text


def test_a_damaged_checkpoint_is_refused_as_damaged_even_when_trusted(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    for trust in (False, True):
        with pytest.raises(ModelFolderError, match="damaged"):
            load_checkpoint(path, trust_pickled=trust)
