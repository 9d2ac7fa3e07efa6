"""Orientation, spacing and the exact way back to the input grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from serve.inference.preprocess import prepare, prepare_labels_like
from serve.inference.restore import to_input_grid
from serve.imaging.nifti import write_nifti
from serve.imaging.volume_io import read_volume
from tests.helpers.volumes import body_volume, world_coords

ORIENTATIONS = ["RAS", "LPS", "LAS", "PIR", "ASL", "SPL", "IRA"]
CASES = [
    # (axcodes, voxel spacing, rotation about z in degrees)
    *[(c, (1.5, 1.5, 1.5), 0.0) for c in ORIENTATIONS],
    ("LPS", (1.5, 1.5, 1.5), 17.0),        # oblique
    ("PIR", (1.5, 1.5, 1.5), -31.0),       # oblique, permuted
]
RESAMPLED = [
    ("RAS", (0.9, 0.9, 3.0), 0.0),         # anisotropic, thick slices
    ("LPS", (1.2, 1.7, 2.3), 0.0),
    ("ASL", (2.0, 0.8, 1.1), 23.0),        # oblique, permuted, anisotropic
    ("IRA", (3.0, 3.0, 3.0), 0.0),         # coarser than the target
]


def labels_on(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 81, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("axcodes,spacing,rot", CASES)
def test_round_trip_is_exact_at_target_spacing(axcodes, spacing, rot):
    """A label map on the input grid, taken to the prepared grid and back, is identical."""
    vol = body_volume(axcodes, shape=(21, 17, 13), spacing=spacing, rotation_deg=rot)
    prep = prepare(vol, 1.5)
    assert not prep.resampled
    lab = labels_on(vol.shape)
    back = to_input_grid(prepare_labels_like(lab, prep.grid, 1.5), prep)
    assert back.shape == vol.shape
    assert np.array_equal(back, lab)


@pytest.mark.parametrize("axcodes,spacing,rot", CASES + RESAMPLED)
def test_prepared_grid_is_canonical_and_matches_totalsegmentator(axcodes, spacing, rot):
    vol = body_volume(axcodes, shape=(21, 17, 13), spacing=spacing, rotation_deg=rot)
    prep = prepare(vol, 1.5)
    can = nib.as_closest_canonical(nib.Nifti1Image(vol.data, vol.affine))
    assert nib.aff2axcodes(prep.affine) == ("R", "A", "S")
    zooms = np.array(can.header.get_zooms())
    zoom = zooms / np.array([1.5, 1.5, 1.5])  # float32 zooms / float64 array, as TotalSegmentator
    expected_shape = tuple(int(round(n * z)) for n, z in zip(can.shape, zoom)) if prep.resampled else can.shape
    assert prep.data.shape == expected_shape
    expected_affine = can.affine.copy()
    if prep.resampled:
        expected_affine[:3, :3] = expected_affine[:3, :3] / zoom
    assert np.array_equal(prep.affine, expected_affine)
    assert prep.data.dtype == np.float32


@pytest.mark.parametrize("axcodes,spacing,rot", CASES + RESAMPLED)
def test_restored_output_has_input_shape_and_affine(axcodes, spacing, rot, tmp_path):
    vol = body_volume(axcodes, shape=(21, 17, 13), spacing=spacing, rotation_deg=rot)
    src = write_nifti(tmp_path / "in.nii.gz", vol.data, vol.affine)
    vol = read_volume(src)
    prep = prepare(vol, 1.5)
    back = to_input_grid((prep.data > 300).astype(np.uint8), prep)
    assert back.shape == vol.shape
    from serve.outputs.writers import _nifti

    out = tmp_path / "out.nii.gz"
    nib.save(_nifti(back, vol.affine, vol.header), str(out))
    img_in, img_out = nib.load(str(src)), nib.load(str(out))
    assert img_out.shape == img_in.shape
    assert np.array_equal(img_out.affine, img_in.affine)
    # order 0 never invents labels
    assert set(np.unique(back)) <= {0, 1}


@pytest.mark.parametrize("axcodes,spacing,rot", CASES + RESAMPLED)
def test_resampled_round_trip_keeps_labels_in_place(axcodes, spacing, rot):
    """Down to 1.5 mm and back moves no boundary by more than one input voxel."""
    vol = body_volume(axcodes, shape=(30, 26, 18), spacing=spacing, rotation_deg=rot)
    x, y, z = world_coords(vol.shape, vol.affine)
    lab = ((x < 0).astype(np.uint8) + 2 * (y > 3)).astype(np.uint8)
    prep = prepare(vol, 1.5)
    back = to_input_grid(prepare_labels_like(lab, prep.grid, 1.5), prep)
    assert back.shape == lab.shape
    agree = np.mean(back == lab)
    assert agree > 0.85, agree


@pytest.mark.parametrize("axcodes", ORIENTATIONS + ["LPS-oblique"])
def test_patient_left_is_low_x_in_canonical_space(axcodes):
    """RAS+ x grows towards the patient's right, so the patient's left is at low x indices."""
    rot = 15.0 if axcodes.endswith("oblique") else 0.0
    vol = body_volume(axcodes.split("-")[0], shape=(24, 20, 14), spacing=(1.3, 1.5, 2.0), rotation_deg=rot,
                      left_bright=True)
    prep = prepare(vol, 1.5)
    nx = prep.data.shape[0]
    left, right = prep.data[: nx // 2].mean(), prep.data[nx - nx // 2:].mean()
    assert left > right + 100, (axcodes, left, right)


@pytest.mark.parametrize("axcodes", ORIENTATIONS)
def test_left_labels_land_on_the_patients_left_after_restore(axcodes):
    """kidney_left drawn on the canonical (patient's left) side comes back at world x < 0."""
    from serve.catalogue import load_catalogue

    ids = load_catalogue().structure_ids
    vol = body_volume(axcodes, shape=(24, 20, 14), spacing=(1.3, 1.5, 2.0))
    prep = prepare(vol, 1.5)
    lab = np.zeros(prep.data.shape, np.uint8)
    nx = lab.shape[0]
    lab[: nx // 2 - 1] = ids["kidney_left"]
    lab[nx // 2 + 1:] = ids["kidney_right"]
    back = to_input_grid(lab, prep)
    x = world_coords(vol.shape, vol.affine)[0]
    assert np.all(x[back == ids["kidney_left"]] < 0)
    assert np.all(x[back == ids["kidney_right"]] > 0)
    assert np.any(back == ids["kidney_left"]) and np.any(back == ids["kidney_right"])


def test_lps_and_ras_inputs_of_the_same_object_give_the_same_prepared_data():
    ras = body_volume("RAS", shape=(24, 20, 14), spacing=(1.3, 1.5, 2.0), noise=0)
    lps = body_volume("LPS", shape=(24, 20, 14), spacing=(1.3, 1.5, 2.0), noise=0)
    # same world object, opposite voxel order along x and y
    assert np.allclose(lps.data, ras.data[::-1, ::-1, :], atol=1e-3)
    pr, pl = prepare(ras, 1.5), prepare(lps, 1.5)
    assert pr.data.shape == pl.data.shape
    assert np.allclose(pr.affine, pl.affine)
    assert np.allclose(pr.data, pl.data, atol=1e-2)


@pytest.mark.parametrize("ras_spacing", [(1.5, 1.5, 1.5), (1.2, 1.4, 2.1)])
@pytest.mark.parametrize("axcodes", ["LPS", "PIR", "ASL"])
def test_segmenter_gives_the_same_world_labels_in_every_orientation(segmenter, axcodes, ras_spacing):
    """The same object stored RAS, LPS (flipped) or with permuted axes: identical labels in world space.

    The full pipeline runs (real nnU-Net predictor), so any axis mix-up in
    prepare / predict / restore would move labels and break the equality.
    """
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    roi = ["subcutaneous_fat", "torso_fat", "skeletal_muscle", "kidney_left", "kidney_right", "liver"]
    ref_vol = body_volume("RAS", shape=(30, 26, 16), spacing=ras_spacing, noise=0)
    ref = segmenter.segment(ref_vol, roi_subset=roi)
    assert len(np.unique(ref.labels)) >= 3
    ras_shape = (30, 26, 16)  # voxel axis i of the new volume runs along world axis ornt[i, 0]
    axes = [int(a) for a, _ in axcodes2ornt(axcodes)]
    vol = body_volume(axcodes, shape=tuple(ras_shape[a] for a in axes), spacing=tuple(ras_spacing[a] for a in axes),
                      noise=0)
    res = segmenter.segment(vol, roi_subset=roi)
    assert res.labels.shape == vol.shape
    assert np.array_equal(res.affine, vol.affine)
    to_ras = ornt_transform(axcodes2ornt(axcodes), axcodes2ornt("RAS"))
    assert np.array_equal(apply_orientation(res.labels, to_ras), ref.labels)
    for name, m in res.per_model.items():
        assert np.array_equal(apply_orientation(m, to_ras), ref.per_model[name])


def test_a_resampled_grid_beyond_the_voxel_limit_or_under_one_voxel_is_refused_before_it_is_built():
    """A small volume whose header claims huge (or tiny) voxels: the input limit alone would not hold it."""
    from serve.errors import InvalidVolumeError, VolumeTooLargeError
    from serve.imaging.volume import Volume

    huge = Volume(np.ones((8, 8, 8), np.float32), np.diag([60.0, 60.0, 60.0, 1.0]), "nifti")
    with pytest.raises(VolumeTooLargeError, match="would have 32768000 voxels"):
        prepare(huge, 1.5, max_voxels=10**6)
    tiny = Volume(np.ones((40, 40, 40), np.float32), np.diag([0.01, 0.01, 0.01, 1.0]), "nifti")
    with pytest.raises(InvalidVolumeError, match="thinner than one 1.5 mm voxel"):
        prepare(tiny, 1.5)
    assert prepare(Volume(np.ones((8, 8, 8), np.float32), np.diag([3.0, 3.0, 3.0, 1.0]), "nifti"), 1.5).data.shape == (16,) * 3
