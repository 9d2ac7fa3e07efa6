"""Volumes through SimpleITK: MetaImage/NRRD (after the strict parsers of :mod:`serve.imaging.formats`),
single DICOM files and DICOM series (GDCM)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from serve.errors import CorruptFileError, InvalidVolumeError, MrisegError, UnsupportedFormatError
from serve.imaging.dicom import RESCALE_TAGS, check_dicom_lengths, check_slice_geometry
from serve.imaging.formats import metaimage, nrrd
from serve.imaging.volume import (DEFAULT_MAX_VOXELS, DICOM_SUFFIXES, Volume, check_decode_memory, check_shape,
                                  error_reason, finish, suffix_of)

# DICOM/ITK world coordinates are LPS; nibabel's are RAS.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


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
        raise CorruptFileError(f"cannot read the image header ({error_reason(e)}); the file is corrupt or not "
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
        raise CorruptFileError(f"the image data cannot be read ({error_reason(e)}); the file is truncated or "
                               f"corrupt") from e
    affine = sitk_geometry_to_affine(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    if fmt == "dicom":
        integer = dicom_integer_valued(image.GetPixelID(), [tuple(
            image.GetMetaData(k) if image.HasMetaDataKey(k) else None for k in RESCALE_TAGS)])
    else:  # .mha/.nrrd/.mhd have no scaling ITK applies (serve.imaging.formats refuses the fields that would)
        integer = sitk_integer_pixels(image.GetPixelID())
    return finish(_sitk_array(image), affine, fmt, max_voxels, integer_valued=integer)


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
        raise CorruptFileError(f"cannot read a DICOM header ({error_reason(e)})") from e
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
        raise CorruptFileError(f"the DICOM series cannot be decoded ({error_reason(e)})") from e
    if len(best) > 1:
        check_slice_geometry([_slice_tags(reader, i) for i in range(len(best))])
    affine = sitk_geometry_to_affine(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    rescales = [tuple(reader.GetMetaData(i, k) if reader.HasMetaDataKey(i, k) else None for k in RESCALE_TAGS)
                for i in range(len(best))]
    return finish(_sitk_array(image), affine, "dicom", max_voxels,
                   integer_valued=dicom_integer_valued(image.GetPixelID(), rescales))


def _slice_tags(reader, i: int) -> tuple[str, str] | None:
    """(ImagePositionPatient, ImageOrientationPatient) of slice ``i``, None where either is missing."""
    keys = ("0020|0032", "0020|0037")
    if not all(reader.HasMetaDataKey(i, k) for k in keys):
        return None
    return reader.GetMetaData(i, keys[0]), reader.GetMetaData(i, keys[1])
