"""A strict reader of NRRD (.nrrd) headers, and the canonical copy that ITK reads instead of the upload.

ITK reads NRRD with teem's NrrdIO, which matches field names case-insensitively and under several
spellings (``data file``, ``datafile``, ``DATA FILE``), honours ``data file`` (a path, a ``LIST`` or a
``%d`` pattern), ``line skip`` and ``byte skip`` (``-1``: the last bytes of the file), ends a header line
at LF, CR LF or a lone CR, reads "gzip" data that is not gzip as raw bytes, and ignores what follows
the data. So this module reads the header itself, strictly:

- the first line is ``NRRD0001`` to ``NRRD0005``; lines end as teem ends them, and a blank line ends the
  header, the voxel data following it directly;
- every field line is ``<field>: <value>`` with the field spelt as the NRRD specification spells it
  (lower case, e.g. ``space directions``), at most once; only fields listed in :data:`FIELDS` are
  accepted, and anything teem would read as another field (another case or spelling, ``data file``,
  ``axis mins``, ``labels``, ...) is refused; comments (``#``) and ``key:=value`` pairs are allowed,
  bounded, and dropped;
- no NUL byte, no non-ASCII byte outside comments and key/value pairs;
- a scalar type, ``dimension`` 3 (or 4 with a trailing size of 1), every axis a domain axis, a voxel count
  within the limit checked before anything is allocated; ``endian`` for multi-byte types;
- geometry that ITK reads one way only: ``space`` left-posterior-superior, right-anterior-superior or
  left-anterior-superior (or ``space dimension`` equal to ``dimension``) with ``space directions`` and
  ``space origin`` of finite numbers; or, without a space, positive finite ``spacings``;
- ``encoding`` raw (exactly the header's byte count follows) or gzip (one gzip stream that inflates,
  bounded and in chunks, to exactly that count, and ends the file); ``line skip``/``byte skip`` only 0.

:func:`canonicalise` then writes a new raw .nrrd with only the fields that decide the array and its
geometry, and ITK reads that file alone.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from serve.errors import CorruptFileError, InvalidVolumeError, UnsupportedFormatError
from serve.imaging.formats.common import (GZIP_ONLY, NUMBER, check_voxels, copy_exact, inflate_exact, parse_count,
                                  parse_number, show)

FMT = ".nrrd"
#: Bounds on the header: teem reads lines of any length; a writer's header is a few kilobytes.
MAX_LINE = 1 << 16
MAX_HEADER_BYTES = 1 << 20
MAX_KEY_VALUES = 1000

#: teem's type names (every equivalent spelling, in lower case) for scalar types, and their numpy type.
TYPES: dict[bytes, str] = {}
for _names, _np in (("signed char|int8|int8_t", "i1"), ("uchar|unsigned char|uint8|uint8_t", "u1"),
                    ("short|short int|signed short|signed short int|int16|int16_t", "i2"),
                    ("ushort|unsigned short|unsigned short int|uint16|uint16_t", "u2"),
                    ("int|signed int|int32|int32_t", "i4"), ("uint|unsigned int|uint32|uint32_t", "u4"),
                    ("longlong|long long|long long int|signed long long|signed long long int|int64|int64_t", "i8"),
                    ("ulonglong|unsigned long long|unsigned long long int|uint64|uint64_t", "u8"),
                    ("float", "f4"), ("double", "f8")):
    TYPES.update({n.encode(): _np for n in _names.split("|")})
#: teem's own name of each type, written into the canonical copy.
_TYPE_NAME = {"i1": "signed char", "u1": "unsigned char", "i2": "short", "u2": "unsigned short", "i4": "int",
              "u4": "unsigned int", "i8": "long long int", "u8": "unsigned long long int", "f4": "float",
              "f8": "double"}
#: The spaces whose axes ITK knows how to turn into its LPS, by every spelling accepted here.
SPACES = {b"left-posterior-superior": "left-posterior-superior", b"LPS": "left-posterior-superior",
          b"right-anterior-superior": "right-anterior-superior", b"RAS": "right-anterior-superior",
          b"left-anterior-superior": "left-anterior-superior", b"LAS": "left-anterior-superior"}
#: Kinds of a domain axis (teem's unknown kind, "???" or "none", counts as one).
DOMAIN_KINDS = frozenset({b"domain", b"space", b"time", b"???", b"none"})
CENTERS = frozenset({b"cell", b"node", b"???", b"none"})

#: The fields accepted, as the specification spells them.
FIELDS = frozenset({"type", "dimension", "sizes", "encoding", "endian", "space", "space dimension",
                    "space directions", "space origin", "space units", "spacings", "thicknesses", "kinds",
                    "centers", "centerings", "content", "line skip", "byte skip"})
#: Every field name teem knows, in every spelling (enumsNrrd.c, _nrrdFieldStrEqv), lower case: teem
#: compares them case-insensitively.
TEEM_FIELDS = frozenset({
    "#", "content", "number", "type", "block size", "blocksize", "dimension", "space", "space dimension",
    "spacedimension", "sizes", "spacings", "thicknesses", "axis mins", "axismins", "axis maxs", "axismaxs",
    "space directions", "spacedirections", "centers", "centerings", "kinds", "labels", "units", "min", "max",
    "old min", "oldmin", "old max", "oldmax", "endian", "encoding", "line skip", "lineskip", "byte skip",
    "byteskip", "key/value", "sample units", "sampleunits", "space units", "spaceunits", "space origin",
    "spaceorigin", "measurement frame", "measurementframe", "data file", "datafile"})
#: Spellings teem takes for one field: one of each at most.
_SAME_FIELD = {"centerings": "centers"}
_NEEDS_DIMENSION = frozenset({"sizes", "spacings", "thicknesses", "kinds", "centers", "centerings",
                              "space directions"})
_NEEDS_SPACE = frozenset({"space directions", "space origin", "space units"})

_MAGIC = re.compile(rb"NRRD000[1-5]")
_EOL = re.compile(rb"\r\n|\r|\n")
_PRINTABLE = re.compile(rb"[\t\x20-\x7e]*")
_SPLIT = re.compile(rb"[ \t]+")
_VECTOR = re.compile(rb"\(([^()]*)\)")
_COMPONENT = re.compile(rb"[ \t]*(" + NUMBER + rb")[ \t]*")
_QUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class NrrdHeader:
    """What a validated header says about the voxel data and the geometry (in teem's terms)."""

    dtype: str  # numpy type without byte order, e.g. "i2"
    sizes: tuple[int, ...]  # the fastest-varying axis first
    big_endian: bool
    gzip: bool
    space: str | None  # teem's name of a 3D space, or None
    space_dimension: int | None  # set instead of space, or None
    directions: tuple[tuple[float, ...], ...] | None
    origin: tuple[float, ...] | None
    spacings: tuple[float, ...] | None
    data_start: int

    @property
    def itemsize(self) -> int:
        return int(self.dtype[1])

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for s in self.sizes:
            n *= s
        return n


def _lines(f: BinaryIO) -> Iterator[tuple[bytes, int]]:
    """(line, offset after it) for each header line, split as teem's airOneLine splits: at CR LF, LF or CR."""
    # one byte more than the bound: a CR that ends the bound must not pass for a line end when LF follows
    buf = f.read(MAX_HEADER_BYTES + 1)
    pos = 0
    while True:
        m = _EOL.search(buf, pos, pos + MAX_LINE + 2)
        if m and m.start() - pos > MAX_LINE or not m and len(buf) - pos > MAX_LINE:
            raise CorruptFileError(f"a .nrrd header line is over {MAX_LINE >> 10} KiB; the file is corrupt")
        if not m:
            raise CorruptFileError("the .nrrd header ends before the blank line that separates it from the voxel "
                                   "data; the file is truncated, or its data is in another file (upload a "
                                   "self-contained .nrrd)")
        if m.end() > MAX_HEADER_BYTES:
            raise CorruptFileError(f"the .nrrd header is over {MAX_HEADER_BYTES >> 20} MiB; the file is corrupt")
        yield buf[pos:m.start()], m.end()
        pos = m.end()


def read_header(f: BinaryIO, max_voxels: int) -> NrrdHeader:
    """Read and check the header of the NRRD open in ``f`` (at its start), up to the voxel data.

    Args:
        f: the file, opened in binary mode; left positioned at the voxel data.
        max_voxels: the largest voxel count accepted.

    Returns:
        The header's meaning.

    Raises:
        CorruptFileError, InvalidVolumeError, UnsupportedFormatError, VolumeTooLargeError: the header breaks
            a rule above; the message says which and what to do.
    """
    lines = _lines(f)
    magic, _ = next(lines)
    if not _MAGIC.fullmatch(magic):
        raise CorruptFileError("not a NRRD file (the first line is not NRRD0001 to NRRD0005); check that the "
                               "upload is complete and really a .nrrd")
    fields: dict[str, bytes] = {}
    pairs = 0
    for number, (line, end) in enumerate(lines, start=2):
        if not line:
            f.seek(end)
            return _interpret(fields, end, max_voxels)
        if b"\0" in line:
            raise CorruptFileError(f"line {number} of the .nrrd header holds a NUL byte (teem would read the "
                                   f"line only up to it); the file is corrupt")
        if line.startswith(b"#"):
            continue
        colon = line.find(b": ")
        name = line[:colon] if colon >= 0 else line
        if colon >= 0 and name.lower().decode("latin-1") in TEEM_FIELDS:
            _check_field(name, fields, number)
            if not _PRINTABLE.fullmatch(line):
                raise CorruptFileError(f"line {number} of the .nrrd header holds a byte that is not printable "
                                       f"ASCII; the file is corrupt")
            value = line[colon + 2:].lstrip(b" \t")  # teem skips these, and no more
            if not value or value != value.rstrip(b" \t"):
                raise CorruptFileError(f"line {number} of the .nrrd header has an empty value or trailing spaces "
                                       f"(which teem reads as part of the value); the file is corrupt")
            fields[_SAME_FIELD.get(name.decode("ascii"), name.decode("ascii"))] = value
        elif b":=" in name:  # teem: a key/value pair when ":=" comes before any ": "
            pairs += 1
            if pairs > MAX_KEY_VALUES:
                raise CorruptFileError(f"the .nrrd header has more than {MAX_KEY_VALUES} key/value pairs; remove "
                                       f"the metadata that is not needed")
        else:
            raise CorruptFileError(f"line {number} of the .nrrd header is neither 'field: value' (with a field "
                                   f"teem knows), 'key:=value' nor a comment; the file is corrupt")
    raise AssertionError("unreachable: _lines ends by raising")


def _check_field(name: bytes, fields: dict[str, bytes], number: int) -> None:
    text = name.decode("latin-1")
    low = text.lower()
    if low in ("data file", "datafile"):
        raise UnsupportedFormatError("the .nrrd header points at a separate data file; upload a self-contained "
                                     ".nrrd")
    if text not in FIELDS:
        canon = low if low in FIELDS else {"spacedimension": "space dimension", "spacedirections":
                                           "space directions", "spaceorigin": "space origin",
                                           "spaceunits": "space units", "lineskip": "line skip",
                                           "byteskip": "byte skip"}.get(low)
        if canon:
            raise CorruptFileError(f"line {number} of the .nrrd header spells the field {text!r}; write it as the "
                                   f"NRRD specification does, {canon!r}")
        raise UnsupportedFormatError(f"the .nrrd header has the field {text!r}, which is not read here (only "
                                     f"{', '.join(sorted(FIELDS))}); save the volume without it (e.g. with "
                                     f"SimpleITK)")
    key = _SAME_FIELD.get(text, text)
    if key in fields:
        raise CorruptFileError(f"the .nrrd header gives {key!r} twice; keep one")
    if key in _NEEDS_DIMENSION and "dimension" not in fields:
        raise CorruptFileError(f"the .nrrd header gives {key!r} before 'dimension', which teem refuses; the "
                               f"file is corrupt")
    if key in _NEEDS_SPACE and not ("space" in fields or "space dimension" in fields):
        raise CorruptFileError(f"the .nrrd header gives {key!r} before 'space' or 'space dimension', which teem "
                               f"refuses; the file is corrupt")
    if key in ("space", "space dimension") and ("space" in fields or "space dimension" in fields):
        raise CorruptFileError("the .nrrd header gives both 'space' and 'space dimension', which teem refuses; "
                               "keep one")


def _interpret(fields: dict[str, bytes], data_start: int, max_voxels: int) -> NrrdHeader:
    for key in ("type", "dimension", "sizes", "encoding"):
        if key not in fields:
            raise CorruptFileError(f"the .nrrd header lacks the {key!r} field; the file is corrupt or not a NRRD")
    dtype = TYPES.get(fields["type"])
    if dtype is None:
        raise InvalidVolumeError(f"the .nrrd voxels are of type {show(fields['type'])!r}, not one of teem's scalar "
                                 f"types in lower case (e.g. short, float); a scalar numeric volume is needed")
    dim = _dimension(fields["dimension"])
    sizes = tuple(parse_count(t, "sizes", FMT) for t in _tokens(fields, "sizes", dim))
    if dim == 4 and sizes[3] != 1:
        raise InvalidVolumeError(f"the volume is 4D with shape {sizes}; only 3D volumes (or 4D with a single time "
                                 f"point) can be segmented. Extract one time point first")
    check_voxels(sizes, max_voxels, FMT)  # before anything is allocated or copied
    encoding = fields["encoding"]
    if encoding not in (b"raw", b"gzip", b"gz"):
        raise UnsupportedFormatError(f"the .nrrd data is encoded as {show(encoding)!r}; save it raw or gzip "
                                     f"compressed")
    for key in ("line skip", "byte skip"):
        if fields.get(key, b"0") != b"0":
            raise UnsupportedFormatError(f"the .nrrd header has a {key} other than 0, which makes teem read its "
                                         f"voxels from elsewhere in the file; save the volume again without it")
    endian = fields.get("endian")
    if endian not in (None, b"little", b"big"):
        raise CorruptFileError(f"the .nrrd header's endian is {show(endian)!r}, not little or big; the file is "
                               f"corrupt")
    if endian is None and int(dtype[1]) > 1:
        raise CorruptFileError("the .nrrd header lacks 'endian', which a multi-byte type needs; the file is corrupt")
    for i, kind in enumerate(_tokens(fields, "kinds", dim) if "kinds" in fields else ()):
        if kind not in DOMAIN_KINDS:
            raise InvalidVolumeError(f"axis {i} of the .nrrd volume is of kind {show(kind)!r}, not a space or "
                                     f"domain axis (a vector, colour or list axis); a scalar (grey-value) volume "
                                     f"is needed")
    if "centers" in fields and not all(c in CENTERS for c in _tokens(fields, "centers", dim)):
        raise CorruptFileError("the .nrrd header's centers are not each cell, node or ???; the file is corrupt")
    if "thicknesses" in fields:
        for t in _tokens(fields, "thicknesses", dim):
            if t != b"nan":
                parse_number(t, "thicknesses", FMT)
    space, space_dim, directions, origin, spacings = _geometry(fields, dim)
    return NrrdHeader(dtype, sizes, endian == b"big", encoding != b"raw", space, space_dim, directions, origin,
                      spacings, data_start)


def _geometry(fields: dict[str, bytes], dim: int):
    space = space_dim = directions = origin = spacings = None
    if "space" in fields:
        space = SPACES.get(fields["space"])
        if space is None:
            raise UnsupportedFormatError(f"the .nrrd space is {show(fields['space'])!r}; only "
                                         f"left-posterior-superior, right-anterior-superior and "
                                         f"left-anterior-superior (or LPS, RAS, LAS), which ITK places "
                                         f"unambiguously, are read here. Save the volume in one of them")
        n = 3
        if dim != 3:
            raise InvalidVolumeError(f"the .nrrd header has a 3D space for {dim} axes; give 'space dimension: "
                                     f"{dim}' instead, or save the volume as 3D")
    elif "space dimension" in fields:
        n = space_dim = parse_count(fields["space dimension"], "space dimension", FMT, 10)
        if n != dim:
            raise InvalidVolumeError(f"the .nrrd space dimension ({n}) is not the number of axes ({dim}); ITK "
                                     f"cannot place such a volume")
    else:
        n = 0
    if n:
        if "spacings" in fields:
            raise CorruptFileError("the .nrrd header gives 'spacings' as well as a space, which ITK refuses; give "
                                   "'space directions' only")
        if "space directions" in fields:
            vectors = _VECTOR.findall(fields["space directions"])
            rest = _VECTOR.sub(b"", fields["space directions"]).strip(b" \t")
            if len(vectors) != dim or rest:
                raise CorruptFileError(f"the .nrrd space directions are not {dim} vectors of the form (x,y,z) "
                                       f"('none' is for non-spatial axes, which cannot be read here); the file is "
                                       f"corrupt")
            directions = tuple(_vector(v, n, "space directions") for v in vectors)
        if "space origin" in fields:
            vector = _VECTOR.fullmatch(fields["space origin"])
            if not vector:
                raise CorruptFileError("the .nrrd space origin is not one vector of the form (x,y,z); the file is "
                                       "corrupt")
            origin = _vector(vector.group(1), n, "space origin")
        if "space units" in fields:
            units = _QUOTED.findall(fields["space units"])
            if len(units) != n or _QUOTED.sub(b"", fields["space units"]).strip(b" \t"):
                raise CorruptFileError(f"the .nrrd space units are not {n} quoted strings; the file is corrupt")
            if any(u != b"mm" for u in units):
                raise InvalidVolumeError("the .nrrd space units are not all millimetres; save the volume in mm")
    elif "spacings" in fields:
        spacings = tuple(parse_number(t, "spacings", FMT) for t in _tokens(fields, "spacings", dim))
        if not all(s > 0 for s in spacings):
            raise InvalidVolumeError(f"the .nrrd spacings are {spacings}; voxel sizes must be positive")
    return space, space_dim, directions, origin, spacings


def _dimension(value: bytes) -> int:
    n = parse_count(value, "dimension", FMT, 16)
    if n in (3, 4):
        return n
    raise InvalidVolumeError(f"the volume has {n} dimensions; only 3D volumes (or 4D with a single time point) "
                             f"can be segmented")


def _tokens(fields: dict[str, bytes], key: str, count: int) -> list[bytes]:
    tokens = _SPLIT.split(fields[key])
    if len(tokens) != count:
        raise CorruptFileError(f"the .nrrd header's {key} has {len(tokens)} value(s) for {count} axes; the file "
                               f"is corrupt")
    return tokens


def _vector(inner: bytes, n: int, what: str) -> tuple[float, ...]:
    parts = inner.split(b",")
    if len(parts) != n:
        raise CorruptFileError(f"a vector of the .nrrd {what} has {len(parts)} component(s) where the space has "
                               f"{n}; the file is corrupt")
    out = []
    for p in parts:
        m = _COMPONENT.fullmatch(p)
        out.append(parse_number(m.group(1) if m else p, what, FMT))
    return tuple(out)


def canonical_header(h: NrrdHeader) -> bytes:
    """The header of the canonical copy: the fields that decide the array and its geometry, raw encoding.

    Numbers are written as Python's shortest exact form, which C's strtod reads back to the same double.
    """
    def vec(values: tuple[float, ...]) -> str:
        return "(" + ",".join(repr(float(v)) for v in values) + ")"

    lines = ["NRRD0004", f"type: {_TYPE_NAME[h.dtype]}", f"dimension: {len(h.sizes)}"]
    if h.space:
        lines.append(f"space: {h.space}")
    elif h.space_dimension:
        lines.append(f"space dimension: {h.space_dimension}")
    lines.append(f"sizes: {' '.join(str(s) for s in h.sizes)}")
    if h.directions:
        lines.append(f"space directions: {' '.join(vec(d) for d in h.directions)}")
    if h.itemsize > 1:
        lines.append(f"endian: {'big' if h.big_endian else 'little'}")
    lines.append("encoding: raw")
    if h.origin:
        lines.append(f"space origin: {vec(h.origin)}")
    if h.spacings:
        lines.append(f"spacings: {' '.join(repr(float(s)) for s in h.spacings)}")
    return ("\n".join(lines) + "\n\n").encode("ascii")


def canonicalise(src: str | os.PathLike, scratch: str | os.PathLike, max_voxels: int) -> Path:
    """Check the .nrrd at ``src`` and write its canonical copy into the folder ``scratch``.

    Args:
        src: the NRRD to read (a self-contained .nrrd).
        scratch: an existing folder this call may write one file into.
        max_voxels: the largest voxel count accepted; checked before anything is copied.

    Returns:
        The canonical copy's path (``scratch/canonical.nrrd``): the same voxels, raw, under a header that only
        has the fields that decide the array and its geometry.

    Raises:
        CorruptFileError, InvalidVolumeError, UnsupportedFormatError, VolumeTooLargeError: the header or the
            voxel data breaks a rule of this module.
    """
    out = Path(scratch) / "canonical.nrrd"
    with open(src, "rb") as f:
        h = read_header(f, max_voxels)
        with open(out, "xb") as dst:
            dst.write(canonical_header(h))
            if h.gzip:
                inflate_exact(f, dst, h.nbytes, GZIP_ONLY, FMT)
            else:
                copy_exact(f, dst, h.nbytes, os.fstat(f.fileno()).st_size - h.data_start, FMT)
    return out
