"""serve/inference/preprocess.py: TotalSegmentator 2.18's resampling (``change_spacing``), order, cast and all.

The expected arrays are TotalSegmentator's calls written out here: ``ndimage.zoom`` of the
float64 canonical data with ``mode="nearest"`` and the ``-ro`` order, then ``.astype(np.int32)``
(integer-valued inputs only, the documented departure keeps the floats of all others).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from serve.errors import MrisegError
from serve.inference.preprocess import (CAST_INT32, CAST_NONE, DEFAULT_RESAMPLING_ORDER, check_resampling_order, prepare,
                              zoom_factors)
from serve.imaging.volume import Volume
from tests.helpers.volumes import body_volume, oriented_affine


def integer_volume(axcodes="LPS", shape=(20, 18, 12), spacing=(1.1, 0.9, 3.0), seed=0, low=-400, high=900,
                   rotation_deg=0.0) -> Volume:
    """Random integers (negatives too, as CT or signed MRI), flagged integer-valued as the decoder flags int16."""
    rng = np.random.default_rng(seed)
    data = rng.integers(low, high, size=shape).astype(np.float32)
    return Volume(data, oriented_affine(axcodes, spacing, origin=(4.0, -3.0, 9.0), rotation_deg=rotation_deg),
                  "nifti", integer_valued=True)


def totalsegmentator_zoom(vol: Volume, spacing: float, order: int) -> np.ndarray:
    """``change_spacing``'s zoom on ``as_closest_canonical`` of a float64 image (no cast)."""
    can = nib.as_closest_canonical(nib.Nifti1Image(vol.data.astype(np.float64), vol.affine))
    zoom = np.array(can.header.get_zooms()) / np.array([spacing] * 3)
    return ndimage.zoom(can.get_fdata(), zoom, order=order, mode="nearest")


def test_the_default_order_is_totalsegmentators_1():
    vol = integer_volume()
    assert DEFAULT_RESAMPLING_ORDER == 1
    default = prepare(vol, 1.5)
    assert default.resampling_order == 1
    assert np.array_equal(default.data, prepare(vol, 1.5, resampling_order=1).data)
    assert not np.array_equal(default.data, prepare(vol, 1.5, resampling_order=3).data)


def test_the_int32_cast_truncates_toward_zero():
    """Not floor (-2.5 -> -2, not -3), not rounding (2.7 -> 2, not 3): numpy's astype(np.int32)."""
    vol = integer_volume()
    zoomed = totalsegmentator_zoom(vol, 1.5, 1)
    prep = prepare(vol, 1.5)
    assert prep.input_cast == CAST_INT32 and prep.data.dtype == np.float32
    assert np.array_equal(prep.data, zoomed.astype(np.int32).astype(np.float32))
    frac = zoomed - np.trunc(zoomed)
    # the volume exercises both directions, so a floor or a round would fail above
    assert np.any((zoomed < 0) & (frac != 0)) and np.any((zoomed > 0) & (frac > 0.5))
    assert not np.array_equal(prep.data, np.floor(zoomed)) and not np.array_equal(prep.data, np.round(zoomed))


@pytest.mark.parametrize("order", range(6))
def test_the_resampling_order_is_the_zooms_spline_order(order):
    vol = integer_volume(axcodes="PIR", spacing=(2.6, 1.2, 0.8), rotation_deg=14.0)
    prep = prepare(vol, 1.5, resampling_order=order)
    assert prep.resampling_order == order and prep.resampled
    assert np.array_equal(prep.data, totalsegmentator_zoom(vol, 1.5, order).astype(np.int32).astype(np.float32))


def test_each_order_gives_its_own_result():
    vol = integer_volume()
    results = [prepare(vol, 1.5, resampling_order=o).data for o in range(6)]
    assert all(not np.array_equal(results[a], results[b]) for a in range(6) for b in range(a + 1, 6))


def test_no_resampling_and_no_cast_when_the_spacing_is_already_the_target():
    """change_spacing returns its input when the header zooms equal the target: float64 data, uncast."""
    vol = integer_volume(axcodes="ASL", spacing=(1.5, 1.5, 1.5))
    prep = prepare(vol, 1.5, resampling_order=3)
    can = nib.as_closest_canonical(nib.Nifti1Image(vol.data, vol.affine))
    assert not prep.resampled and prep.input_cast == CAST_NONE and prep.resampling_order == 3
    assert np.array_equal(prep.data, np.asarray(can.dataobj)) and np.array_equal(prep.affine, can.affine)
    fractional = Volume(vol.data + 0.25, vol.affine, "nifti")  # a float input there keeps its fractions too
    assert np.array_equal(prepare(fractional, 1.5).data, np.asarray(can.dataobj) + 0.25)


def test_float_inputs_keep_float_intensities():
    """The departure: a scaled or float input is zoomed as TotalSegmentator does, but never cast."""
    vol = body_volume("LPS", shape=(20, 18, 12), spacing=(1.1, 0.9, 3.0))
    vol = Volume(vol.data / 1000.0, vol.affine, "nifti")  # MRI scaled to small floats: the cast would zero it
    assert not vol.integer_valued
    prep = prepare(vol, 1.5)
    assert prep.resampled and prep.input_cast == CAST_NONE
    assert np.array_equal(prep.data, totalsegmentator_zoom(vol, 1.5, 1).astype(np.float32))
    assert np.any(prep.data != np.trunc(prep.data))


def test_mode_nearest_keeps_the_last_plane():
    """With scipy's default mode ("constant") the last output plane's coordinate lands a rounding error past
    the input's edge and reads 0 there (shape 28 at 1.2 mm); TotalSegmentator's "nearest" reads the edge."""
    vol = Volume(np.full((28, 6, 6), 7.0, np.float32), np.diag([1.2, 1.5, 1.5, 1.0]), "nifti", integer_valued=True)
    zoom = zoom_factors((np.float32(1.2), 1.5, 1.5), 1.5)
    assert np.any(ndimage.zoom(vol.data, zoom, order=1) == 0)  # what the default mode does here
    for order in range(6):
        data = prepare(vol, 1.5, resampling_order=order).data
        # orders 0 and 1 reproduce a constant exactly; a spline's 6.9999999 truncates to 6, as in TotalSegmentator
        assert np.all(data == 7.0) if order < 2 else np.all((data == 6.0) | (data == 7.0)), order


@pytest.mark.parametrize("bad", [-1, 6, 1.0, "1", True, None])
def test_a_resampling_order_outside_0_to_5_is_refused(bad):
    with pytest.raises(MrisegError, match="0 to 5"):
        check_resampling_order(bad)
    with pytest.raises(MrisegError, match="0 to 5"):
        prepare(integer_volume(), 1.5, resampling_order=bad)
    assert check_resampling_order(np.int64(3)) == 3
