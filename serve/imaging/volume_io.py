"""Read an input scan into a 3D float32 array with a RAS+ affine.

NIfTI goes through nibabel, other single-file volumes (.mha, .mhd, .nrrd)
through SimpleITK, and DICOM series (a folder, or a zip of one) through
SimpleITK's GDCM series reader. A .mha or .nrrd is first checked by our own
strict header reader (:mod:`serve.imaging.formats`), which writes a canonical copy that
SimpleITK then reads instead of the original. Every reader checks the voxel
count from the header *before* decoding the data, so a decompression bomb costs
nothing, and every failure a user can cause becomes a
:class:`serve.errors.MrisegError`.
"""

from __future__ import annotations

import contextvars
import logging
import lzma
import math
import mmap
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener

from serve.errors import CorruptFileError, InvalidVolumeError, MrisegError, UnsupportedFormatError, VolumeTooLargeError
from serve.imaging.formats import metaimage, nrrd

log = logging.getLogger(__name__)

#: 512 x 512 x 1024 voxels: a large whole-body MRI; 1 GiB as float32.
DEFAULT_MAX_VOXELS: int = int(os.environ.get("MRISEG_MAX_VOXELS", 512 * 512 * 1024))
#: Bound on what a DICOM zip may expand to.
DEFAULT_MAX_ZIP_BYTES: int = int(os.environ.get("MRISEG_MAX_ZIP_BYTES", 4 * 1024**3))
MAX_ZIP_ENTRIES = 20000
#: Deeper entry paths are refused: Python's recursive folder walks and removals fail near 1000 levels.
MAX_ZIP_DEPTH = 32

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".ima")
ZIP_SUFFIXES = (".zip",)
SUPPORTED = NIFTI_SUFFIXES + SITK_SUFFIXES + ZIP_SUFFIXES + DICOM_SUFFIXES

# DICOM/ITK world coordinates are LPS; nibabel's are RAS.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Volume:
    """A 3D scan: ``data[i, j, k]`` in on-disk voxel order, ``affine`` maps (i, j, k, 1) to RAS+ mm."""

    data: np.ndarray
    affine: np.ndarray
    source_format: str  # "nifti" | "sitk" | "dicom"
    header: Any = None  # the nibabel header of NIfTI inputs, copied into NIfTI outputs
    #: integer voxels on disk with identity scaling (:func:`nifti_integer_valued`, :func:`dicom_integer_valued`):
    #: only such inputs get TotalSegmentator's int32 cast after resampling (serve.inference.preprocess)
    integer_valued: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore


def suffix_of(name: str) -> str:
    """The format suffix of a file name (``.nii.gz`` counts as one suffix)."""
    low = name.lower()
    for s in sorted(SUPPORTED, key=len, reverse=True):
        if low.endswith(s):
            return s
    return PurePosixPath(low).suffix


# -- validation ----------------------------------------------------------------

def _squeezed_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Drop trailing singleton dimensions beyond the third (one time point, one channel)."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def check_shape(shape: Sequence[int], max_voxels: int) -> tuple[int, int, int]:
    """Validate a header shape before any data is decoded."""
    sq = _squeezed_shape(shape)
    if any(int(s) < 0 for s in shape):
        raise CorruptFileError(f"the header gives a negative dimension (shape {tuple(int(s) for s in shape)}); "
                               f"the file is corrupt")
    if any(s == 0 for s in sq):
        raise InvalidVolumeError(f"the volume has a zero-size dimension (shape {tuple(shape)}); "
                                 f"the file holds no image data")
    if len(sq) > 3:
        raise InvalidVolumeError(f"the volume is {len(sq)}D with shape {tuple(shape)}; only 3D volumes (or 4D "
                                 f"with a single time point) can be segmented. Extract one time point first")
    if len(sq) < 3 or min(sq) == 1:
        raise InvalidVolumeError(f"the volume has a single slice (shape {tuple(shape)}); a 3D volume with at "
                                 f"least 2 voxels along every axis is needed")
    n = math.prod(sq)  # Python ints: numpy's int64 product wraps around for a forged header's sizes
    if n > max_voxels:
        raise VolumeTooLargeError(f"the volume has {n} voxels (shape {sq}), more than the limit of {max_voxels}; "
                                  f"crop or downsample it first")
    return sq  # type: ignore[return-value]


#: The memory one decode may take (read_volume's max_decode_bytes), for the readers below it.
_DECODE_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("decode_budget", default=None)
#: Bytes per voxel a reader's array costs beyond its source type: the float32 copy and its contiguous copy.
DECODE_OVERHEAD_PER_VOXEL = 8


def check_decode_memory(shape: Sequence[int], itemsize: int) -> None:
    """Refuse, from the header, a volume whose decoding would take more than the decode budget.

    Args:
        shape: the header's shape.
        itemsize: bytes per voxel of the stored type (8 for float64: a small gzip can hold gigabytes of it).

    Raises:
        VolumeTooLargeError: over the budget set by :func:`read_volume`'s ``max_decode_bytes``.
    """
    budget = _DECODE_BUDGET.get()
    if budget is None:
        return
    need = math.prod(int(s) for s in shape) * (int(itemsize) + DECODE_OVERHEAD_PER_VOXEL)
    if need > budget:
        raise VolumeTooLargeError(f"decoding the volume ({tuple(int(s) for s in shape)} voxels of {itemsize} bytes) "
                                  f"needs about {need >> 20} MiB, more than the decoder's {budget >> 20} MiB; "
                                  f"crop or downsample it, or save it with a smaller voxel type (e.g. int16)")


def check_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InvalidVolumeError("the volume's voxel-to-world transform is missing or not finite")
    rzs = affine[:3, :3]
    if abs(np.linalg.det(rzs)) < 1e-12 or np.linalg.cond(rzs) > 1e8:
        raise InvalidVolumeError("the volume's voxel-to-world transform is not invertible (a zero voxel size "
                                 "or degenerate direction cosines); fix the header's spacing/orientation")
    return affine


def check_data(data: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InvalidVolumeError(f"the volume contains {bad} non-finite voxel value(s) (NaN or infinity); "
                                 f"replace them before segmenting")
    return data


def _finish(data: np.ndarray, affine: np.ndarray, fmt: str, max_voxels: int, header=None,
            integer_valued: bool = False) -> Volume:
    shape = check_shape(data.shape, max_voxels)
    data = np.asarray(data).reshape(shape)
    if data.dtype != np.float32:
        with np.errstate(over="ignore", invalid="ignore"):
            data = data.astype(np.float32)
    data = np.ascontiguousarray(data)
    return Volume(check_data(data), check_affine(affine), fmt, header, integer_valued)


# -- integer-valued inputs ------------------------------------------------------------
# TotalSegmentator casts the resampled image to int32 whatever it holds. We do so only where the input's
# voxels are integers by construction: an integer type on disk whose scaling keeps them integers. Any other
# input (float on disk, or scaled by a fraction, as MRI often is) keeps float intensities (docs/inference.md).

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


def dicom_integer_valued(pixel_id: int, rescales: Sequence[tuple[str | None, str | None]]) -> bool:
    """Whether a DICOM image's voxels, as GDCM rescales them, are integers by construction.

    Args:
        pixel_id: the SimpleITK pixel type ITK chose for the rescaled voxels.
        rescales: (RescaleSlope, RescaleIntercept) of every file read, None where the tag is absent.

    Returns:
        True when ITK's type is an integer and every file has RescaleSlope 1 (or none) and an integral
        RescaleIntercept (or none).
    """
    if not sitk_integer_pixels(pixel_id):
        return False
    for slope, inter in rescales:
        try:
            s = 1.0 if slope is None or not slope.strip() else float(slope.strip())
            i = 0.0 if inter is None or not inter.strip() else float(inter.strip())
        except ValueError:  # a multi-valued or garbled DS: nothing to vouch for the values
            return False
        if s != 1.0 or not i.is_integer():
            return False
    return True


def sitk_integer_pixels(pixel_id: int) -> bool:
    """A SimpleITK scalar pixel type is an integer type."""
    # lazy: SimpleITK loads a large native library; only MetaImage, NRRD and DICOM inputs need it
    import SimpleITK as sitk

    return pixel_id in (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32,
                        sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64)


_RESCALE_TAGS = ("0028|1053", "0028|1052")  # RescaleSlope, RescaleIntercept


# -- NIfTI ----------------------------------------------------------------------

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
    return _finish(data, affine, "nifti", max_voxels, header, nifti_integer_valued(img))


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


# -- SimpleITK (single file and DICOM series) ------------------------------------

def sitk_geometry_to_affine(spacing: Sequence[float], origin: Sequence[float],
                            direction: Sequence[float]) -> np.ndarray:
    """A nibabel (RAS+) affine from ITK's LPS spacing/origin/direction (first three dimensions)."""
    n = int(round(len(direction) ** 0.5))
    d = np.asarray(direction, dtype=np.float64).reshape(n, n)[:3, :3]
    aff = np.eye(4)
    aff[:3, :3] = _LPS_TO_RAS @ d @ np.diag(np.asarray(spacing, dtype=np.float64)[:3])
    aff[:3, 3] = _LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)[:3]
    return aff


def _sitk_array(image) -> np.ndarray:
    """SimpleITK's array is (k, j, i); return (i, j, k[, t])."""
    # lazy: SimpleITK loads a large native library; only MetaImage, NRRD and DICOM inputs need it
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidVolumeError(f"the volume has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                                 f"(e.g. RGB or vector data); a scalar (grey-value) volume is needed")
    arr = sitk.GetArrayViewFromImage(image)
    return np.transpose(arr, tuple(range(arr.ndim))[::-1])


_DICOM_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_DICOM_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())


_UNDEFINED = 0xFFFFFFFF
_IMPLICIT_LE, _BIG_ENDIAN, _DEFLATED = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"


def check_dicom_lengths(path: Path) -> None:
    """Refuse a DICOM file with an element that claims more bytes than the file holds.

    GDCM allocates (and zeroes) an element's declared length before reading it, so a 1 KB file can claim
    gigabytes; ITK hands any file it recognises as DICOM to GDCM, whatever its suffix. Every element
    header is walked (sequence items and their contents too); values are skipped, never read.
    """
    size = path.stat().st_size
    if size < 8:
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[128:132] == b"DICM":
            _walk_dicom(m, 132, size)
        elif m[0:2] in (b"\x02\x00", b"\x08\x00"):  # no preamble: GDCM still reads it from either group
            _walk_dicom(m, 0, size)


def _walk_dicom(m: mmap.mmap, pos: int, size: int) -> None:
    def corrupt(tag: tuple[int, int], what: str) -> CorruptFileError:
        return CorruptFileError(f"a DICOM file's element ({tag[0]:04x},{tag[1]:04x}) {what}; the file is "
                                f"truncated or corrupt. Export it again")

    endian, explicit, syntax, fragments = "little", True, _IMPLICIT_LE, False
    in_meta = m[pos:pos + 2] == b"\x02\x00"
    if not in_meta and not m[pos + 4:pos + 6].isalpha():  # no file meta: GDCM guesses implicit VR
        explicit = False
    while pos + 8 <= size:
        if in_meta and m[pos:pos + 2] != b"\x02\x00":  # the data set starts: its transfer syntax applies
            in_meta = False
            if syntax == _DEFLATED:
                return  # the rest is a deflate stream; zlib inflates it in bounded steps
            endian, explicit = ("big", True) if syntax == _BIG_ENDIAN else ("little", syntax != _IMPLICIT_LE)
        order = "little" if in_meta else endian
        tag = (int.from_bytes(m[pos:pos + 2], order), int.from_bytes(m[pos + 2:pos + 4], order))
        vr = m[pos + 4:pos + 6]
        if tag[0] == 0xFFFE:  # item and delimiters: no VR, whatever the syntax
            header, length = 8, int.from_bytes(m[pos + 4:pos + 8], order)
        elif (in_meta or explicit) and vr in _DICOM_SHORT_VRS:
            header, length = 8, int.from_bytes(m[pos + 6:pos + 8], order)
        elif (in_meta or explicit) and vr in _DICOM_LONG_VRS:
            header, length = 12, int.from_bytes(m[pos + 8:pos + 12], order)
        elif (in_meta or explicit) and vr.isalpha():
            # GDCM reads an unknown VR with a 4-byte length, from bytes that are not one
            raise corrupt(tag, f"has the invalid value representation {vr.decode('latin-1')!r}")
        else:  # implicit VR (GDCM also falls back to it for non-letter VR bytes)
            header, length, vr = 8, int.from_bytes(m[pos + 4:pos + 8], order), b""
        if tag == (0x0002, 0x0010) and length < 128:
            syntax = m[pos + header:pos + header + length].rstrip(b"\0 ").decode("latin-1")
        if tag == (0xFFFE, 0xE0DD):
            fragments = False
        if length == _UNDEFINED:  # a sequence, item or encapsulated pixel data: walk into it
            fragments = fragments or tag == (0x7FE0, 0x0010)
            pos += header
            continue
        if pos + header + length > size:
            raise corrupt(tag, f"claims {length} bytes but the file holds {size}")
        descend = vr == b"SQ" or (tag == (0xFFFE, 0xE000) and not fragments)
        pos += header if descend else header + length


#: The formats we read ourselves first, their canonicaliser, and the ITK reader of the canonical copy.
_CANONICAL = {".mha": (metaimage.canonicalise, "MetaImageIO"), ".nrrd": (nrrd.canonicalise, "NrrdImageIO")}


def read_sitk_file(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS,
                   scratch_dir: str | os.PathLike | None = None) -> Volume:
    """Read a single-file volume (.mha, .mhd, .nrrd, .nhdr, or one DICOM file) through SimpleITK.

    A .mha or .nrrd never reaches SimpleITK as it is: :mod:`serve.imaging.formats` checks its header and data
    strictly and writes a canonical copy into a new folder under ``scratch_dir``, which SimpleITK reads
    (with that format's reader only) and which is removed afterwards. A .mhd (trusted, local: uploads refuse
    it) gets the same header check and is then read by SimpleITK with its data file.

    Args:
        path: the file.
        max_voxels: the largest voxel count accepted, checked from the header before any data is read.
        scratch_dir: where the canonical copy's folder goes (default: the system's temporary folder); the copy
            is as large as the uncompressed voxel data.

    Returns:
        The volume.
    """
    suffix = suffix_of(path.name)
    if suffix in _CANONICAL:
        canonicalise, image_io = _CANONICAL[suffix]
        tmp = Path(tempfile.mkdtemp(prefix="mriseg-canon-", dir=scratch_dir))
        try:
            return _read_sitk(canonicalise(path, tmp, max_voxels), max_voxels, "sitk", image_io)
        except MrisegError as e:  # ITK's messages quote the copy's path, which the caller never gave
            e.message = e.message.replace(str(tmp), "the input")
            e.args = (e.message,)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    check_dicom_lengths(path)
    if suffix == ".mhd":
        metaimage.check_detached_header(path, max_voxels)
    return _read_sitk(path, max_voxels, "dicom" if suffix in DICOM_SUFFIXES else "sitk")


def _sitk_itemsize(pixel_id: int) -> int:
    """Bytes per voxel of a SimpleITK scalar pixel type (8 for any other: the most a scalar takes)."""
    # lazy: SimpleITK loads a large native library; only MetaImage, NRRD and DICOM inputs need it
    import SimpleITK as sitk

    sizes = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
             sitk.sitkInt32: 4, sitk.sitkFloat32: 4}
    return sizes.get(pixel_id, 8)


def _read_sitk(path: Path, max_voxels: int, fmt: str, image_io: str = "") -> Volume:
    # lazy: SimpleITK loads a large native library; only MetaImage, NRRD and DICOM inputs need it
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    if image_io:  # the canonical copy's own reader: no other ImageIO may claim the file
        reader.SetImageIO(image_io)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise CorruptFileError(f"cannot read the image header ({_error_reason(e)}); the file is corrupt or not "
                               f"in the format its name says") from e
    size = reader.GetSize()
    check_shape(size, max_voxels)
    check_decode_memory(size, _sitk_itemsize(reader.GetPixelID()))
    if reader.GetNumberOfComponents() != 1:
        raise InvalidVolumeError(f"the volume has {reader.GetNumberOfComponents()} components per voxel; "
                                 f"a scalar (grey-value) volume is needed")
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise CorruptFileError(f"the image data cannot be read ({_error_reason(e)}); the file is truncated or "
                               f"corrupt") from e
    affine = sitk_geometry_to_affine(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    if fmt == "dicom":
        integer = dicom_integer_valued(image.GetPixelID(), [tuple(
            image.GetMetaData(k) if image.HasMetaDataKey(k) else None for k in _RESCALE_TAGS)])
    else:  # .mha/.nrrd/.mhd have no scaling ITK applies (serve.imaging.formats refuses the fields that would)
        integer = sitk_integer_pixels(image.GetPixelID())
    return _finish(_sitk_array(image), affine, fmt, max_voxels, integer_valued=integer)


def read_dicom_dir(folder: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """The largest DICOM series in ``folder`` (searched recursively)."""
    # lazy: SimpleITK loads a large native library; only MetaImage, NRRD and DICOM inputs need it
    import SimpleITK as sitk

    best: list[str] = []
    tied: set[str] = set()  # series UIDs holding as many files as the best
    entries = [p for p in folder.rglob("*") if not p.is_symlink()]
    for p in entries:
        if p.is_file():
            check_dicom_lengths(p)
    dirs = [folder] + sorted(p for p in entries if p.is_dir())
    found: dict[str, list[str]] = {}
    for d in dirs:
        for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(d)) or ():
            found.setdefault(sid, []).extend(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(d), sid))
    plain = {str(p) for p in entries if p.is_file()}
    for sid, files in found.items():
        if len({os.path.dirname(f) for f in files}) > 1:
            # one series split over folders (CD and PACS exports do): GDCM lists it whole, in slice order,
            # from the top folder; what it reaches through a symbolic link is left out, as above
            whole = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid, False, True)
            files = [f for f in whole if f in plain]
        if len(files) > len(best):
            best, tied = list(files), {sid}
        elif files and len(files) == len(best):
            tied.add(sid)
    if not best:
        raise UnsupportedFormatError("no DICOM series found; give a folder (or a zip) holding the slices of one "
                                     "series, a NIfTI file (.nii/.nii.gz) or an .mha/.nrrd volume")
    if len(tied) > 1:  # e.g. T1 and T2 of one study: which one was segmented would be GDCM's listing order
        raise InvalidVolumeError(f"the input holds {len(tied)} DICOM series of {len(best)} file(s) each and none "
                                 f"is the largest; upload the one series to segment")
    head = sitk.ImageFileReader()
    head.SetFileName(best[0])
    try:
        head.ReadImageInformation()
    except RuntimeError as e:
        raise CorruptFileError(f"cannot read a DICOM header ({_error_reason(e)})") from e
    size = list(head.GetSize())
    if len(best) > 1:
        # one slice per file: the number of files is the third dimension
        size = size[:2] + [len(best) * (size[2] if len(size) > 2 else 1)]
    check_shape(size, max_voxels)
    check_decode_memory(size, _sitk_itemsize(head.GetPixelID()))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(best)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise CorruptFileError(f"the DICOM series cannot be decoded ({_error_reason(e)})") from e
    if len(best) > 1:
        check_slice_geometry([_slice_tags(reader, i) for i in range(len(best))])
    affine = sitk_geometry_to_affine(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    rescales = [tuple(reader.GetMetaData(i, k) if reader.HasMetaDataKey(i, k) else None for k in _RESCALE_TAGS)
                for i in range(len(best))]
    return _finish(_sitk_array(image), affine, "dicom", max_voxels,
                   integer_valued=dicom_integer_valued(image.GetPixelID(), rescales))


def _slice_tags(reader, i: int) -> tuple[str, str] | None:
    """(ImagePositionPatient, ImageOrientationPatient) of slice ``i``, None where either is missing."""
    keys = ("0020|0032", "0020|0037")
    if not all(reader.HasMetaDataKey(i, k) for k in keys):
        return None
    return reader.GetMetaData(i, keys[0]), reader.GetMetaData(i, keys[1])


#: Relative tolerance on slice steps and on the stack's skew; scanners write positions to about 1e-5 mm.
SLICE_TOLERANCE = 0.01


def check_slice_geometry(tags: Sequence[tuple[str, str] | None]) -> None:
    """Refuse a slice stack that one spacing and one direction cannot describe.

    ITK stacks such slices anyway, with the first step's spacing and no shear (it only warns on stderr):
    a gap, uneven steps or a gantry tilt would place labels millimetres off, and a localizer or several
    echoes under one series UID would be stacked into a meaningless volume.
    """
    if len(tags) < 2 or any(t is None for t in tags):
        return  # nothing to check against (ITK then assumes a regular stack, as other readers do)
    try:
        pos = np.array([[float(v) for v in t[0].split("\\")] for t in tags])
        ori = np.array([[float(v) for v in t[1].split("\\")] for t in tags])
    except ValueError as e:
        raise CorruptFileError("a slice's position or orientation is not numeric") from e
    if pos.shape[1] != 3 or ori.shape[1] != 6:
        raise CorruptFileError("a slice's position or orientation does not have 3 and 6 values")
    if np.abs(ori - ori[0]).max() > 1e-3:
        raise InvalidVolumeError("the series mixes slice orientations (a localizer?); upload one stack of "
                                 "parallel slices")
    normal = np.cross(ori[0, :3], ori[0, 3:])
    along = np.sort(pos @ normal)
    steps = np.diff(along)
    step = float(np.median(steps))
    if steps.min() < 1e-3:
        raise InvalidVolumeError("several slices lie at the same position (echoes, time points or a repeat in "
                                 "one series); upload one volume")
    if np.abs(steps - step).max() > SLICE_TOLERANCE * step + 1e-3:
        raise InvalidVolumeError(f"the slices are unevenly spaced (steps from {steps.min():.3g} to "
                                 f"{steps.max():.3g} mm); a gap or uneven steps would misplace the labels. "
                                 f"Upload a series with uniform spacing, or resample it to NIfTI first")
    span = pos[np.argmax(pos @ normal)] - pos[np.argmin(pos @ normal)]
    skew = np.linalg.norm(span - (span @ normal) * normal) / max(float(span @ normal), 1e-6)
    if skew > SLICE_TOLERANCE:
        raise InvalidVolumeError(f"the slices are not stacked perpendicular to their planes (a tilt of "
                                 f"{np.degrees(np.arctan(skew)):.1f} degrees, e.g. gantry tilt); resample the "
                                 f"series to an orthogonal grid (e.g. dcm2niix) and upload the NIfTI")


def _error_reason(e: Exception) -> str:
    """The line of a reader's error that says what went wrong (the last), cut to 300 characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # ITK's messages start with file/line noise; the last line says what went wrong
    return lines[-1][:300] if lines else type(e).__name__


# -- zip --------------------------------------------------------------------------

def safe_extract_zip(path: Path, dest: Path, max_bytes: int = DEFAULT_MAX_ZIP_BYTES) -> None:
    """Extract ``path`` into ``dest``, refusing path traversal, links and more than ``max_bytes``."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:  # ValueError: a UTF-8 flagged name that is not
        raise CorruptFileError(f"not a readable zip archive ({e})") from e
    except NotImplementedError as e:  # e.g. "zip file version 11.5"
        raise UnsupportedFormatError(f"the zip archive needs a feature this server cannot read ({e}); zip the "
                                     f"series again with a standard zip tool (deflate, no password)") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            raise VolumeTooLargeError(f"the zip holds {len(infos)} entries, more than {MAX_ZIP_ENTRIES}")
        declared = sum(i.file_size for i in infos)
        if declared > max_bytes:
            raise VolumeTooLargeError(f"the zip expands to {declared} bytes, more than the limit of {max_bytes}")
        root = dest.resolve()
        written = 0
        for info in infos:
            name = info.filename.replace("\\", "/")
            if not name:  # zipfile's own is_dir() would fail with IndexError
                raise CorruptFileError("the zip contains an entry without a name; the archive is corrupt")
            parts = PurePosixPath(name).parts
            if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
                raise CorruptFileError(f"the zip contains an unsafe path ({name!r}); archives must only hold "
                                       f"relative paths inside the archive")
            if len(parts) - 1 > MAX_ZIP_DEPTH:
                raise CorruptFileError(f"the zip nests an entry {len(parts) - 1} folders deep, more than "
                                       f"{MAX_ZIP_DEPTH}; zip the series folder itself")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise CorruptFileError("the zip contains a symbolic link; archives must only hold plain files")
            if info.is_dir():
                continue
            target = (root / name).resolve()
            if root not in target.parents:
                raise CorruptFileError(f"the zip contains an unsafe path ({name!r})")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    # count real bytes: a forged size field must not let a bomb through
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise VolumeTooLargeError(f"the zip expands to more than {max_bytes} bytes")
                        dst.write(chunk)
            except (NotImplementedError, RuntimeError) as e:
                # zipfile's words for encryption and compression methods it lacks; RuntimeError's text
                # names the entry, which may hold PHI, so it is not repeated
                raise UnsupportedFormatError("a zip entry is encrypted or uses a compression method this server "
                                             "cannot read; zip the series again with a standard zip tool "
                                             "(deflate, no password)") from e
            except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError) as e:
                # ValueError: a local header flags its name as UTF-8 and it is not
                raise CorruptFileError(f"the zip archive is truncated or corrupt ({type(e).__name__})") from e


def read_dicom_zip(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS,
                   max_extract_bytes: int = DEFAULT_MAX_ZIP_BYTES) -> Volume:
    tmp = Path(tempfile.mkdtemp(prefix="mriseg-dcm-"))
    try:
        safe_extract_zip(path, tmp, max_extract_bytes)
        return read_dicom_dir(tmp, max_voxels)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- entry points -------------------------------------------------------------------

def read_volume(path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS,
                self_contained: bool = False, max_extract_bytes: int = DEFAULT_MAX_ZIP_BYTES,
                max_decode_bytes: int | None = None) -> Volume:
    """Read a NIfTI/.mha/.nrrd file, a DICOM series folder or a zip of one, in this process.

    Untrusted inputs go through :func:`serve.imaging.sandbox.decode_untrusted`, which calls this in a confined child.
    ``self_contained=True`` is for files from elsewhere (uploads, S3 objects): a .mhd or .nhdr header, whose
    voxels are in a separate file, is refused, since it could name any file on this host. A .mha or .nrrd is
    always read by the strict readers of :mod:`serve.imaging.formats`, which refuse a separate data file whatever
    ``self_contained`` says.
    ``max_extract_bytes`` bounds what a DICOM zip may expand to; ``max_decode_bytes`` (None: unbounded)
    the memory decoding may take, computed from the header's shape and voxel type before anything is decoded.
    """
    path = Path(path)
    try:
        if self_contained:
            check_self_contained(path)
        token = _DECODE_BUDGET.set(max_decode_bytes)
        try:
            return _read_volume(path, max_voxels, max_extract_bytes)
        finally:
            _DECODE_BUDGET.reset(token)
    except MrisegError as e:
        e.message = _without_paths(e.message, path)
        e.args = (e.message,)
        raise


_TEMP_PATH = re.compile(re.escape(tempfile.gettempdir()) + r"/mriseg-[^\s\"')]*")


def _without_paths(message: str, path: Path) -> str:
    """The readers quote the file's server-side path; the caller only knows the input it gave."""
    for p in sorted({str(path.resolve()), str(path)}, key=len, reverse=True):
        message = message.replace(p, "the input")
    return _TEMP_PATH.sub("the input", message)


def _read_volume(path: Path, max_voxels: int, max_extract_bytes: int = DEFAULT_MAX_ZIP_BYTES) -> Volume:
    if path.is_dir():
        return read_dicom_dir(path, max_voxels)
    if not path.is_file():
        raise UnsupportedFormatError(f"input {path.name!r} does not exist or is not a file or folder")
    suffix = suffix_of(path.name)
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(path, max_voxels)
    if suffix in ZIP_SUFFIXES:
        return read_dicom_zip(path, max_voxels, max_extract_bytes)
    if suffix in SITK_SUFFIXES or suffix in DICOM_SUFFIXES:
        return read_sitk_file(path, max_voxels)
    raise UnsupportedFormatError(f"unsupported file type {suffix or '(none)'!r}; supported: "
                                 f"{', '.join(SUPPORTED)}, or a DICOM folder")


def check_self_contained(path: Path) -> None:
    """Refuse a volume file whose voxels are in another file (on a server that could be any local file).

    Only .mhd and .nhdr are refused here: a .mha or .nrrd that names another file is refused by its strict
    reader (:mod:`serve.imaging.formats`), which every read of those formats goes through.
    """
    suffix = suffix_of(path.name)
    if suffix in (".mhd", ".nhdr"):
        raise UnsupportedFormatError(f"a {suffix} header keeps its voxels in a separate file, which cannot come "
                                     f"with it; convert it to a single {'.mha' if suffix == '.mhd' else '.nrrd'}")


def check_upload(data: bytes, filename: str) -> str:
    """Refuse an upload by its name's suffix or its emptiness, before anything decodes it.

    Args:
        data: the upload's bytes.
        filename: its name; only the suffix is used (never the name, which may hold PHI).

    Returns:
        The suffix.
    """
    suffix = suffix_of(filename)
    if suffix not in SUPPORTED or suffix in (".mhd", ".nhdr"):
        raise UnsupportedFormatError(f"unsupported upload type {suffix or '(none)'!r}; upload .nii, .nii.gz, "
                                     f".mha, .nrrd or a .zip of one DICOM series")
    if not data:
        raise CorruptFileError("the upload is empty")
    return suffix


def read_volume_bytes(data: bytes, filename: str, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read an uploaded file in this process; only ``filename``'s suffix is used."""
    suffix = check_upload(data, filename)
    fd, name = tempfile.mkstemp(prefix="mriseg-upload-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return read_volume(name, max_voxels, self_contained=True)
    finally:
        os.unlink(name)


def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, header=None) -> Path:
    """Save ``data`` as NIfTI (used for outputs and tests)."""
    img = nib.Nifti1Image(data, affine, header)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return Path(path)
