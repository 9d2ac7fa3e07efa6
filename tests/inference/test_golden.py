"""Golden test: our pipeline vs TotalSegmentator 2.18's path, written out independently here.

The reference follows TotalSegmentator's ``nnUNet_predict_image`` and
``resampling.change_spacing`` step by step with nibabel, scipy and nnU-Net's own
file reader: load the NIfTI, copy it to float64 (``get_fdata``),
``as_closest_canonical``, ``ndimage.zoom(order=-ro, mode="nearest")`` to 1.5 mm
with zooms from the header, ``.astype(np.int32)`` (only when it resampled: an
input already at 1.5 mm is returned as it is), save, read with the plans'
``image_reader_writer``, ``predict_single_npy_array``, order-0 ``mode="nearest"``
zoom back to the canonical shape, undo the reorientation. On an int16 input (an
integer-valued one, which we cast too) each sub-model's map must match ours voxel
for voxel, at the default ``-ro 1`` and at ``-ro 3``; on a float input (which we
keep float, the documented departure) the agreement is bounded.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from serve.inference.modelload import load_model
from serve.inference.predict import predict_labels
from serve.inference.preprocess import prepare
from serve.inference.restore import to_input_grid
from serve.imaging.nifti import write_nifti
from serve.imaging.volume_io import read_volume
from tests.helpers.volumes import body_volume

SPACING = 1.5
GOLDEN_MODELS = ("organs", "tissue_types")  # tile step 0.8 and 0.5


def reference_totalsegmentator(path: Path, model, workdir: Path, order: int = 1) -> np.ndarray:
    """TotalSegmentator 2.18's path for one sub-model (``-ro order``); returns labels on the input grid (local ids)."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    img_orig = nib.load(str(path))
    img_in = nib.Nifti1Image(img_orig.get_fdata(), img_orig.affine)
    img_in = nib.as_closest_canonical(img_in)
    img_in_shape = img_in.shape
    spacing = np.array(img_in.header.get_zooms())
    new_spacing = np.array([SPACING] * 3)
    if np.array_equal(spacing, new_spacing):  # change_spacing returns its input: float64, not cast
        data, new_affine = img_in.get_fdata(), img_in.affine
    else:
        zoom = spacing / new_spacing
        new_affine = np.copy(img_in.affine)
        for i in range(3):
            new_affine[:3, i] = new_affine[:3, i] / zoom[i]
        data = ndimage.zoom(img_in.get_fdata(), zoom, order=order, mode="nearest").astype(np.int32)
    rsp_file = workdir / "s01_0000.nii.gz"
    nib.save(nib.Nifti1Image(data, new_affine), str(rsp_file))

    # nnU-Net reads the file with the reader its plans name, exactly as nnUNetv2_predict would
    reader = model.predictor.plans_manager.image_reader_writer_class()
    arr, props = reader.read_images([str(rsp_file)])
    seg = model.predictor.predict_single_npy_array(arr, props, None, None, False)
    # the reader's array order is undone by writing/reading through the same reader
    seg_file = workdir / "s01.nii.gz"
    reader.write_seg(seg, str(seg_file), props)
    pred = nib.load(str(seg_file))
    assert pred.shape == data.shape

    target_zoom = np.array(img_in_shape) / np.array(pred.shape)
    back = ndimage.zoom(pred.get_fdata(), target_zoom, order=0, mode="nearest").astype(np.uint8)
    img_back = nib.Nifti1Image(back, img_in.affine)
    from_canonical = ornt_transform(axcodes2ornt("RAS"), io_orientation(img_orig.affine))
    img_back = img_back.as_reoriented(from_canonical)
    assert img_back.shape == img_orig.shape
    assert np.allclose(img_back.affine, img_orig.affine, atol=1e-4)
    return np.asarray(img_back.dataobj).astype(np.uint8)


@pytest.fixture(scope="module")
def golden_input(tmp_path_factory) -> Path:
    # oblique, LPS-like, anisotropic, not 1.5 mm: every step of the path does something; int16 as MRI is stored
    vol = body_volume("LPS", shape=(44, 38, 20), spacing=(1.1, 1.25, 2.6), rotation_deg=12.0, seed=3)
    return write_nifti(tmp_path_factory.mktemp("golden") / "input.nii.gz", np.round(vol.data).astype(np.int16),
                       vol.affine)


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    import json
    import shutil

    from serve.catalogue import load_catalogue
    from serve.inference.modelstore import ModelStore

    store = ModelStore([tiny_models])
    cat = load_catalogue()
    out = {n: load_model(store.locate(n), cat.submodel(n), device="cpu") for n in GOLDEN_MODELS}
    # the same organs weights, planned with SimpleITK's reader (its own axis order and spacing order)
    sitk_dir = tmp_path_factory.mktemp("sitk") / store.locate("organs").parent.name / store.locate("organs").name
    shutil.copytree(store.locate("organs"), sitk_dir)
    plans = json.loads((sitk_dir / "plans.json").read_text())
    plans["image_reader_writer"] = "SimpleITKIO"
    (sitk_dir / "plans.json").write_text(json.dumps(plans))
    out["organs_sitkio"] = load_model(sitk_dir, cat.submodel("organs"), device="cpu")
    return out


@pytest.mark.parametrize("name,order", [(n, None) for n in GOLDEN_MODELS + ("organs_sitkio",)] + [("organs", 3)])
def test_each_submodel_matches_totalsegmentator_voxel_for_voxel(golden_input, models, name, order, tmp_path):
    """``order`` None: our default, against TotalSegmentator's (-ro 1)."""
    model = models[name]
    ref = reference_totalsegmentator(golden_input, model, tmp_path, 1 if order is None else order)
    vol = read_volume(golden_input)
    assert vol.integer_valued
    prep = prepare(vol, SPACING) if order is None else prepare(vol, SPACING, resampling_order=order)
    assert prep.input_cast == "int32"
    ours = to_input_grid(predict_labels(model, prep.data, SPACING), prep)
    assert ours.shape == ref.shape == vol.shape
    # a meaningful comparison needs several labels in the output
    assert len(np.unique(ref)) >= 3, np.unique(ref)
    mismatch = int(np.count_nonzero(ours != ref))
    assert mismatch == 0, f"{name}: {mismatch} of {ref.size} voxels differ from TotalSegmentator's path"


def test_pipeline_per_model_maps_equal_reference(golden_input, models, segmenter, tmp_path):
    """The Segmenter's shared preprocessing gives each sub-model exactly its reference map (global ids)."""
    from serve.inference.merge import local_to_global_lut

    vol = read_volume(golden_input)
    result = segmenter.segment(vol, roi_subset=["liver", "spleen", "kidney_left", "skeletal_muscle",
                                                "subcutaneous_fat", "torso_fat"])
    assert set(result.per_model) == set(GOLDEN_MODELS)
    for name in GOLDEN_MODELS:
        ref_local = reference_totalsegmentator(golden_input, models[name], tmp_path)
        lut, _ = local_to_global_lut(models[name], set(result.structures.values()))
        assert np.array_equal(result.per_model[name], lut[ref_local])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_float_intensities_departure_is_bounded(models, name, tmp_path):
    """A float input keeps float32 intensities where TotalSegmentator casts to int32: Dice >= 0.99 for large
    structures.

    Measured on float voxels in a 12-bit range (the cast is nearly harmless there; on data scaled to [0, 1] it
    would destroy the image, which is why float inputs are not cast).
    """
    model = models[name]
    vol = body_volume("LPS", shape=(44, 38, 20), spacing=(1.1, 1.25, 2.6), rotation_deg=12.0, seed=3)
    src = write_nifti(tmp_path / "input12bit.nii.gz", (vol.data * 4.0).astype(np.float32), vol.affine)
    ref = reference_totalsegmentator(src, model, tmp_path)
    vol = read_volume(src)
    assert not vol.integer_valued
    prep = prepare(vol, SPACING)
    assert prep.input_cast == "none"
    ours = to_input_grid(predict_labels(model, prep.data, SPACING), prep)
    checked = 0
    for label in np.unique(ref):
        if label == 0 or np.count_nonzero(ref == label) < 1000:
            continue
        checked += 1
        assert dice(ours == label, ref == label) >= 0.99, model.label_names.get(int(label))
    assert checked >= 1


def test_bf16_on_cpu_is_optional_and_close(golden_input, models):
    """precision="bf16" autocasts on CPU; fp32 stays the exact default."""
    vol = read_volume(golden_input)
    prep = prepare(vol, SPACING)
    fp32 = predict_labels(models["tissue_types"], prep.data, SPACING)
    bf16 = predict_labels(models["tissue_types"], prep.data, SPACING, precision="bf16")
    assert bf16.shape == fp32.shape and bf16.dtype == np.uint8
    assert np.mean(bf16 == fp32) > 0.8
    with pytest.raises(ValueError, match="precision"):
        predict_labels(models["tissue_types"], prep.data, SPACING, precision="fp8")
