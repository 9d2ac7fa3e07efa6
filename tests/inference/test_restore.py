"""serve/inference/restore.py: labels back to the input grid as TotalSegmentator 2.18 does (order 0, mode "nearest")."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from serve.inference.preprocess import prepare
from serve.inference.restore import to_input_grid, zoom_to_shape
from serve.imaging.volume import Volume


@pytest.mark.parametrize("slices,spacing", [(14, 3.0), (15, 3.0), (24, 3.0), (12, 3.3)])
def test_the_last_slice_keeps_its_labels(slices, spacing):
    """A 3 mm scan of 14 slices is 28 at 1.5 mm; the order-0 zoom back lands the last slice's coordinate a
    rounding error past the label map's edge, where scipy's default mode ("constant") reads label 0."""
    vol = Volume(np.ones((10, 9, slices), np.float32), np.diag([1.5, 1.5, spacing, 1.0]), "nifti")
    prep = prepare(vol, 1.5)
    labels = np.full(prep.data.shape, 5, np.uint8)
    assert np.any(ndimage.zoom(labels, np.array(vol.shape) / np.array(labels.shape), order=0) == 0)  # the old way
    back = to_input_grid(labels, prep)
    assert back.shape == vol.shape and np.all(back == 5)


def test_zoom_to_shape_is_change_spacings_order_0_zoom():
    rng = np.random.default_rng(2)
    labels = rng.integers(1, 80, (28, 17, 23), dtype=np.uint8)  # 28 -> 14: the last plane lands past the edge
    shape = (14, 35, 23)
    want = ndimage.zoom(labels.astype(np.float64), np.array(shape) / np.array(labels.shape), order=0,
                        mode="nearest").astype(np.uint8)
    assert np.array_equal(zoom_to_shape(labels, shape), want)
    assert zoom_to_shape(labels, labels.shape) is labels  # equal shapes: change_spacing returns its input
