"""NIfTI (.nii, .nii.gz) through nibabel, with the header checks readers would otherwise disagree on."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener

from serve.errors import CorruptFileError, InvalidVolumeError, UnsupportedFormatError, VolumeTooLargeError
from serve.imaging.volume import (DEFAULT_MAX_VOXELS, Volume, check_affine, check_decode_memory, check_shape,
                                  finish)


def nifti_integer_valued(img) -> bool:
    """Whether a NIfTI image's voxels, as nibabel scales them, are integers by construction.

    Args:
        img: a nibabel NIfTI image (header read, data not needed).

    Returns:
        True for an integer on-disk type whose scaling, as nibabel applies it, is the identity slope (scl_slope 1,
        or 0 / not finite, which the standard and nibabel read as "unscaled", the intercept then ignored) with an
        integral intercept.
    """
    if img.get_data_dtype().kind not in "iu":
        return False
    slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    return slope == 1.0 and inter.is_integer()


#: nibabel reads each NIfTI header extension whole, as large as its own size field says (up to 2 GiB).
MAX_NIFTI_EXTENSION_BYTES = 16 << 20


def check_nifti_extensions(path: Path) -> None:
    """Refuse header extensions over :data:`MAX_NIFTI_EXTENSION_BYTES` in all, or of impossible size, before
    nibabel reads them: a gzip of zeros turns 2 MB of upload into a 2 GiB extension in memory.

    Walks the extensions as nibabel does (until ``vox_offset``, or to the end when it is below the header),
    skipping their content.
    """
    with ImageOpener(str(path)) as f:
        head = f.read(544)
        order = next((o for o in "<>" if len(head) >= 4 and struct.unpack(o + "i", head[:4])[0] in (348, 540)), None)
        if order is None:
            return  # not a NIfTI header; nibabel says so
        size = struct.unpack(order + "i", head[:4])[0]
        if len(head) < size + 4 or head[size] == 0:
            return  # no extensions
        vox_offset = (struct.unpack(order + "f", head[108:112]) if size == 348 else
                      struct.unpack(order + "q", head[168:176]))[0]
        budget, total = vox_offset - (size + 4), 0
        f.seek(size + 4)
        while budget >= 16 or budget < 0:  # NaN: neither, as in nibabel
            ext = f.read(8)
            if len(ext) < 8:
                return  # nibabel ends or refuses here
            esize = struct.unpack(order + "i", ext[:4])[0]
            if esize < 16:  # nibabel would read(esize - 8): everything left, for a negative size
                raise CorruptFileError(f"a NIfTI header extension claims {esize} bytes; an extension has at "
                                       f"least 16. The file is corrupt")
            total += esize
            if total > MAX_NIFTI_EXTENSION_BYTES:
                raise VolumeTooLargeError(f"the NIfTI header extensions take more than "
                                          f"{MAX_NIFTI_EXTENSION_BYTES >> 20} MiB; save the volume without them")
            f.seek(esize - 8, 1)
            budget -= esize


def read_nifti(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    try:
        check_nifti_extensions(path)
        img = nib.load(str(path))
    except (ImageFileError, nib.spatialimages.HeaderDataError) as e:
        raise CorruptFileError(f"not a readable NIfTI file ({e}); check that the upload is complete and "
                               f"really a .nii/.nii.gz") from e
    except (EOFError, zlib.error, OSError, ValueError) as e:
        raise CorruptFileError(f"the NIfTI file is truncated or corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UnsupportedFormatError(f"the file is a {type(img).__name__}, not NIfTI; convert it to NIfTI")
    check_shape(img.shape, max_voxels)  # header only: nothing decoded yet
    dtype = img.get_data_dtype()
    check_decode_memory(img.shape, dtype.itemsize)
    if dtype.kind not in "iuf":  # casting complex drops the imaginary part; RGB has no single grey value
        raise InvalidVolumeError(f"the voxels are {img.header.get_value_label('datatype')} values; a scalar, "
                                 f"real-valued (grey-value) volume is needed: save the magnitude image, or convert "
                                 f"colour to grey values")
    _check_pixdim(path, type(img.header))
    affine = check_affine(img.affine)
    check_nifti_orientation(img.header)
    check_nifti_units(img.header)
    try:
        data = img.get_fdata(dtype=np.float32)
    except (EOFError, zlib.error, OSError, ValueError, OverflowError) as e:  # Overflow: a vox_offset of 1e27
        raise CorruptFileError(f"the NIfTI file is truncated or corrupt: its header promises "
                               f"{tuple(img.shape)} voxels but the data cannot be read ({type(e).__name__})") from e
    finally:
        img.uncache()
    header = img.header.copy()
    return finish(data, affine, "nifti", max_voxels, header, nifti_integer_valued(img))


def check_nifti_units(header) -> None:
    """Refuse spatial units other than millimetres (or unset, which every reader takes as mm).

    nibabel's affine carries no unit: a file in metres or microns would be segmented a thousand times too
    small or too large (and ITK scales it where nibabel does not, so readers would disagree).
    """
    try:
        unit = header.get_xyzt_units()[0]
    except KeyError:  # a code the NIfTI standard does not define
        raise InvalidVolumeError("the NIfTI header's unit code (xyzt_units) is not one the standard defines; "
                                 "the file is corrupt, or save it again with millimetre units") from None
    if unit not in ("mm", "unknown"):
        raise InvalidVolumeError(f"the NIfTI header gives its voxel sizes in {unit}s, not millimetres; save it "
                                 f"with millimetre units (the affine scaled to mm)")


def check_nifti_orientation(header) -> None:
    """Refuse a NIfTI header whose orientation readers would disagree on.

    With sform and qform codes both 0 there is no orientation at all (nibabel falls back to its Analyze
    default, ITK to another, the NIfTI standard to a third), so left and right are a guess. With both set,
    the sform wins here, as in nibabel and TotalSegmentator, but ITK reads the qform unless the sform
    code is 1: two transforms with different axis directions would put left labels on the right there.
    """
    scode, qcode = int(header["sform_code"]), int(header["qform_code"])
    if not scode and not qcode:
        raise InvalidVolumeError("the NIfTI header holds no orientation (sform and qform codes are 0), so left "
                                 "and right cannot be told apart; set the orientation (e.g. with fslorient or "
                                 "nibabel's set_sform) and upload again")
    if not (scode and qcode):
        return
    try:  # nibabel refuses some quaternions (b^2 + c^2 + d^2 > 1) only when asked for the qform
        axes = [nib.aff2axcodes(a) if np.all(np.isfinite(a)) else None
                for a in (header.get_sform(), header.get_qform())]
    except (np.linalg.LinAlgError, ValueError):
        axes = [None]
    if None in axes:
        raise InvalidVolumeError("the NIfTI header's sform or qform is not a valid transform, and readers choose "
                                 "between them differently; fix or drop the broken one and upload again")
    if axes[0] != axes[1]:
        raise InvalidVolumeError(f"the NIfTI header's sform ({''.join(axes[0])}) and qform ({''.join(axes[1])}) "
                                 f"point the axes different ways, so viewers would disagree on left and right; "
                                 f"make them agree and upload again")
    # Same directions but other voxel sizes or another place: volumes in mL, or where the labels lie over
    # the scan, would depend on the reader, for the scan and for our outputs alike (they keep its header).
    sform, qform = header.get_sform(), header.get_qform()
    zooms = [np.linalg.norm(a[:3, :3], axis=0) for a in (sform, qform)]
    if not np.allclose(zooms[0], zooms[1], rtol=SFORM_QFORM_RTOL, atol=0):
        raise InvalidVolumeError(f"the NIfTI header's sform and qform give different voxel sizes "
                                 f"({_mm(zooms[0])} vs {_mm(zooms[1])} mm), so readers would measure the "
                                 f"structures differently; make them agree and upload again")
    shift = float(np.linalg.norm(sform[:3, 3] - qform[:3, 3]))
    if shift > SFORM_QFORM_SHIFT_MM:
        raise InvalidVolumeError(f"the NIfTI header's sform and qform place the volume {shift:.1f} mm apart, so "
                                 f"labels would not lie over the scan in every viewer; make them agree and upload "
                                 f"again")


SFORM_QFORM_RTOL = 0.01     # the qform's float32 quaternion reproduces a sform's voxel sizes far closer than this
SFORM_QFORM_SHIFT_MM = 1.0  # under a typical MR voxel


def _mm(zooms: np.ndarray) -> str:
    return " x ".join(f"{z:.3g}" for z in zooms)


def _check_pixdim(path: Path, header_class) -> None:
    """Refuse a zero, negative or non-finite voxel size in the raw NIfTI header."""
    # nibabel's loaded header is already "fixed" (0 -> 1, negative -> abs); ITK instead flips an axis
    # with a negative pixdim, so the two readers would place the same file differently.
    with ImageOpener(str(path)) as f:
        raw = header_class.from_fileobj(f, check=False)
    zooms = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    if not np.all(zooms > 0):  # NaN fails too
        raise InvalidVolumeError(f"the NIfTI header's voxel size pixdim[1:4] = {tuple(float(z) for z in zooms)} "
                                 f"is not positive; readers disagree on what a zero or negative voxel size means, so "
                                 f"the geometry would be ambiguous. Rewrite the header with the true voxel sizes")


def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, header=None) -> Path:
    """Save ``data`` as NIfTI (used for outputs and tests)."""
    img = nib.Nifti1Image(data, affine, header)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return Path(path)
