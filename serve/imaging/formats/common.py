"""Pieces shared by the strict header readers: number grammar, exact data copies and bounded inflation."""

from __future__ import annotations

import math
import re
import zlib
from typing import BinaryIO, Callable

from serve.errors import CorruptFileError, InvalidVolumeError, VolumeTooLargeError

#: A decimal number as both C's strtod and C++'s stream extraction read it whole, nothing more: no hex,
#: no inf/nan, no trailing text (either reader would stop early and take what came before).
NUMBER = rb"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_NUMBER = re.compile(NUMBER)
_UINT = re.compile(rb"[0-9]{1,10}")

#: What is read from the input, and what zlib may hand back, per step: the memory a copy or an inflation
#: holds beyond its output file.
IN_CHUNK = 1 << 16
OUT_CHUNK = 1 << 20

#: gzip or zlib framing, told apart by the first bytes (what zlib's inflateInit2 does with 47).
ZLIB_OR_GZIP = zlib.MAX_WBITS | 32
GZIP_ONLY = zlib.MAX_WBITS | 16


def parse_number(token: bytes, what: str, fmt: str) -> float:
    """A finite decimal number, or a :class:`CorruptFileError` naming ``what`` (a header field)."""
    if not _NUMBER.fullmatch(token):
        raise CorruptFileError(f"the {fmt} header's {what} holds {show(token)!r}, not a decimal number; the "
                               f"file is corrupt, or save it again with a standard writer (e.g. SimpleITK)")
    value = float(token)
    if not math.isfinite(value):
        raise CorruptFileError(f"the {fmt} header's {what} holds {show(token)!r}, beyond a double's range; "
                               f"the file is corrupt")
    return value


def parse_count(token: bytes, what: str, fmt: str, limit: int = 2**31 - 1) -> int:
    """A non-negative decimal integer up to ``limit`` (the readers keep sizes in C ints)."""
    if not _UINT.fullmatch(token) or int(token) > limit:
        raise CorruptFileError(f"the {fmt} header's {what} holds {show(token)!r}, not a whole number from 0 "
                               f"to {limit}; the file is corrupt")
    return int(token)


def check_voxels(shape: tuple[int, ...], max_voxels: int, fmt: str) -> int:
    """The voxel count of ``shape``, refused before anything is allocated when over ``max_voxels`` or zero."""
    if any(s == 0 for s in shape):
        raise InvalidVolumeError(f"the volume has a zero-size dimension (shape {shape}); the file holds no image "
                                 f"data")
    n = math.prod(shape)  # Python ints: no wrap-around for forged sizes
    if n > max_voxels:
        raise VolumeTooLargeError(f"the volume has {n} voxels (shape {shape}), more than the limit of "
                                  f"{max_voxels}; crop or downsample it first")
    return n


def copy_exact(src: BinaryIO, dst: BinaryIO, nbytes: int, remaining: int, fmt: str) -> None:
    """Copy the ``nbytes`` of voxel data that ``src`` holds from its position, which must be all it holds.

    ``remaining`` is what ``src`` holds from there (its size minus its position).
    """
    if remaining != nbytes:
        more = "less" if remaining < nbytes else "more"
        raise CorruptFileError(f"the {fmt} file holds {remaining} bytes of voxel data where its header promises "
                               f"{nbytes} ({more}); the file is truncated or corrupt. Export it again")
    left = nbytes
    while left:
        chunk = src.read(min(IN_CHUNK * 16, left))
        if not chunk:  # the file shrank under us
            raise CorruptFileError(f"the {fmt} file ended inside its voxel data; it is truncated")
        dst.write(chunk)
        left -= len(chunk)


def inflate_exact(src: BinaryIO, dst: BinaryIO, nbytes: int, wbits: int, fmt: str) -> None:
    """Inflate the one compressed stream that is the rest of ``src`` into ``dst``: exactly ``nbytes``.

    The stream must end (with a correct checksum) exactly where the input does, and yield exactly the
    header's byte count: ITK fills the rest of its buffer with whatever memory held when a stream is cut
    short or corrupt ("Uncompress failed"), and ignores what follows a stream's end. No step holds more
    than :data:`IN_CHUNK` of input and :data:`OUT_CHUNK` of output.
    """
    d = zlib.decompressobj(wbits)
    total = 0

    def emit(out: bytes) -> None:
        nonlocal total
        total += len(out)
        if total > nbytes:
            raise CorruptFileError(f"the {fmt} file's compressed voxel data expands to more than the {nbytes} "
                                   f"bytes its header promises; the file is corrupt. Export it again")
        dst.write(out)

    corrupt = _corrupt(fmt)
    try:
        while chunk := src.read(IN_CHUNK):
            if d.eof:
                raise corrupt("bytes follow the end of the compressed stream")
            data = chunk
            while data and not d.eof:
                emit(d.decompress(data, OUT_CHUNK))
                data = d.unconsumed_tail
            if d.unused_data:
                raise corrupt("bytes follow the end of the compressed stream")
        while not d.eof:  # output held back by the OUT_CHUNK bound
            out = d.decompress(b"", OUT_CHUNK)
            if not out:
                break
            emit(out)
    except zlib.error as e:
        raise corrupt(f"the compressed stream is corrupt ({e})") from e
    if not d.eof:
        raise corrupt("the compressed stream is cut short")
    if total != nbytes:
        raise corrupt(f"the compressed voxel data expands to {total} bytes where the header promises {nbytes}")


def _corrupt(fmt: str) -> Callable[[str], CorruptFileError]:
    def make(why: str) -> CorruptFileError:
        return CorruptFileError(f"the {fmt} file's voxel data cannot be used: {why}; the file is truncated or "
                                f"corrupt. Export it again")
    return make


def show(token: bytes) -> str:
    """Header text for a message: at most 40 characters, anything unprintable escaped."""
    text = token[:40].decode("ascii", "backslashreplace")
    return text + ("..." if len(token) > 40 else "")
