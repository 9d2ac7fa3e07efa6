"""The decoder child's reply: a fixed format that the parent validates, never a pickle.

The child writes into ``<workdir>/out/``:

* ``volume.npy``: the voxels, little-endian float32, C order, three dimensions
  (NumPy's ``.npy`` format, read back with ``allow_pickle=False`` after its
  header is checked: the byte count must equal the shape's product times 4);
* ``meta.json``: ``{"affine": 4x4 numbers, "source_format": str,
  "nifti_header": base64 of the raw NIfTI header or null, "integer_valued": bool,
  "layers": {...}}`` (``integer_valued``: integer voxels on disk with identity scaling,
  :attr:`serve.imaging.volume_io.Volume.integer_valued`; true only if every voxel is integral);

or, when the input is refused, ``error.json``: ``{"status": int, "title": str,
"message": str}``. A reply that breaks any of these rules is the child's fault
(a crash or a trick), and the parent answers 422 for that job alone.
"""

from __future__ import annotations

import base64
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from serve.errors import CorruptFileError, InvalidVolumeError, MrisegError, UnsupportedFormatError, VolumeTooLargeError

VOLUME, META, ERROR = "volume.npy", "meta.json", "error.json"
MAX_JSON_BYTES = 64 << 10
_DTYPE = np.dtype("<f4")
_NIFTI_HEADER_SIZES = {348: "Nifti1Header", 540: "Nifti2Header"}


class SandboxReplyError(CorruptFileError):
    """The decoder child ended without a valid reply (it crashed, hit a limit or broke the format)."""


#: The error classes a child's refusal may name (all 4xx input errors).
_ERROR_KINDS = {c.__name__: c for c in (CorruptFileError, InvalidVolumeError, UnsupportedFormatError,
                                        VolumeTooLargeError)}


# -- child side ----------------------------------------------------------------------

def write_volume(out: Path, volume: Any, layers: dict[str, bool]) -> None:
    """Write a decoded :class:`serve.imaging.volume_io.Volume` as the reply (child side).

    Args:
        out: the reply folder.
        volume: the decoded volume.
        layers: which sandbox layers were active while it was decoded.
    """
    data = np.ascontiguousarray(volume.data, dtype=_DTYPE)
    np.save(out / VOLUME, data, allow_pickle=False)
    header = getattr(volume, "header", None)
    block = None if header is None else base64.b64encode(header.binaryblock).decode("ascii")
    meta = {"affine": np.asarray(volume.affine, dtype=np.float64).tolist(), "source_format": volume.source_format,
            "nifti_header": block, "integer_valued": bool(volume.integer_valued), "layers": layers}
    _write_json(out / META, meta)


def write_error(out: Path, status: int, title: str, message: str, kind: str = "MrisegError") -> None:
    """Write a refusal as the reply (child side); ``kind`` names its :mod:`serve.errors` class."""
    _write_json(out / ERROR, {"status": int(status), "title": str(title), "message": str(message)[:4000],
                              "kind": str(kind)})


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)  # the parent never sees half a file


# -- parent side ----------------------------------------------------------------------

def read_json(path: Path) -> dict:
    """A JSON object of at most :data:`MAX_JSON_BYTES` (parent side)."""
    with open(path, "rb") as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise SandboxReplyError(f"the decoder's {path.name} is over {MAX_JSON_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise SandboxReplyError(f"the decoder's {path.name} is not JSON") from None
    if not isinstance(doc, dict):
        raise SandboxReplyError(f"the decoder's {path.name} is not a JSON object")
    return doc


def read_error(path: Path) -> MrisegError:
    """The refusal the child wrote, as the error to raise (its status kept only when it is a 4xx)."""
    doc = read_json(path)
    status, message = doc.get("status"), doc.get("message")
    if not isinstance(message, str) or not isinstance(status, int) or isinstance(status, bool):
        raise SandboxReplyError("the decoder's error reply is malformed")
    cls = _ERROR_KINDS.get(doc.get("kind"), MrisegError)  # only input errors; never a class the child names freely
    err = cls.__new__(cls)
    MrisegError.__init__(err, message)
    # the child can only refuse the input: a 5xx (or anything outside 4xx) from it would blame the service
    if err.status != status or not 400 <= status < 500:
        err.status = status if 400 <= status < 500 else 422
        title = doc.get("title")
        err.title = title if isinstance(title, str) and len(title) < 100 else "Unreadable input"
    return err


def read_shape(out: Path, max_voxels: int) -> tuple[int, int, int]:
    """The volume's shape from the ``.npy`` header alone, checked against the file's size (parent side).

    Args:
        out: the reply folder.
        max_voxels: the most voxels the caller accepts.

    Returns:
        The three dimensions.

    Raises:
        SandboxReplyError: a missing or malformed file, a wrong dtype or order, or a size that does not match.
    """
    path = out / VOLUME
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError("npy version")
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(f, max_header_size=1 << 12)
            offset = f.tell()
    except (OSError, ValueError, SyntaxError) as e:
        raise SandboxReplyError(f"the decoder's volume reply is missing or malformed ({type(e).__name__})") from None
    if dtype != _DTYPE or fortran or len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise SandboxReplyError("the decoder's volume reply is not a 3D little-endian float32 C-order array")
    n = math.prod(shape)
    if n > max_voxels:
        raise SandboxReplyError(f"the decoder's volume reply has {n} voxels, over the limit of {max_voxels}")
    if size != offset + n * _DTYPE.itemsize:
        raise SandboxReplyError("the decoder's volume reply holds another number of bytes than its shape says")
    return shape  # type: ignore[return-value]


def read_volume(out: Path, max_voxels: int):
    """The decoded :class:`serve.imaging.volume_io.Volume`, after every check (parent side).

    The child's checks are repeated here (finite voxels, an invertible affine):
    a compromised child could skip them.

    Args:
        out: the reply folder.
        max_voxels: the most voxels the caller accepts.

    Returns:
        The volume.
    """
    # lazy: the decoder child imports this package before confine(); the readers load only after it
    from serve.imaging.volume import Volume, check_affine, check_data, check_shape

    shape = read_shape(out, max_voxels)
    meta = read_json(out / META)
    try:
        affine = np.asarray(meta["affine"], dtype=np.float64)
        fmt, integer_valued = meta["source_format"], meta["integer_valued"]
        if fmt not in ("nifti", "sitk", "dicom") or affine.shape != (4, 4) or not isinstance(integer_valued, bool):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise SandboxReplyError("the decoder's meta.json is malformed") from None
    header = _nifti_header(meta.get("nifti_header"))
    with open(out / VOLUME, "rb") as f:
        data = np.load(f, allow_pickle=False)
    check_shape(data.shape, max_voxels)
    data = check_data(np.ascontiguousarray(data))
    if integer_valued and not _all_integral(data):  # the flag decides a cast: it must not lie about the voxels
        raise SandboxReplyError("the decoder's reply calls the voxels integers, and some are not")
    return Volume(data, check_affine(affine), fmt, header, integer_valued)


def _all_integral(data: np.ndarray) -> bool:
    """Every voxel is a whole number (checked a slab at a time: no volume-sized temporary)."""
    return all(np.array_equal(slab, np.trunc(slab)) for slab in data)


def _nifti_header(block: Any):
    if block is None:
        return None
    try:
        raw = base64.b64decode(block, validate=True) if isinstance(block, str) and len(block) < 1024 else b""
    except ValueError:
        raw = b""
    if len(raw) not in _NIFTI_HEADER_SIZES:
        raise SandboxReplyError("the decoder's NIfTI header reply is malformed")
    # lazy: the decoder child imports this package before confine(); the readers load only after it
    import nibabel as nib

    cls = getattr(nib, _NIFTI_HEADER_SIZES[len(raw)])
    try:
        return cls(binaryblock=raw, check=False)
    except Exception:  # noqa: BLE001 - whatever nibabel makes of forged bytes, the reply is refused
        raise SandboxReplyError("the decoder's NIfTI header reply cannot be read") from None
