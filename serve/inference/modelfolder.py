"""Write nnU-Net v2 model folders (plans.json, dataset.json, fold_0 checkpoint).

Used for the committed demo models, the benchmark's reference-architecture
models and tests. The files follow nnU-Net v2's on-disk format exactly, so
the same loader reads these and real TotalSegmentator weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from serve.catalogue import SubModel


@dataclass(frozen=True)
class UNetSpec:
    """A PlainConvUNet as nnU-Net's planner would describe it."""

    features: Sequence[int] = (8, 16, 32, 64)
    patch_size: Sequence[int] = (48, 48, 48)
    n_conv_per_stage: int = 2
    kernel: int = 3
    # stage 0 keeps resolution, every later stage halves it
    strides: Sequence[Sequence[int]] | None = None
    normalization: str = "ZScoreNormalization"
    extra: dict = field(default_factory=dict)

    def arch_kwargs(self) -> dict:
        n = len(self.features)
        strides = self.strides or [[1, 1, 1]] + [[2, 2, 2]] * (n - 1)
        return {
            "n_stages": n,
            "features_per_stage": list(self.features),
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[self.kernel] * 3] * n,
            "strides": [list(s) for s in strides],
            "n_conv_per_stage": [self.n_conv_per_stage] * n,
            "n_conv_per_stage_decoder": [self.n_conv_per_stage] * (n - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        }


def make_plans(dataset_name: str, spacing_mm: float, spec: UNetSpec, configuration: str = "3d_fullres",
               plans_name: str = "nnUNetPlans", reader: str = "NibabelIOWithReorient") -> dict:
    sp = [float(spacing_mm)] * 3
    return {
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": sp,
        "original_median_shape_after_transp": list(spec.patch_size),
        "image_reader_writer": reader,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            configuration: {
                "data_identifier": f"{plans_name}_{configuration}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(spec.patch_size),
                "median_image_size_in_voxels": list(spec.patch_size),
                "spacing": sp,
                "normalization_schemes": [spec.normalization],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": spec.arch_kwargs(),
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0,
                  "percentile_00_5": -1.0, "percentile_99_5": 1.0, "std": 1.0}
        },
    }


def make_dataset_json(labels: Sequence[str], extra_labels: Sequence[str] = (), channel: str = "MRI",
                      description: str = "") -> dict:
    names = ["background", *labels, *extra_labels]
    d = {
        "channel_names": {"0": channel},
        "labels": {n: i for i, n in enumerate(names)},
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }
    if description:
        d["description"] = description
    return d


def build_network(plans: dict, dataset_json: dict, configuration: str = "3d_fullres", *,
                  deep_supervision: bool = False):
    """nnunetv2's network for these plans (random init, as nnU-Net initialises it).

    ``deep_supervision`` (training only) makes it return one output per decoder
    stage; the weights are the same either way, so a checkpoint trained with it
    loads into the inference network.
    """
    # lazy: nnunetv2 imports torch; only model loading needs it
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    lm = pm.get_label_manager(dataset_json)
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, 1, lm.num_segmentation_heads,
                                  allow_init=True, deep_supervision=deep_supervision)


def write_model_folder(root: str | Path, submodel: SubModel, spec: UNetSpec, *,
                       dataset_name: str | None = None, trainer: str | None = None,
                       labels: Sequence[str] | None = None, extra_labels: Sequence[str] = (),
                       state_dict: dict | None = None, mirroring_axes=None, seed: int = 0,
                       description: str = "", epochs: int = 0, fold: str = "0") -> Path:
    """Create ``root/DatasetNNN_name/Trainer__Plans__config/`` and return the trainer folder.

    Without ``state_dict`` the network keeps nnU-Net's random initialisation
    (seeded), which is what the benchmark's reference models use.
    """
    # lazy: torch takes seconds to import; only model loading and prediction need it
    import torch

    dataset_name = dataset_name or f"{submodel.folder_prefix}{submodel.name}"
    trainer = trainer or submodel.trainer
    plans = make_plans(dataset_name, submodel.spacing_mm, spec, submodel.configuration, submodel.plans)
    dataset_json = make_dataset_json(labels if labels is not None else submodel.labels, extra_labels,
                                     description=description)
    if state_dict is None:
        torch.manual_seed(seed)
        state_dict = build_network(plans, dataset_json, submodel.configuration).state_dict()
    folder = Path(root) / dataset_name / f"{trainer}__{submodel.plans}__{submodel.configuration}"
    (folder / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    checkpoint = {
        # No clone: PlainConvUNet's decoder holds the encoder, so a state dict
        # names each encoder tensor twice; torch.save writes a shared storage
        # once, as nnU-Net's own checkpoints do.
        "network_weights": {k: v.detach().cpu() for k, v in state_dict.items()},
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": epochs,
        "init_args": {"plans": plans, "configuration": submodel.configuration, "fold": int(fold),
                      "dataset_json": dataset_json, "device": "cpu"},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": list(mirroring_axes) if mirroring_axes else None,
    }
    torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder
