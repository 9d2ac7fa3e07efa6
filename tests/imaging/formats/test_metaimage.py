"""The strict MetaImage reader: what it refuses and why, and that what it accepts ITK reads the same way.

The differential tests read every accepted input twice with SimpleITK, the original upload and our
canonical copy, and require the same voxel type, bytes, grid and geometry, exactly. Every refusal in the
tables names its reason: each one is a decision, not an accident of the parser.
"""

from __future__ import annotations

import functools
import gzip
import math
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.errors import CorruptFileError, InvalidVolumeError, UnsupportedFormatError, VolumeTooLargeError
from serve.imaging.formats import metaimage
from serve.imaging.formats.common import OUT_CHUNK
from serve.imaging.itk import read_sitk_file, sitk_geometry_to_affine
from serve.imaging.volume_io import read_volume, read_volume_bytes
from tests.imaging.formats.helpers import damage_edits, mutate, rotation, sitk_image, sitk_view

MAX_VOXELS = 10**6
SHAPE = (6, 5, 4)
END = b"ElementDataFile = LOCAL\n"
ACCEPT = "accept"
#: The issue's payload, byte for byte in spirit: a lower-case decoy that a case-insensitive check stops at,
#: then the exact-case key MetaIO uses.
PASSWD = (b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n"
          b"elementdatafile = LOCAL\nElementDataFile = /etc/passwd\n")


@functools.lru_cache(maxsize=None)
def written(dtype: str = "int16", compressed: bool = False) -> tuple[tuple[str, ...], bytes]:
    """The header lines and voxel bytes SimpleITK writes for a small oblique volume."""
    import tempfile

    n = math.prod(SHAPE)
    arr = (np.arange(n) % 251 - 100).astype(dtype).reshape(SHAPE)
    img = sitk_image(arr, (0.9, 1.1, 2.5), (10.0, -20.0, 5.0), tuple(rotation((0.1, 0.2, 0.3)).ravel()))
    with tempfile.TemporaryDirectory() as d:
        sitk.WriteImage(img, f"{d}/v.mha", compressed)
        raw = Path(f"{d}/v.mha").read_bytes()
    at = raw.index(END) + len(END)
    return tuple(raw[:at].decode().splitlines()), raw[at:]


def join(lines, data: bytes, eol: str = "\n") -> bytes:
    return (eol.join(lines) + eol).encode("latin-1") + data


def key(line: str) -> str:
    return line.split("=")[0].strip()


def setv(lines, k: str, value: str | None, new_key: str | None = None) -> list[str]:
    """The lines with ``k``'s value replaced (None: the line dropped), optionally under ``new_key``."""
    return [f"{new_key or k} = {value}" if key(line) == k else line
            for line in lines if not (key(line) == k and value is None)]


def before(lines, k: str, *new: str) -> list[str]:
    i = [key(line) for line in lines].index(k)
    return list(lines[:i]) + list(new) + list(lines[i:])


def plain(edit=lambda lines: lines, data=lambda d: d, eol: str = "\n", dtype: str = "int16"):
    """A builder of an uncompressed file: ``edit`` changes the header lines, ``data`` the voxel bytes."""
    def build() -> bytes:
        lines, voxels = written(dtype)
        return join(edit(list(lines)), data(voxels), eol)
    return build


def packed(stream=lambda v: zlib.compress(v), size=lambda s: str(len(s)), edit=lambda lines: lines):
    """A builder of a compressed file whose stream is ``stream(voxels)`` and CompressedDataSize ``size``."""
    def build() -> bytes:
        lines, _ = written("int16", True)
        voxels = written("int16")[1]
        s = stream(voxels)
        return join(edit(setv(lines, "CompressedDataSize", size(s))), s)
    return build


def raw_header(text: bytes, data: bytes = b""):
    return lambda: text + data


def swap_bytes(data: bytes) -> bytes:
    return np.frombuffer(data, "<i2").astype(">i2").tobytes()


# name -> (builder, ACCEPT or (error class, message fragment))
CASES = {
    # -- accepted, and read by ITK exactly as we read it ---------------------------------------------
    "as_written": (plain(), ACCEPT),
    "colon_separator": (plain(lambda ls: [line.replace(" = ", ": ") for line in ls]), ACCEPT),
    "no_spaces": (plain(lambda ls: [line.replace(" = ", "=") for line in ls]), ACCEPT),
    "tabs": (plain(lambda ls: [line.replace(" = ", "\t=\t") for line in ls]), ACCEPT),
    "crlf_lines": (plain(eol="\r\n"), ACCEPT),
    "keys_reordered": (plain(lambda ls: before(setv(ls, "ElementSpacing", None), "TransformMatrix",
                                               "ElementSpacing = 0.9 1.1 2.5")), ACCEPT),
    "position_for_offset": (plain(lambda ls: setv(ls, "Offset", "1 2 3", "Position")), ACCEPT),
    "origin_for_offset": (plain(lambda ls: setv(ls, "Offset", "1 2 3", "Origin")), ACCEPT),
    "image_position_for_offset": (plain(lambda ls: setv(ls, "Offset", "1 2 3", "ImagePosition")), ACCEPT),
    "rotation_for_transform": (plain(lambda ls: setv(ls, "TransformMatrix", "0 1 0 1 0 0 0 0 -1", "Rotation")),
                               ACCEPT),
    "orientation_for_transform": (plain(lambda ls: setv(ls, "TransformMatrix", "0 1 0 1 0 0 0 0 1",
                                                        "Orientation")), ACCEPT),
    "element_size_only": (plain(lambda ls: setv(ls, "ElementSpacing", "2 3 4", "ElementSize")), ACCEPT),
    "element_size_and_spacing": (plain(lambda ls: before(ls, "DimSize", "ElementSize = 7 7 7")), ACCEPT),
    "element_byte_order_key": (plain(lambda ls: setv(ls, "BinaryDataByteOrderMSB", "False",
                                                     "ElementByteOrderMSB")), ACCEPT),
    "big_endian": (plain(lambda ls: setv(ls, "BinaryDataByteOrderMSB", "True"), swap_bytes), ACCEPT),
    "defaults": (plain(lambda ls: [line for line in ls if key(line) not in (
        "ObjectType", "BinaryData", "BinaryDataByteOrderMSB", "CompressedData", "TransformMatrix", "Offset",
        "CenterOfRotation", "AnatomicalOrientation", "ElementSpacing")]), ACCEPT),
    "metadata": (plain(lambda ls: before(ls, "ElementType", "Comment = from the scanner", "Name = t1",
                                         "Modality = MET_MOD_MR", "ElementMin = -100", "ElementMax = 150",
                                         "ID = 3", "ParentID = -1", "Color = 1 0 0 1", "DistanceUnits = mm",
                                         "AcquisitionDate = 20240101", "SequenceID = 0 0 0",
                                         "ElementNBits = 16", "ElementNumberOfChannels = 01",
                                         "ElementToIntensityFunctionSlope = 1",
                                         "ElementToIntensityFunctionOffset = 0", "ObjectSubType = x")), ACCEPT),
    "number_forms": (plain(lambda ls: setv(setv(ls, "ElementSpacing", "9e-1 1.10 +2.5E0"), "Offset",
                                           ".5 -0 1.")), ACCEPT),
    "leading_zeros": (plain(lambda ls: setv(setv(ls, "DimSize", "06 05 004"), "NDims", "03")), ACCEPT),
    "trailing_blanks": (plain(lambda ls: [line + " \t" for line in ls]), ACCEPT),
    "every_element_type": None,  # replaced below, one case per type
    # -- refused: the findings ---------------------------------------------------------------
    "case_confused_data_file": (raw_header(PASSWD), (CorruptFileError, "case-sensitively")),
    "case_confused_decoy_after_local": (plain(lambda ls: ls[:-1] + ["elementdatafile = /etc/passwd", ls[-1]]),
                                        (CorruptFileError, "case-sensitively")),
    "data_file_path": (plain(lambda ls: setv(ls, "ElementDataFile", "/etc/passwd")),
                       (UnsupportedFormatError, "separate data file")),
    "data_file_relative": (plain(lambda ls: setv(ls, "ElementDataFile", "v.raw")),
                           (UnsupportedFormatError, "separate data file")),
    "data_file_lower_local": (plain(lambda ls: setv(ls, "ElementDataFile", "local")),
                              (UnsupportedFormatError, "separate data file")),
    "data_file_list": (plain(lambda ls: setv(ls, "ElementDataFile", "LIST")),
                       (UnsupportedFormatError, r"list of separate data files")),
    "data_file_pattern": (plain(lambda ls: setv(ls, "ElementDataFile", "/etc/slice%d 1 4 1")),
                          (UnsupportedFormatError, "numbered series")),
    "header_size": (plain(lambda ls: before(ls, "ElementType", "HeaderSize = 0")),
                    (UnsupportedFormatError, "HeaderSize")),
    "header_size_from_end": (plain(lambda ls: before(ls, "ElementType", "HeaderSize = -1")),
                             (UnsupportedFormatError, "HeaderSize")),
    # -- refused: keys ----------------------------------------------------------------------------------
    "lower_case_key": (plain(lambda ls: setv(ls, "DimSize", "6 5 4", "dimsize")),
                       (CorruptFileError, "case-sensitively")),
    "upper_case_key": (plain(lambda ls: setv(ls, "Offset", "1 2 3", "OFFSET")),
                       (CorruptFileError, "case-sensitively")),
    "unknown_key": (plain(lambda ls: before(ls, "DimSize", "Foo = bar")), (CorruptFileError, "does not define")),
    "duplicate_key": (plain(lambda ls: before(ls, "ElementType", "DimSize = 6 5 4")), (CorruptFileError, "twice")),
    # MetaIO stops at the first ElementDataFile: a second one is voxel bytes, to it as to us
    "second_data_file_line_is_data": (plain(lambda ls: ls + ["ElementDataFile = /etc/passwd"]),
                                      (CorruptFileError, r"\(more\)")),
    "synonyms_offset_position": (plain(lambda ls: before(ls, "ElementType", "Position = 1 2 3")),
                                 (CorruptFileError, "same value")),
    "synonyms_matrix_rotation": (plain(lambda ls: before(ls, "ElementType", "Rotation = 1 0 0 0 1 0 0 0 1")),
                                 (CorruptFileError, "same value")),
    "synonyms_byte_order": (plain(lambda ls: before(ls, "ElementType", "ElementByteOrderMSB = True")),
                            (CorruptFileError, "same value")),
    "dimsize_before_ndims": (plain(lambda ls: ["DimSize = 6 5 4"] + setv(ls, "DimSize", None)),
                             (CorruptFileError, "before NDims")),
    "file_format_version": (plain(lambda ls: before(ls, "NDims", "FileFormatVersion = 1")),
                            (UnsupportedFormatError, "FileFormatVersion")),
    "compressed_size_uncompressed": (plain(lambda ls: before(ls, "ElementType", "CompressedDataSize = 10")),
                                     (CorruptFileError, "not compressed")),
    # -- refused: lines ---------------------------------------------------------------------------------
    "nul_in_key": (plain(lambda ls: before(ls, "ElementSpacing", "NDims\0x = -1")), (CorruptFileError, "NUL")),
    "nul_in_value": (plain(lambda ls: setv(ls, "ElementType", "MET_SHORT\0MET_DOUBLE")),
                     (CorruptFileError, "NUL")),
    "lone_cr": (plain(lambda ls: [ls[0] + "\r" + ls[1]] + ls[2:]), (CorruptFileError, "printable")),
    "non_ascii": (plain(lambda ls: before(ls, "DimSize", "Comment = M\xfcller")), (CorruptFileError, "printable")),
    "blank_line": (plain(lambda ls: before(ls, "DimSize", "")), (CorruptFileError, "not 'Key = value'")),
    "leading_space": (plain(lambda ls: [" " + line for line in ls]), (CorruptFileError, "not 'Key = value'")),
    "no_separator": (plain(lambda ls: before(ls, "DimSize", "DimSize 6 5 4")),
                     (CorruptFileError, "not 'Key = value'")),
    "double_separator": (plain(lambda ls: setv(ls, "NDims", "= 3")), (CorruptFileError, "starts with '='")),
    "empty_value": (plain(lambda ls: before(ls, "DimSize", "Comment =")), (CorruptFileError, "no value")),
    "long_line": (plain(lambda ls: before(ls, "DimSize", "Comment = " + "x" * 1100)),
                  (CorruptFileError, "over 1024 bytes")),
    "long_comment": (plain(lambda ls: before(ls, "DimSize", "Comment = " + "x" * 300)),
                     (CorruptFileError, "255-byte")),
    "no_data_file_line": (plain(lambda ls: ls[:-1], lambda d: b""), (CorruptFileError, "ends before")),
    "missing_dimsize": (plain(lambda ls: setv(ls, "DimSize", None)), (CorruptFileError, "lacks DimSize")),
    "missing_element_type": (plain(lambda ls: setv(ls, "ElementType", None)),
                             (CorruptFileError, "lacks ElementType")),
    # -- refused: values --------------------------------------------------------------------------------
    "object_type_other": (plain(lambda ls: setv(ls, "ObjectType", "Tube")), (UnsupportedFormatError, "Tube")),
    "ndims_2": (plain(lambda ls: setv(setv(ls, "NDims", "2"), "DimSize", "6 5")), (InvalidVolumeError, "2D")),
    "ndims_5": (plain(lambda ls: setv(ls, "NDims", "5")), (InvalidVolumeError, "5D")),
    "ndims_99": (plain(lambda ls: setv(ls, "NDims", "99")), (CorruptFileError, "NDims")),
    "ndims_negative": (plain(lambda ls: setv(ls, "NDims", "-1")), (CorruptFileError, "NDims")),
    "dimsize_too_few": (plain(lambda ls: setv(ls, "DimSize", "6 5")), (CorruptFileError, "NDims asks for 3")),
    "dimsize_fraction": (plain(lambda ls: setv(ls, "DimSize", "6 5 4.5")), (CorruptFileError, "whole number")),
    "dimsize_zero": (plain(lambda ls: setv(ls, "DimSize", "6 0 4")), (InvalidVolumeError, "zero-size")),
    "dimsize_huge": (plain(lambda ls: setv(ls, "DimSize", "2000 2000 2000")), (VolumeTooLargeError, "limit")),
    "dimsize_past_int": (plain(lambda ls: setv(ls, "DimSize", "6 5 4294967300")),
                         (CorruptFileError, "whole number")),
    "four_d_many_times": (plain(lambda ls: setv(setv(setv(setv(setv(ls, "NDims", "4"), "DimSize", "6 5 2 2"),
                                                               "TransformMatrix", " ".join("1000010000100001")),
                                                          "Offset", "0 0 0 0"), "ElementSpacing", "1 1 1 1")),
                          (InvalidVolumeError, "only 3D volumes")),
    "element_type_vector": (plain(lambda ls: setv(ls, "ElementType", "MET_SHORT_ARRAY")),
                            (InvalidVolumeError, "components per voxel")),
    "element_type_unknown": (plain(lambda ls: setv(ls, "ElementType", "MET_FOO")), (CorruptFileError, "MET_FOO")),
    "element_type_ascii_char": (plain(lambda ls: setv(ls, "ElementType", "MET_ASCII_CHAR")),
                                (CorruptFileError, "ElementType")),
    "channels_3": (plain(lambda ls: before(ls, "ElementType", "ElementNumberOfChannels = 3")),
                   (InvalidVolumeError, "3 components per voxel")),
    "binary_false": (plain(lambda ls: setv(ls, "BinaryData", "False")), (UnsupportedFormatError, "as text")),
    "bool_lower_case": (plain(lambda ls: setv(ls, "BinaryData", "true")), (CorruptFileError, "True or False")),
    "bool_digit": (plain(lambda ls: setv(ls, "BinaryDataByteOrderMSB", "1")), (CorruptFileError, "True or False")),
    "hex_number": (plain(lambda ls: setv(ls, "ElementSpacing", "0x1p0 1 1")), (CorruptFileError, "decimal")),
    "inf_number": (plain(lambda ls: setv(ls, "Offset", "inf 0 0")), (CorruptFileError, "decimal")),
    "overflowing_number": (plain(lambda ls: setv(ls, "Offset", "1e999 0 0")), (CorruptFileError, "range")),
    "number_with_text": (plain(lambda ls: setv(ls, "Offset", "1mm 0 0")), (CorruptFileError, "decimal")),
    "too_many_values": (plain(lambda ls: setv(ls, "ElementSpacing", "1 1 1 1")), (CorruptFileError, r"4 value\(s\)")),
    "matrix_too_short": (plain(lambda ls: setv(ls, "TransformMatrix", "1 0 0 0 1 0")), (CorruptFileError, "9")),
    "zero_spacing": (plain(lambda ls: setv(ls, "ElementSpacing", "0 1 1")), (InvalidVolumeError, "positive")),
    "negative_spacing": (plain(lambda ls: setv(ls, "ElementSpacing", "-0.9 1 1")), (InvalidVolumeError, "positive")),
    "intensity_scaling": (plain(lambda ls: before(ls, "ElementType", "ElementToIntensityFunctionSlope = 2")),
                          (InvalidVolumeError, "intensity scaling")),
    "distance_in_cm": (plain(lambda ls: before(ls, "ElementType", "DistanceUnits = cm")),
                       (InvalidVolumeError, "millimetres")),
    "bad_orientation": (plain(lambda ls: setv(ls, "AnatomicalOrientation", "RAIX")),
                        (CorruptFileError, "AnatomicalOrientation")),
    "bad_modality": (plain(lambda ls: before(ls, "ElementType", "Modality = MR")), (CorruptFileError, "Modality")),
    # -- refused: voxel data ----------------------------------------------------------------------------
    "data_short": (plain(data=lambda d: d[:-1]), (CorruptFileError, r"\(less\)")),
    "data_long": (plain(data=lambda d: d + b"\0"), (CorruptFileError, r"\(more\)")),
    "data_missing": (plain(data=lambda d: b""), (CorruptFileError, r"\(less\)")),
    # -- compressed ---------------------------------------------------------------------------------------
    "compressed_as_written": (packed(), ACCEPT),
    "compressed_gzip_framing": (packed(lambda v: gzip.compress(v, mtime=0)), ACCEPT),
    "compressed_level_9": (packed(lambda v: zlib.compress(v, 9)), ACCEPT),
    "compressed_truncated": (packed(lambda v: zlib.compress(v)[:-10]), (CorruptFileError, "cut short")),
    "compressed_no_checksum": (packed(lambda v: zlib.compress(v)[:-4]), (CorruptFileError, "cut short")),
    "compressed_garbage": (packed(lambda v: b"garbage!" * 20), (CorruptFileError, "corrupt")),
    "compressed_bad_checksum": (packed(lambda v: zlib.compress(v)[:-1] + bytes([zlib.compress(v)[-1] ^ 1])),
                                (CorruptFileError, "corrupt")),
    "compressed_raw_deflate": (packed(lambda v: zlib.compress(v)[2:-4]), (CorruptFileError, "corrupt")),
    "compressed_too_much": (packed(lambda v: zlib.compress(v + b"\0\0")), (CorruptFileError, "more than")),
    "compressed_too_little": (packed(lambda v: zlib.compress(v[:-2])), (CorruptFileError, "expands to 238 bytes")),
    "compressed_junk_after": (packed(lambda v: zlib.compress(v) + b"junk"), (CorruptFileError, "bytes follow")),
    "compressed_two_streams": (packed(lambda v: zlib.compress(v) + zlib.compress(v)),
                               (CorruptFileError, "bytes follow")),
    "compressed_size_short": (packed(size=lambda s: str(len(s) - 3)), (CorruptFileError, "CompressedDataSize")),
    "compressed_size_long": (packed(size=lambda s: str(len(s) + 3)), (CorruptFileError, "CompressedDataSize")),
    "compressed_size_missing": (packed(edit=lambda ls: setv(ls, "CompressedDataSize", None)),
                                (CorruptFileError, "lacks CompressedDataSize")),
}
del CASES["every_element_type"]
for _t in metaimage.ELEMENT_TYPES:
    _np = {"MET_LONG": "int32", "MET_ULONG": "uint32"}.get(_t)
    if _np:  # SimpleITK writes MET_INT/MET_UINT for these; MetaIO reads both as 4 bytes
        CASES[f"type_{_t}"] = (plain(lambda ls, t=_t: setv(ls, "ElementType", t), dtype=_np), ACCEPT)
    else:
        _np = np.dtype(metaimage.ELEMENT_TYPES[_t]).name
        CASES[f"type_{_t}"] = (plain(dtype=_np), ACCEPT)


def canonical(tmp_path: Path, data: bytes) -> Path:
    src = tmp_path / "in.mha"
    src.write_bytes(data)
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return metaimage.canonicalise(src, scratch, MAX_VOXELS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_case_is_read_as_itk_reads_it_or_refused_for_its_reason(tmp_path, name):
    build, expected = CASES[name]
    data = build()
    if expected == ACCEPT:
        canon = canonical(tmp_path, data)
        assert sitk_view(canon, "MetaImageIO") == sitk_view(tmp_path / "in.mha")
    else:
        cls, reason = expected
        with pytest.raises(cls, match=reason):
            canonical(tmp_path, data)


def test_every_element_type_has_a_case():
    assert {f"type_{t}" for t in metaimage.ELEMENT_TYPES} <= CASES.keys()


# -- the findings of issue #33, through the public entry points ----------------------------------------------

def test_the_case_confused_data_file_is_refused_not_read():
    """Finding 1: the old check stopped at the lower-case decoy; MetaIO read /etc/passwd as voxels."""
    with pytest.raises(CorruptFileError, match="case-sensitively"):
        read_volume_bytes(PASSWD + bytes(64), "upload.mha")


def test_itk_reads_any_file_the_original_header_names(tmp_path):
    """Why the upload never reaches ITK: on the original, MetaIO reads the file the exact-case key names."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(64)))
    payload = PASSWD.replace(b"/etc/passwd", str(secret).encode())
    (tmp_path / "up.mha").write_bytes(payload)
    assert sitk_view(tmp_path / "up.mha").voxels == bytes(range(64))  # ITK: the secret, as voxels
    with pytest.raises(CorruptFileError, match="case-sensitively"):
        canonical(tmp_path, payload)


@pytest.mark.parametrize("stream", [lambda z: z[: len(z) // 3], lambda z: z[:2] + b"\xff" * (len(z) - 2)],
                         ids=["truncated", "garbage"])
def test_a_corrupt_compressed_stream_is_refused_not_read_as_memory(stream):
    """Finding 3: MetaIO prints "Uncompress failed" and returns its buffer as it was; the job succeeded on it."""
    voxels = (np.arange(40 * 40 * 40) % 7).astype(np.uint8).tobytes()
    z = stream(zlib.compress(voxels))
    header = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nCompressedData = True\nCompressedDataSize = "
              f"{len(z)}\nDimSize = 40 40 40\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n").encode()
    with pytest.raises(CorruptFileError, match="compressed stream"):
        read_volume_bytes(header + z, "upload.mha")


@pytest.mark.parametrize("line", ["HeaderSize = -1", "HeaderSize = 4"])
def test_header_size_is_refused(line):
    lines, data = written()
    with pytest.raises(UnsupportedFormatError, match="HeaderSize"):
        read_volume_bytes(join(before(list(lines), "ElementType", line), data), "upload.mha")


# -- the canonical copy -----------------------------------------------------------------------------------------

def test_the_canonical_copy_has_only_the_keys_that_decide_array_and_geometry(tmp_path):
    lines, data = written("int16", True)
    lines = before(list(lines), "ElementType", "Comment = Doe^John", "Modality = MET_MOD_MR")
    canon = canonical(tmp_path, join(lines, data))
    head, _, rest = canon.read_bytes().partition(END)
    keys = [line.split(" = ")[0] for line in head.decode().splitlines()]
    assert keys == ["ObjectType", "NDims", "BinaryData", "BinaryDataByteOrderMSB", "CompressedData",
                    "TransformMatrix", "Offset", "ElementSpacing", "DimSize", "ElementType"]
    assert b"CompressedData = False" in head and b"Doe" not in head
    assert rest == written()[1]  # uncompressed, exactly


def test_read_volume_of_a_mha_leaves_no_scratch_behind(tmp_path):
    lines, data = written()
    (tmp_path / "ok.mha").write_bytes(join(lines, data))
    (tmp_path / "bad.mha").write_bytes(join(lines, data[:-1]))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    vol = read_sitk_file(tmp_path / "ok.mha", MAX_VOXELS, scratch_dir=scratch)
    with pytest.raises(CorruptFileError) as ei:
        read_sitk_file(tmp_path / "bad.mha", MAX_VOXELS, scratch_dir=scratch)
    assert list(scratch.iterdir()) == []
    assert "mriseg-canon" not in ei.value.message and str(scratch) not in ei.value.message
    ref = sitk.ReadImage(str(tmp_path / "ok.mha"))
    assert np.array_equal(vol.data, np.transpose(sitk.GetArrayFromImage(ref), (2, 1, 0)).astype(np.float32))
    assert np.array_equal(vol.affine, sitk_geometry_to_affine(ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection()))


def test_inflation_holds_a_bounded_amount_beyond_its_output(tmp_path):
    nbytes = 64 << 20
    z = zlib.compress(bytes(nbytes), 9)  # 64 KiB that expand to 64 MiB
    header = (f"NDims = 3\nCompressedData = True\nCompressedDataSize = {len(z)}\nDimSize = 512 512 256\n"
              f"ElementType = MET_UCHAR\nElementDataFile = LOCAL\n").encode()
    (tmp_path / "in.mha").write_bytes(header + z)
    (tmp_path / "scratch").mkdir()
    tracemalloc.start()
    try:
        canon = metaimage.canonicalise(tmp_path / "in.mha", tmp_path / "scratch", nbytes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    with open(tmp_path / "in.mha", "rb") as f:
        head = metaimage.canonical_header(metaimage.read_header(f, nbytes))
    assert canon.stat().st_size == len(head) + nbytes
    assert peak < 3 * OUT_CHUNK, peak


# -- trusted local .mhd ------------------------------------------------------------------------------------------

def test_a_local_mhd_is_read_with_its_data_file_after_the_same_header_check(tmp_path):
    lines, data = written()
    (tmp_path / "v.raw").write_bytes(data)
    (tmp_path / "v.mhd").write_bytes(join(setv(list(lines), "ElementDataFile", "v.raw"), b""))
    vol = read_volume(tmp_path / "v.mhd")
    assert vol.shape == SHAPE
    with pytest.raises(UnsupportedFormatError, match="separate file"):
        read_volume(tmp_path / "v.mhd", self_contained=True)
    for bad, reason in (("NDims = 99", "NDims"), ("elementdatafile = v.raw", "case-sensitively")):
        k, _, v = bad.partition(" = ")
        edited = setv(list(lines), "NDims", v) if k == "NDims" else before(list(lines), "ElementDataFile", bad)
        (tmp_path / "bad.mhd").write_bytes(join(setv(edited, "ElementDataFile", "v.raw"), b""))
        with pytest.raises(CorruptFileError, match=reason):
            read_volume(tmp_path / "bad.mhd")


# -- differential: generated volumes and generated header damage ---------------------------------------------

_DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(_DTYPES), size=st.tuples(*[st.integers(2, 5)] * 3), four_d=st.booleans(),
       spacing=st.tuples(*[st.floats(0.05, 9.0)] * 3), origin=st.tuples(*[st.floats(-500, 500)] * 3),
       angles=st.tuples(*[st.floats(-math.pi, math.pi)] * 3), compressed=st.booleans(), msb=st.booleans())
def test_generated_volumes_read_exactly_as_simpleitk_reads_them(tmp_path, dtype, size, four_d, spacing, origin,
                                                                angles, compressed, msb):
    arr = np.random.default_rng(sum(size)).integers(-100, 100, size).astype(dtype)
    img = sitk_image(arr, spacing, origin, tuple(rotation(angles).ravel()))
    if four_d:
        img = sitk.JoinSeries([img])
    path = tmp_path / "in.mha"
    sitk.WriteImage(img, str(path), False)
    raw = path.read_bytes()
    at = raw.index(END) + len(END)
    head, voxels = raw[:at], raw[at:]
    if msb:
        voxels = np.frombuffer(voxels, np.dtype(dtype).newbyteorder("<")).astype(
            np.dtype(dtype).newbyteorder(">")).tobytes()
        head = head.replace(b"BinaryDataByteOrderMSB = False", b"BinaryDataByteOrderMSB = True")
    if compressed:
        voxels = zlib.compress(voxels)
        head = head.replace(b"CompressedData = False", f"CompressedData = True\nCompressedDataSize = "
                                                       f"{len(voxels)}".encode())
    path.write_bytes(head + voxels)
    (tmp_path / "scratch").mkdir(exist_ok=True)
    canon = metaimage.canonicalise(path, tmp_path / "scratch", MAX_VOXELS)
    original = sitk_view(path)
    assert sitk_view(canon, "MetaImageIO") == original
    vol = read_volume(path)
    ref = sitk.ReadImage(str(path))
    assert np.array_equal(vol.data, np.transpose(sitk.GetArrayFromImage(ref), tuple(range(ref.GetDimension()))[::-1])
                          .reshape(vol.shape).astype(np.float32))
    assert np.array_equal(vol.affine, sitk_geometry_to_affine(ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection()))
    canon.unlink()


_TOKENS = [b"=", b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\0", b"0", b"1", b"3", b"4", b"9", b".", b"-",
           b"+", b"e", b"%d", b"LOCAL", b"LIST", b"True", b"False", b"NDims", b"DimSize", b"Offset",
           b"Position", b"ElementSpacing", b"MET_UCHAR", b"MET_DOUBLE", b"HeaderSize = 0\n",
           b"ElementDataFile = LOCAL\n", b"elementdatafile = LOCAL\n", b"CompressedData = True\n",
           b"ElementSize = 2 2 2\n", b"NDims = 4\n"]


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=damage_edits(_TOKENS), compressed=st.booleans())
def test_damaged_headers_are_refused_or_read_exactly_as_simpleitk_reads_them(tmp_path, edits, compressed):
    lines, data = written("int16", compressed)
    head = join(lines, b"")
    damaged = mutate(head, edits) + data
    try:
        canon = canonical(tmp_path, damaged)
    except (CorruptFileError, InvalidVolumeError, UnsupportedFormatError, VolumeTooLargeError):
        return
    # accepted: ITK must read the damaged original exactly as it reads our copy (both, or neither, refused)
    outcomes = []
    for path, io in ((tmp_path / "in.mha", ""), (canon, "MetaImageIO")):
        try:
            outcomes.append(sitk_view(path, io))
        except RuntimeError:
            outcomes.append("ITK refuses")
    assert outcomes[0] == outcomes[1], damaged[: len(head) + 40]
    canon.unlink()
