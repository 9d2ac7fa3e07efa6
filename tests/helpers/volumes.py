"""Test volumes in world space: oriented affines and a body-like phantom every orientation shows alike."""

from __future__ import annotations

import numpy as np

from serve.imaging.volume import Volume


def oriented_affine(axcodes: str, spacing, origin=(0.0, 0.0, 0.0), rotation_deg: float = 0.0) -> np.ndarray:
    """An affine whose voxel axes point along ``axcodes``; ``spacing`` is per voxel axis.

    ``rotation_deg`` tilts the result about the world z axis (an oblique scan).
    """
    from nibabel.orientations import axcodes2ornt

    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    for i, (ax, flip) in enumerate(axcodes2ornt(axcodes)):
        aff[int(ax), i] = flip * float(spacing[i])
    t = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff[:3, :3] = rot @ aff[:3, :3]
    aff[:3, 3] = origin
    return aff


def world_coords(shape, affine) -> np.ndarray:
    """RAS world coordinates of every voxel centre, shape (3, *shape)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape((3, *shape))


def body_volume(axcodes: str = "RAS", shape=(40, 36, 24), spacing=(1.3, 1.2, 2.2), rotation_deg: float = 0.0,
                seed: int = 0, left_bright: bool = True, noise: float = 5.0) -> Volume:
    """A smooth body-like volume defined in world space, so every orientation shows the same object.

    With ``left_bright`` the patient's left half (RAS x < 0) is brighter than the right.
    """
    aff = oriented_affine(axcodes, spacing, rotation_deg=rotation_deg)
    centre = aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    aff[:3, 3] = -centre
    x, y, z = world_coords(shape, aff)
    r = np.sqrt((x / 22) ** 2 + (y / 18) ** 2)
    data = np.where(r < 1, 400.0, 20.0)
    data += 250.0 * np.exp(-(((x + 8) / 5) ** 2 + (y / 5) ** 2 + (z / 8) ** 2))
    data += 180.0 * np.exp(-(((x - 9) / 4) ** 2 + ((y - 6) / 6) ** 2 + ((z - 5) / 6) ** 2))
    if left_bright:
        data += np.where(x < 0, 300.0, 0.0)
    rng = np.random.default_rng(seed)
    data += rng.normal(0, noise, size=shape) if noise else 0.0
    return Volume(data.astype(np.float32), aff, "nifti")
