"""DICOM checks made without a DICOM library: element lengths before GDCM allocates them, slice stacks.

The decoding itself is SimpleITK's GDCM (:mod:`serve.imaging.itk`).
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Sequence

import numpy as np

from serve.errors import CorruptFileError, InvalidVolumeError

RESCALE_TAGS = ("0028|1053", "0028|1052")  # RescaleSlope, RescaleIntercept


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
