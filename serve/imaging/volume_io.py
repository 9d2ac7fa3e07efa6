"""Read an input scan into a 3D float32 array with a RAS+ affine: the reader of each file type, by suffix.

As in nnU-Net v2's imageio, one reader contract (:class:`Reader`) and a registry by suffix
(:data:`READERS`): NIfTI through nibabel (:mod:`serve.imaging.nifti`), other single-file volumes
(.mha, .mhd, .nrrd, .nhdr, a DICOM file) through SimpleITK (:mod:`serve.imaging.itk`), and DICOM
series (a folder, or a zip of one: :mod:`serve.imaging.archives`) through SimpleITK's GDCM series
reader. A .mha or .nrrd is first checked by our own strict header reader
(:mod:`serve.imaging.formats`), which writes a canonical copy that SimpleITK then reads instead of
the original. What every reader shares (the :class:`~serve.imaging.volume.Volume`, the limits,
the checks before decoding) is in :mod:`serve.imaging.volume`.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

from serve.errors import CorruptFileError, MrisegError, UnsupportedFormatError
from serve.imaging.archives import read_dicom_zip
from serve.imaging.itk import read_dicom_dir, read_sitk_file
from serve.imaging.nifti import read_nifti
from serve.imaging.volume import (DECODE_BUDGET, DEFAULT_MAX_VOXELS, DEFAULT_MAX_ZIP_BYTES, DICOM_SUFFIXES,
                                  NIFTI_SUFFIXES, SITK_SUFFIXES, SUPPORTED, ZIP_SUFFIXES, Volume, suffix_of)


class Reader(Protocol):
    """Reads one file of its type, checking the header against the limits before decoding."""

    def __call__(self, path: Path, max_voxels: int, max_extract_bytes: int) -> Volume:
        """Decode ``path``.

        Args:
            path: The file.
            max_voxels: The largest voxel count accepted.
            max_extract_bytes: What an archive may expand to.

        Returns:
            The volume.
        """


def _nifti(path: Path, max_voxels: int, max_extract_bytes: int) -> Volume:
    return read_nifti(path, max_voxels)


def _itk(path: Path, max_voxels: int, max_extract_bytes: int) -> Volume:
    return read_sitk_file(path, max_voxels)


def _zip(path: Path, max_voxels: int, max_extract_bytes: int) -> Volume:
    return read_dicom_zip(path, max_voxels, max_extract_bytes)


#: The reader of each suffix (:func:`serve.imaging.volume.suffix_of`); a folder is a DICOM series.
READERS: dict[str, Reader] = {**dict.fromkeys(NIFTI_SUFFIXES, _nifti), **dict.fromkeys(SITK_SUFFIXES, _itk),
                              **dict.fromkeys(ZIP_SUFFIXES, _zip), **dict.fromkeys(DICOM_SUFFIXES, _itk)}


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
        token = DECODE_BUDGET.set(max_decode_bytes)
        try:
            return _read_volume(path, max_voxels, max_extract_bytes)
        finally:
            DECODE_BUDGET.reset(token)
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
    reader = READERS.get(suffix)
    if reader is None:
        raise UnsupportedFormatError(f"unsupported file type {suffix or '(none)'!r}; supported: "
                                     f"{', '.join(SUPPORTED)}, or a DICOM folder")
    return reader(path, max_voxels, max_extract_bytes)


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
