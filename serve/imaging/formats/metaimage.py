"""A strict reader of MetaImage (.mha) headers, and the canonical copy that ITK reads instead of the upload.

ITK's MetaIO matches keys case-sensitively, lets a later line override an earlier one, stops at the first
``ElementDataFile`` line, and honours ``ElementDataFile`` paths (``LIST`` and ``%d`` patterns too) and
``HeaderSize`` offsets: any file on the host, from any offset. Given a corrupt compressed stream it prints
"Uncompress failed" and returns its buffer as it was. So this module reads the header itself, with no
room for a second reading:

- every line is ``Key = value`` (or ``Key: value``, which MetaIO reads the same), printable ASCII, at most
  :data:`MAX_LINE` bytes, ending in LF (or CR LF); no NUL, no blank line, no leading space;
- every key is one MetaIO defines, spelt as MetaIO spells it (:data:`KEYS`), at most once, and only one of
  each group of synonyms (``Offset``/``Position``/``Origin``/``ImagePosition``, ``TransformMatrix``/
  ``Rotation``/``Orientation``, ``BinaryDataByteOrderMSB``/``ElementByteOrderMSB``); ``NDims`` comes before
  every key whose length it sets, as MetaIO requires;
- ``ElementDataFile = LOCAL`` is the last line, and the voxel data follows it directly: no ``HeaderSize``,
  no separate file, no ``LIST`` or pattern;
- a scalar ``ElementType``, one channel, binary data, ``NDims`` 3 (or 4 with one time point), a voxel count
  within the limit, checked before anything is allocated;
- uncompressed data is exactly the header's byte count, no more and no less; compressed data
  (``CompressedData = True``) must have the ``CompressedDataSize`` ITK needs to read it, equal to the bytes
  present, and inflate (bounded, in chunks) to exactly the header's byte count, ending with its checksum.

Trailing bytes after the voxel data are refused rather than ignored as MetaIO does: nothing legitimate
writes them, and a file whose size disagrees with its header is not one to guess about.

:func:`canonicalise` then writes a new .mha with only the keys that decide the array and its geometry,
in MetaIO's own order, uncompressed, ``ElementDataFile = LOCAL``, and ITK reads that file alone.
Everything else the header may carry (comments, names, dates, ``CenterOfRotation``,
``AnatomicalOrientation``, which ITK's reader ignores) is validated and dropped.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from serve.errors import CorruptFileError, InvalidVolumeError, UnsupportedFormatError
from serve.imaging.formats.common import (ZLIB_OR_GZIP, check_voxels, copy_exact, inflate_exact, parse_count,
                                  parse_number, show)

FMT = ".mha"
#: Longest header line accepted (MetaIO reads keys into 500 bytes and string values with getline(500)).
MAX_LINE = 1024
#: Longest free-text value: MetaIO copies Comment, Name, ObjectSubType and AcquisitionDate into 255-byte
#: buffers with strcpy, so a longer one overflows them.
MAX_TEXT = 200

#: MetaIO's element types that hold one scalar per voxel, and their numpy type (byte order added later);
#: MET_LONG and MET_ULONG are 4 bytes in MetaIO, whatever C's long is.
ELEMENT_TYPES: dict[str, str] = {
    "MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
    "MET_UINT": "u4", "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4", "MET_DOUBLE": "f8",
}

_TEXT = frozenset({"ObjectSubType", "Comment", "AcquisitionDate", "Name"})
_INTS = frozenset({"ID", "ParentID", "ElementNBits"})
_BOOLS = frozenset({"CompressedData", "BinaryData", "ElementByteOrderMSB", "BinaryDataByteOrderMSB"})
_VECTORS = frozenset({"Position", "Origin", "Offset", "ImagePosition", "CenterOfRotation", "ElementSpacing",
                      "ElementSize", "SequenceID"})
_MATRICES = frozenset({"TransformMatrix", "Rotation", "Orientation"})
_SCALARS = frozenset({"ElementMin", "ElementMax", "ElementToIntensityFunctionSlope",
                      "ElementToIntensityFunctionOffset"})
_OTHERS = frozenset({"ObjectType", "NDims", "DimSize", "CompressedDataSize", "Color", "DistanceUnits",
                     "AnatomicalOrientation", "Modality", "ElementNumberOfChannels", "ElementType",
                     "ElementDataFile", "HeaderSize", "FileFormatVersion"})
#: Every key MetaIO's image reader defines (metaObject.cxx and metaImage.cxx, M_SetupReadFields).
KEYS = _TEXT | _INTS | _BOOLS | _VECTORS | _MATRICES | _SCALARS | _OTHERS
_BY_LOWER = {k.lower(): k for k in KEYS}
#: Keys whose length is NDims (or NDims squared): MetaIO refuses them before NDims.
_NEEDS_NDIMS = _VECTORS | _MATRICES | {"DimSize", "AnatomicalOrientation"}
#: Keys that set the same value in MetaIO; with two of them, which one wins depends on MetaIO's order.
_SYNONYMS = (("Offset", "Position", "Origin", "ImagePosition"), ("TransformMatrix", "Rotation", "Orientation"),
             ("BinaryDataByteOrderMSB", "ElementByteOrderMSB"))

_LINE = re.compile(rb"([A-Za-z][A-Za-z0-9_]*)[ \t]*[=:][ \t]*(.*?)[ \t]*")
_PRINTABLE = re.compile(rb"[\t\x20-\x7e]*")
_SPLIT = re.compile(rb"[ \t]+")
_INT = re.compile(rb"[+-]?[0-9]{1,9}")
_ORIENTATION = re.compile(rb"[RLAPSI?]+")
_MODALITY = re.compile(rb"MET_MOD_[A-Z]+")


@dataclass(frozen=True)
class MetaImageHeader:
    """What a validated header says about the voxel data and the geometry (in MetaIO's terms)."""

    shape: tuple[int, ...]  # DimSize: the fastest-varying axis first
    element_type: str
    msb: bool
    compressed: bool
    compressed_size: int | None
    offset: tuple[float, ...]
    matrix: tuple[float, ...]  # TransformMatrix, NDims x NDims, as written
    spacing: tuple[float, ...]
    data_file: str
    data_start: int  # the byte offset of the voxel data

    @property
    def ndims(self) -> int:
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        return int(ELEMENT_TYPES[self.element_type][1])

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for s in self.shape:
            n *= s
        return n


def read_header(f: BinaryIO, max_voxels: int, detached: bool = False) -> MetaImageHeader:
    """Read and check the header of the MetaImage open in ``f`` (at its start), up to the voxel data.

    Args:
        f: the file, opened in binary mode; left positioned at the voxel data.
        max_voxels: the largest voxel count accepted.
        detached: True for a trusted local .mhd, whose voxels are in a separate file that ITK reads itself:
            ``ElementDataFile`` may then name a file and ``HeaderSize`` is allowed; every other rule stands.

    Returns:
        The header's meaning.

    Raises:
        CorruptFileError, InvalidVolumeError, UnsupportedFormatError, VolumeTooLargeError: the header breaks
            a rule above; the message says which and what to do.
    """
    fields: dict[str, bytes] = {}
    for number in range(1, len(KEYS) + 2):  # each key at most once: a longer header is refused below
        raw = f.readline(MAX_LINE + 3)
        if not raw.endswith(b"\n"):
            if len(raw) > MAX_LINE:
                raise CorruptFileError(f"line {number} of the .mha header is over {MAX_LINE} bytes; the file is "
                                       f"corrupt or not a MetaImage")
            raise CorruptFileError("the .mha header ends before its ElementDataFile line (the last header line, "
                                   "after which the voxel data starts); the file is truncated or not a MetaImage")
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        if len(line) > MAX_LINE:
            raise CorruptFileError(f"line {number} of the .mha header is over {MAX_LINE} bytes; the file is "
                                   f"corrupt or not a MetaImage")
        if b"\0" in line:
            raise CorruptFileError(f"line {number} of the .mha header holds a NUL byte; a MetaImage header is "
                                   f"text (MetaIO would read the key only up to the NUL). The file is corrupt")
        if not _PRINTABLE.fullmatch(line):
            raise CorruptFileError(f"line {number} of the .mha header holds a byte that is not printable ASCII "
                                   f"(a lone carriage return or another control character splits lines "
                                   f"differently for MetaIO); save the file again with a standard writer "
                                   f"(e.g. SimpleITK)")
        m = _LINE.fullmatch(line)
        if not m:
            raise CorruptFileError(f"line {number} of the .mha header is not 'Key = value' (a blank line, a "
                                   f"leading space or a line without '=' reads differently in MetaIO); the file "
                                   f"is corrupt or not a MetaImage")
        key, value = m.group(1).decode("ascii"), m.group(2)
        _check_key(key, fields, number)
        if not value or value[:1] in (b"=", b":"):
            raise CorruptFileError(f"the .mha header's {key} has no value, or one that starts with '=' or ':' "
                                   f"(which MetaIO skips); the file is corrupt")
        fields[key] = value
        if key == "ElementDataFile":  # MetaIO stops here: the voxel data follows this line
            return _interpret(fields, f.tell(), max_voxels, detached)
    raise CorruptFileError("the .mha header has more lines than MetaIO has keys; a key repeats or the file is "
                           "not a MetaImage")


def _check_key(key: str, fields: dict[str, bytes], number: int) -> None:
    if key not in KEYS:
        canon = _BY_LOWER.get(key.lower())
        if canon:
            raise CorruptFileError(f"line {number} of the .mha header spells the key {key!r}, which MetaIO reads "
                                   f"as another key than {canon!r} (it matches keys case-sensitively); write "
                                   f"{canon!r}, or save the file again with a standard writer (e.g. SimpleITK)")
        raise CorruptFileError(f"line {number} of the .mha header has the key {key!r}, which MetaIO's image "
                               f"reader does not define; remove the line (custom metadata cannot be read here)")
    if key in fields:
        raise CorruptFileError(f"the .mha header gives {key} twice (MetaIO would use the later one); keep one")
    for group in _SYNONYMS:
        other = next((k for k in group if k in fields), None) if key in group else None
        if other:
            raise CorruptFileError(f"the .mha header gives both {other} and {key}, which MetaIO reads as the same "
                                   f"value; keep one")
    if key in _NEEDS_NDIMS and "NDims" not in fields:
        raise CorruptFileError(f"the .mha header gives {key} before NDims, which MetaIO refuses; the file is "
                               f"corrupt")


def _interpret(fields: dict[str, bytes], data_start: int, max_voxels: int, detached: bool) -> MetaImageHeader:
    _check_data_file(fields, detached)
    for key in ("NDims", "DimSize", "ElementType"):
        if key not in fields:
            raise CorruptFileError(f"the .mha header lacks {key}; the file is corrupt or not a MetaImage")
    if fields.get("ObjectType", b"Image") != b"Image":
        raise UnsupportedFormatError(f"the .mha file holds an object of type "
                                     f"{show(fields['ObjectType'])!r}, not an Image")
    if "FileFormatVersion" in fields:
        raise UnsupportedFormatError("the .mha header has FileFormatVersion, which changes which of its keys "
                                     "MetaIO reads; save the file again with a standard writer (e.g. SimpleITK)")
    ndims = _ndims(fields["NDims"])
    shape = tuple(parse_count(t, "DimSize", FMT) for t in _values(fields, "DimSize", ndims))
    if ndims == 4 and shape[3] != 1:
        raise InvalidVolumeError(f"the volume is 4D with shape {shape}; only 3D volumes (or 4D with a single time "
                                 f"point) can be segmented. Extract one time point first")
    check_voxels(shape, max_voxels, FMT)  # before anything is allocated or copied
    element_type = _element_type(fields["ElementType"])
    n = parse_count(fields.get("ElementNumberOfChannels", b"1"), "ElementNumberOfChannels", FMT)
    if n != 1:
        raise InvalidVolumeError(f"the volume has {n} components per voxel (e.g. RGB or vector data); a scalar "
                                 f"(grey-value) volume is needed")
    if not _bool(fields, "BinaryData", True):
        raise UnsupportedFormatError("the .mha header says BinaryData = False (voxels written as text); save the "
                                     "volume with binary data (e.g. with SimpleITK)")
    order_key = "ElementByteOrderMSB" if "ElementByteOrderMSB" in fields else "BinaryDataByteOrderMSB"
    msb = _bool(fields, order_key, sys.byteorder == "big")  # MetaIO's default: this machine's order
    compressed = _bool(fields, "CompressedData", False)
    compressed_size = None
    if "CompressedDataSize" in fields:
        if not compressed:
            raise CorruptFileError("the .mha header gives CompressedDataSize for data that is not compressed; "
                                   "the file is corrupt")
        compressed_size = parse_count(fields["CompressedDataSize"], "CompressedDataSize", FMT, 2**62)
    elif compressed and not detached:
        # without it ITK takes the whole file, header included, for the stream and returns garbage
        raise CorruptFileError("the compressed .mha header lacks CompressedDataSize, without which ITK cannot "
                               "read the data; save the file again with SimpleITK or ITK (which write it), or "
                               "uncompressed")
    offset_key = next((k for k in ("Offset", "Position", "Origin", "ImagePosition") if k in fields), None)
    offset = _floats(fields, offset_key, ndims) if offset_key else (0.0,) * ndims
    matrix_key = next((k for k in ("TransformMatrix", "Rotation", "Orientation") if k in fields), None)
    identity = tuple(1.0 if i % (ndims + 1) == 0 else 0.0 for i in range(ndims * ndims))
    matrix = _floats(fields, matrix_key, ndims * ndims) if matrix_key else identity
    spacings = {k: _floats(fields, k, ndims) for k in ("ElementSpacing", "ElementSize") if k in fields}
    for key, values in spacings.items():
        if not all(v > 0 for v in values):
            raise InvalidVolumeError(f"the .mha header's {key} is {values}; voxel sizes must be positive. "
                                     f"Rewrite the header with the true voxel sizes")
    # MetaIO: ElementSpacing if given, else ElementSize, else 1
    spacing = spacings.get("ElementSpacing") or spacings.get("ElementSize") or (1.0,) * ndims
    _check_ignored(fields, ndims)
    return MetaImageHeader(shape, element_type, msb, compressed, compressed_size, offset, matrix, spacing,
                           fields["ElementDataFile"].decode("ascii"), data_start)


def _check_data_file(fields: dict[str, bytes], detached: bool) -> None:
    data_file = fields["ElementDataFile"]
    if detached:
        if "HeaderSize" in fields and not _INT.fullmatch(fields["HeaderSize"]):
            raise CorruptFileError("the .mhd header's HeaderSize is not a whole number; the file is corrupt")
        return
    if data_file == b"LOCAL":
        if "HeaderSize" in fields:
            raise UnsupportedFormatError("the .mha header has HeaderSize, which makes MetaIO read its voxels from "
                                         "another offset; save the volume again with a standard writer (e.g. "
                                         "SimpleITK), which does not write it")
        return
    if data_file.startswith(b"LIST"):
        what = "a list of separate data files (ElementDataFile = LIST)"
    elif b"%" in data_file:
        what = "a numbered series of separate data files (a % pattern in ElementDataFile)"
    else:
        what = "a separate data file"
    raise UnsupportedFormatError(f"the .mha header points at {what}; upload a self-contained .mha "
                                 f"(ElementDataFile = LOCAL), or, for a local file, name the header .mhd")


def _ndims(value: bytes) -> int:
    n = parse_count(value, "NDims", FMT, 10)  # MetaIO indexes arrays of 10 with it
    if n in (3, 4):
        return n
    if n < 3:
        raise InvalidVolumeError(f"the volume is {n}D; a 3D volume with at least 2 voxels along every axis is "
                                 f"needed")
    raise InvalidVolumeError(f"the volume is {n}D; only 3D volumes (or 4D with a single time point) can be "
                             f"segmented. Extract one 3D volume first")


def _element_type(value: bytes) -> str:
    name = value.decode("ascii")
    if name in ELEMENT_TYPES:
        return name
    if name.endswith("_ARRAY") or name in ("MET_STRING", "MET_FLOAT_MATRIX"):
        raise InvalidVolumeError(f"the voxels are {name} values (several components per voxel); a scalar "
                                 f"(grey-value) volume is needed")
    raise CorruptFileError(f"the .mha header's ElementType is {show(value)!r}, not one of "
                           f"{', '.join(ELEMENT_TYPES)}; the file is corrupt or holds an unsupported type")


def _values(fields: dict[str, bytes], key: str, count: int) -> list[bytes]:
    tokens = _SPLIT.split(fields[key])
    if len(tokens) != count:
        raise CorruptFileError(f"the .mha header's {key} has {len(tokens)} value(s) where NDims asks for {count}; "
                               f"the file is corrupt")
    return tokens


def _floats(fields: dict[str, bytes], key: str, count: int) -> tuple[float, ...]:
    return tuple(parse_number(t, key, FMT) for t in _values(fields, key, count))


def _bool(fields: dict[str, bytes], key: str, default: bool) -> bool:
    value = fields.get(key)
    if value is None:
        return default
    if value not in (b"True", b"False"):
        raise CorruptFileError(f"the .mha header's {key} is {show(value)!r}, not True or False; the file is "
                               f"corrupt")
    return value == b"True"


def _check_ignored(fields: dict[str, bytes], ndims: int) -> None:
    """Keys that do not reach the canonical copy: checked all the same, so what we accept is well-formed."""
    for key in _TEXT & fields.keys():
        if len(fields[key]) > MAX_TEXT:
            raise CorruptFileError(f"the .mha header's {key} is over {MAX_TEXT} characters (MetaIO copies it "
                                   f"into a 255-byte buffer); shorten it")
    for key in _INTS & fields.keys():
        if not _INT.fullmatch(fields[key]):
            raise CorruptFileError(f"the .mha header's {key} is {show(fields[key])!r}, not a whole number; "
                                   f"the file is corrupt")
    if "CenterOfRotation" in fields:
        _floats(fields, "CenterOfRotation", ndims)
    if "SequenceID" in fields:
        _floats(fields, "SequenceID", ndims)
    if "Color" in fields:
        _floats(fields, "Color", 4)
    values = {k: parse_number(fields[k], k, FMT) for k in _SCALARS & fields.keys()}
    if values.get("ElementToIntensityFunctionSlope", 1.0) != 1.0 or \
            values.get("ElementToIntensityFunctionOffset", 0.0) != 0.0:
        raise InvalidVolumeError("the .mha header gives an intensity scaling (ElementToIntensityFunctionSlope/"
                                 "Offset), which ITK's reader ignores; apply it to the voxels and save again")
    if fields.get("DistanceUnits", b"mm") not in (b"mm", b"?"):
        raise InvalidVolumeError(f"the .mha header gives its distances in {show(fields['DistanceUnits'])!r}, not "
                                 f"millimetres; save it with millimetre units")
    if "AnatomicalOrientation" in fields and not (
            _ORIENTATION.fullmatch(fields["AnatomicalOrientation"])
            and len(fields["AnatomicalOrientation"]) == ndims):
        raise CorruptFileError("the .mha header's AnatomicalOrientation is not one of R, L, A, P, S, I or ? per "
                               "dimension; the file is corrupt")
    if "Modality" in fields and not _MODALITY.fullmatch(fields["Modality"]):
        raise CorruptFileError("the .mha header's Modality is not a MetaIO modality (MET_MOD_...); the file is "
                               "corrupt")


def canonical_header(h: MetaImageHeader) -> bytes:
    """The header of the canonical copy: MetaIO's key order, uncompressed, ``ElementDataFile = LOCAL``.

    Numbers are written as Python's shortest exact form, which C's strtod reads back to the same double.
    """
    def floats(values: tuple[float, ...]) -> str:
        return " ".join(repr(float(v)) for v in values)

    lines = [
        "ObjectType = Image",
        f"NDims = {h.ndims}",
        "BinaryData = True",
        f"BinaryDataByteOrderMSB = {h.msb}",
        "CompressedData = False",
        f"TransformMatrix = {floats(h.matrix)}",
        f"Offset = {floats(h.offset)}",
        f"ElementSpacing = {floats(h.spacing)}",
        f"DimSize = {' '.join(str(s) for s in h.shape)}",
        f"ElementType = {h.element_type}",
        "ElementDataFile = LOCAL",
    ]
    return ("\n".join(lines) + "\n").encode("ascii")


def canonicalise(src: str | os.PathLike, scratch: str | os.PathLike, max_voxels: int) -> Path:
    """Check the .mha at ``src`` and write its canonical copy into the folder ``scratch``.

    Args:
        src: the MetaImage to read (a self-contained .mha).
        scratch: an existing folder this call may write one file into.
        max_voxels: the largest voxel count accepted; checked before anything is copied.

    Returns:
        The canonical copy's path (``scratch/canonical.mha``): the same voxels, uncompressed, under a header
        that only has the keys that decide the array and its geometry.

    Raises:
        CorruptFileError, InvalidVolumeError, UnsupportedFormatError, VolumeTooLargeError: the header or the
            voxel data breaks a rule of this module.
    """
    out = Path(scratch) / "canonical.mha"
    with open(src, "rb") as f:
        h = read_header(f, max_voxels)
        remaining = os.fstat(f.fileno()).st_size - h.data_start
        with open(out, "xb") as dst:
            dst.write(canonical_header(h))
            if not h.compressed:
                copy_exact(f, dst, h.nbytes, remaining, FMT)
            elif h.compressed_size != remaining:
                raise CorruptFileError(f"the .mha header's CompressedDataSize is {h.compressed_size} but "
                                       f"{remaining} bytes follow the header; the file is truncated or corrupt. "
                                       f"Export it again")
            else:
                inflate_exact(f, dst, h.nbytes, ZLIB_OR_GZIP, FMT)
    return out


def check_detached_header(path: str | os.PathLike, max_voxels: int) -> MetaImageHeader:
    """Check a trusted local .mhd header before ITK reads it (and its data file) directly.

    The same rules as for a .mha, except that the voxels are in the file ``ElementDataFile`` names: MetaIO
    must never see a header it would misread, corrupt its memory on (an ``NDims`` out of range, an overlong
    ``Comment``), or read past into data as if it were header lines.

    Args:
        path: the .mhd file.
        max_voxels: the largest voxel count accepted.

    Returns:
        The header's meaning.
    """
    with open(path, "rb") as f:
        return read_header(f, max_voxels, detached=True)
