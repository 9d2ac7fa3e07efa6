"""What SimpleITK reads from a file, for comparing the original upload with our canonical copy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from hypothesis import strategies as st


@dataclass(frozen=True)
class SitkView:
    """Everything of an image that reaches the pipeline: voxel type and bytes, grid and geometry, exactly."""

    pixel_type: str
    components: int
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    voxels: bytes


def sitk_view(path: Path, image_io: str = "") -> SitkView:
    """Read ``path`` with SimpleITK (with ``image_io`` only, when given)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    if image_io:
        reader.SetImageIO(image_io)
    img = reader.Execute()
    return SitkView(img.GetPixelIDTypeAsString(), img.GetNumberOfComponentsPerPixel(), img.GetSize(),
                    img.GetSpacing(), img.GetOrigin(), img.GetDirection(),
                    sitk.GetArrayViewFromImage(img).tobytes())


def sitk_image(arr_xyz: np.ndarray, spacing, origin, direction) -> sitk.Image:
    """A SimpleITK image of ``arr_xyz`` indexed (x, y, z[, t]), with the given LPS geometry."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr_xyz, tuple(range(arr_xyz.ndim))[::-1])))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def rotation(angles: tuple[float, float, float]) -> np.ndarray:
    """A 3x3 rotation from three angles (radians), the direction cosines of an oblique scan."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def damage_edits(tokens: list[bytes]):
    """Up to three edits of a header: replace, insert or delete a token (or two random bytes), or flip case."""
    piece = st.lists(st.sampled_from(tokens) | st.binary(min_size=1, max_size=2), min_size=1, max_size=2)
    return st.lists(st.tuples(st.sampled_from(["replace", "insert", "delete", "flip"]), st.integers(0, 10**6),
                              piece), min_size=1, max_size=3)


def mutate(head: bytes, edits) -> bytes:
    """``head`` with ``edits`` (from :func:`damage_edits`) applied."""
    buf = bytearray(head)
    for op, at, payload in edits:
        at %= len(buf) or 1
        piece = b"".join(payload)
        if op == "replace":
            buf[at: at + len(piece)] = piece
        elif op == "insert":
            buf[at:at] = piece
        elif op == "delete":
            del buf[at: at + len(piece)]
        elif chr(buf[at]).isalpha():
            buf[at] ^= 0x20
    return bytes(buf)
