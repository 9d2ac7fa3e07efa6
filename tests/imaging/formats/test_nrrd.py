"""The strict NRRD reader: what it refuses and why, and that what it accepts ITK (teem) reads the same way.

As for MetaImage, every accepted input is read twice with SimpleITK, the original and our canonical copy,
and must give the same voxel type, bytes, grid and geometry; every refusal in the table names its reason.
"""

from __future__ import annotations

import functools
import gzip
import math
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.errors import CorruptFileError, InvalidVolumeError, UnsupportedFormatError, VolumeTooLargeError
from serve.imaging.formats import nrrd
from serve.imaging.itk import sitk_geometry_to_affine
from serve.imaging.volume_io import read_volume, read_volume_bytes
from tests.imaging.formats.helpers import damage_edits, mutate, rotation, sitk_image, sitk_view

MAX_VOXELS = 10**6
SHAPE = (6, 5, 4)
ACCEPT = "accept"


@functools.lru_cache(maxsize=None)
def written(dtype: str = "int16", compressed: bool = False, four_d: bool = False) -> tuple[tuple[str, ...], bytes]:
    """The header lines (without the blank line) and data bytes SimpleITK writes for a small oblique volume."""
    n = math.prod(SHAPE)
    arr = (np.arange(n) % 251 - 100).astype(dtype).reshape(SHAPE)
    img = sitk_image(arr, (0.9, 1.1, 2.5), (10.0, -20.0, 5.0), tuple(rotation((0.1, 0.2, 0.3)).ravel()))
    if four_d:
        img = sitk.JoinSeries([img])
    with tempfile.TemporaryDirectory() as d:
        sitk.WriteImage(img, f"{d}/v.nrrd", compressed)
        raw = Path(f"{d}/v.nrrd").read_bytes()
    at = raw.index(b"\n\n")
    return tuple(raw[:at].decode().split("\n")), raw[at + 2:]


def field(line: str) -> str:
    return line.split(": ")[0] if ": " in line else line


def setf(lines, name: str, value: str | None, new_name: str | None = None) -> list[str]:
    """The lines with field ``name``'s value replaced (None: the line dropped), optionally renamed."""
    return [f"{new_name or name}: {value}" if field(line) == name else line
            for line in lines if not (field(line) == name and value is None)]


def before(lines, name: str, *new: str) -> list[str]:
    i = [field(line) for line in lines].index(name)
    return list(lines[:i]) + list(new) + list(lines[i:])


def join(lines, data: bytes, eol: str = "\n") -> bytes:
    return (eol.join(lines) + eol + eol).encode("latin-1") + data


def plain(edit=lambda lines: lines, data=lambda d: d, eol: str = "\n", dtype: str = "int16", four_d: bool = False):
    def build() -> bytes:
        lines, voxels = written(dtype, False, four_d)
        return join(edit(list(lines)), data(voxels), eol)
    return build


def packed(stream=lambda v: gzip.compress(v, mtime=0), edit=lambda lines: lines):
    def build() -> bytes:
        lines, _ = written("int16", True)
        return join(edit(list(lines)), stream(written("int16")[1]))
    return build


def swap_bytes(data: bytes) -> bytes:
    return np.frombuffer(data, "<i2").astype(">i2").tobytes()


def no_space(lines) -> list[str]:
    return [line for line in lines if field(line) not in ("space", "space directions", "space origin")]


CASES = {
    # -- accepted, and read by ITK exactly as we read it ---------------------------------------------
    "as_written": (plain(), ACCEPT),
    "crlf_lines": (plain(eol="\r\n"), ACCEPT),
    "cr_lines": (plain(eol="\r"), ACCEPT),  # teem ends a line at a lone CR too
    # teem takes CR then LF for one line end, even where the LF is the first voxel byte: so do we
    "cr_lines_data_starting_with_lf": (plain(eol="\r", data=lambda d: b"\n" + d[1:]),
                                       (CorruptFileError, r"\(less\)")),
    "magic_0005": (plain(lambda ls: ["NRRD0005"] + ls[1:]), ACCEPT),
    "magic_0001": (plain(lambda ls: ["NRRD0001"] + ls[1:]), ACCEPT),
    "comments_and_key_values": (plain(lambda ls: before(ls, "sizes", "# a comment", "#", "ITK_x:=y",
                                                        "key:=with: a colon", "k:=", "\xe9t\xe9:=\xfc")),
                                ACCEPT),
    # a ": " before the ":=" makes it a field line to teem, and "a key" no field
    "key_value_after_colon": (plain(lambda ls: before(ls, "sizes", "a key: with a colon:=v")),
                              (CorruptFileError, "neither")),
    "spaces_after_colon": (plain(lambda ls: setf(ls, "sizes", "   6 5\t4")), ACCEPT),
    "no_kinds": (plain(lambda ls: setf(ls, "kinds", None)), ACCEPT),
    "kinds_space_and_unknown": (plain(lambda ls: setf(ls, "kinds", "space ??? none")), ACCEPT),
    "centers": (plain(lambda ls: before(ls, "sizes", "centers: cell node ???")), ACCEPT),
    "centerings": (plain(lambda ls: before(ls, "sizes", "centerings: cell cell cell")), ACCEPT),
    "thicknesses": (plain(lambda ls: before(ls, "endian", "thicknesses: nan 1.5 nan")), ACCEPT),
    "content_and_units": (plain(lambda ls: before(ls, "endian", "content: t1", 'space units: "mm" "mm" "mm"')),
                          ACCEPT),
    "no_origin": (plain(lambda ls: setf(ls, "space origin", None)), ACCEPT),
    "no_directions": (plain(lambda ls: setf(ls, "space directions", None)), ACCEPT),
    "space_ras": (plain(lambda ls: setf(ls, "space", "right-anterior-superior")), ACCEPT),
    "space_las": (plain(lambda ls: setf(ls, "space", "left-anterior-superior")), ACCEPT),
    "space_short_names": (plain(lambda ls: setf(ls, "space", "RAS")), ACCEPT),
    "space_dimension": (plain(lambda ls: setf(ls, "space", "3", "space dimension")), ACCEPT),
    "spacings_without_space": (plain(lambda ls: before(no_space(ls), "endian", "spacings: 0.9 1.1 2.5")),
                               ACCEPT),
    "no_geometry": (plain(no_space), ACCEPT),
    "skips_of_zero": (plain(lambda ls: before(ls, "endian", "line skip: 0", "byte skip: 0")), ACCEPT),
    "type_synonyms": (plain(lambda ls: setf(ls, "type", "int16")), ACCEPT),
    "type_long_synonym": (plain(lambda ls: setf(ls, "type", "signed short int")), ACCEPT),
    "vector_spacing": (plain(lambda ls: setf(ls, "space origin", "( 10 ,\t-20, 5.0 )")), ACCEPT),
    "vectors_unseparated": (plain(lambda ls: setf(ls, "space directions",
                                                  field_value(ls, "space directions").replace(") (", ")("))),
                            ACCEPT),
    "big_endian": (plain(lambda ls: setf(ls, "endian", "big"), swap_bytes), ACCEPT),
    "four_d_one_time_point": (plain(four_d=True), ACCEPT),
    "gzip_as_written": (packed(), ACCEPT),
    "gzip_named_gz": (packed(edit=lambda ls: setf(ls, "encoding", "gz")), ACCEPT),
    "gzip_level_9": (packed(lambda v: gzip.compress(v, 9, mtime=0)), ACCEPT),
    # -- refused: data elsewhere ---------------------------------------------------------------------
    "data_file": (plain(lambda ls: before(ls, "space origin", "data file: /etc/passwd")),
                  (UnsupportedFormatError, "separate data file")),
    "data_file_other_case": (plain(lambda ls: before(ls, "space origin", "Data File: /etc/passwd")),
                             (UnsupportedFormatError, "separate data file")),
    "datafile": (plain(lambda ls: before(ls, "space origin", "DATAFILE: /etc/passwd")),
                 (UnsupportedFormatError, "separate data file")),
    "data_file_list": (plain(lambda ls: before(ls, "space origin", "data file: LIST", "/etc/passwd")),
                       (UnsupportedFormatError, "separate data file")),
    "line_skip": (plain(lambda ls: before(ls, "endian", "line skip: 1")), (UnsupportedFormatError, "line skip")),
    "byte_skip_from_end": (plain(lambda ls: before(ls, "endian", "byte skip: -1")),
                           (UnsupportedFormatError, "byte skip")),
    # -- refused: fields -------------------------------------------------------------------------------
    "field_other_case": (plain(lambda ls: setf(ls, "sizes", "6 5 4", "Sizes")), (CorruptFileError, "spells")),
    "field_other_spelling": (plain(lambda ls: setf(ls, "space origin", "(1,2,3)", "spaceorigin")),
                             (CorruptFileError, "spells")),
    "labels": (plain(lambda ls: before(ls, "endian", 'labels: "x" "y" "z"')), (UnsupportedFormatError, "labels")),
    "axis_mins": (plain(lambda ls: before(ls, "endian", "axis mins: 0 0 0")), (UnsupportedFormatError, "axis mins")),
    "measurement_frame": (plain(lambda ls: before(ls, "endian", "measurement frame: (1,0,0) (0,1,0) (0,0,1)")),
                          (UnsupportedFormatError, "measurement frame")),
    "number": (plain(lambda ls: before(ls, "endian", "number: 120")), (UnsupportedFormatError, "number")),
    "duplicate_field": (plain(lambda ls: before(ls, "endian", "sizes: 6 5 4")), (CorruptFileError, "twice")),
    "centers_and_centerings": (plain(lambda ls: before(ls, "endian", "centers: cell cell cell",
                                                       "centerings: cell cell cell")), (CorruptFileError, "twice")),
    "sizes_before_dimension": (plain(lambda ls: ls[:3] + ["sizes: 6 5 4"] + setf(ls[3:], "sizes", None)),
                               (CorruptFileError, "before 'dimension'")),
    "directions_before_space": (plain(lambda ls: before(setf(ls, "space directions", None), "space",
                                                        "space directions: (1,0,0) (0,1,0) (0,0,1)")),
                                (CorruptFileError, "before 'space'")),
    "space_and_space_dimension": (plain(lambda ls: before(ls, "sizes", "space dimension: 3")),
                                  (CorruptFileError, "both")),
    "missing_type": (plain(lambda ls: setf(ls, "type", None)), (CorruptFileError, "lacks the 'type'")),
    "missing_encoding": (plain(lambda ls: setf(ls, "encoding", None)), (CorruptFileError, "lacks the 'encoding'")),
    "missing_endian": (plain(lambda ls: setf(ls, "endian", None)), (CorruptFileError, "lacks 'endian'")),
    # -- refused: lines --------------------------------------------------------------------------------
    "nul": (plain(lambda ls: setf(ls, "type", "short\0double")), (CorruptFileError, "NUL")),
    "non_ascii_field": (plain(lambda ls: before(ls, "endian", "content: \xe9")), (CorruptFileError, "printable")),
    "trailing_space": (plain(lambda ls: setf(ls, "type", "short ")), (CorruptFileError, "trailing spaces")),
    "empty_value": (plain(lambda ls: before(ls, "endian", "content: ")), (CorruptFileError, "empty value")),
    "no_colon": (plain(lambda ls: before(ls, "endian", "just words")), (CorruptFileError, "neither")),
    "leading_space": (plain(lambda ls: ls[:1] + [" " + line for line in ls[1:]]), (CorruptFileError, "neither")),
    "long_comment": (plain(lambda ls: before(ls, "endian", "# " + "x" * 70000)), (CorruptFileError, "KiB")),
    "no_blank_line": (lambda: "\n".join(written()[0]).encode() + b"\n", (CorruptFileError, "ends before")),
    "magic_0006": (plain(lambda ls: ["NRRD0006"] + ls[1:]), (CorruptFileError, "not a NRRD")),
    "magic_old": (plain(lambda ls: ["NRRD00.01"] + ls[1:]), (CorruptFileError, "not a NRRD")),
    # -- refused: values ---------------------------------------------------------------------------------
    "type_other_case": (plain(lambda ls: setf(ls, "type", "Short")), (InvalidVolumeError, "lower case")),
    "type_block": (plain(lambda ls: setf(ls, "type", "block")), (InvalidVolumeError, "type")),
    "dimension_2": (plain(lambda ls: setf(setf(ls, "dimension", "2"), "sizes", "6 5")),
                    (InvalidVolumeError, "2 dimensions")),
    "four_d_many_times": (plain(lambda ls: setf(ls, "sizes", "6 5 2 2"), four_d=True),
                          (InvalidVolumeError, "only 3D volumes")),
    "kinds_vector": (plain(lambda ls: setf(ls, "kinds", "vector domain domain")), (InvalidVolumeError, "kind")),
    "sizes_too_few": (plain(lambda ls: setf(ls, "sizes", "6 5")), (CorruptFileError, "for 3 axes")),
    "sizes_zero": (plain(lambda ls: setf(ls, "sizes", "6 0 4")), (InvalidVolumeError, "zero-size")),
    "sizes_huge": (plain(lambda ls: setf(ls, "sizes", "2000 2000 2000")), (VolumeTooLargeError, "limit")),
    "encoding_ascii": (plain(lambda ls: setf(ls, "encoding", "ascii")), (UnsupportedFormatError, "encoded")),
    "encoding_bzip2": (plain(lambda ls: setf(ls, "encoding", "bzip2")), (UnsupportedFormatError, "encoded")),
    "endian_other": (plain(lambda ls: setf(ls, "endian", "middle")), (CorruptFileError, "little or big")),
    "space_scanner": (plain(lambda ls: setf(ls, "space", "scanner-xyz")), (UnsupportedFormatError, "space")),
    "space_lower_case": (plain(lambda ls: setf(ls, "space", "lps")), (UnsupportedFormatError, "space")),
    "space_dimension_mismatch": (plain(lambda ls: setf(ls, "space", "4", "space dimension")),
                                 (InvalidVolumeError, "space dimension")),
    "direction_none": (plain(lambda ls: setf(ls, "space directions", "none (0,1,0) (0,0,1)")),
                       (CorruptFileError, "vectors")),
    "direction_short": (plain(lambda ls: setf(ls, "space directions", "(1,0) (0,1,0) (0,0,1)")),
                        (CorruptFileError, "component")),
    "direction_inf": (plain(lambda ls: setf(ls, "space directions", "(inf,0,0) (0,1,0) (0,0,1)")),
                      (CorruptFileError, "decimal")),
    "origin_hex": (plain(lambda ls: setf(ls, "space origin", "(0x10,0,0)")), (CorruptFileError, "decimal")),
    "spacings_with_space": (plain(lambda ls: before(ls, "endian", "spacings: 1 1 1")), (CorruptFileError, "spacings")),
    "spacings_negative": (plain(lambda ls: before(no_space(ls), "endian", "spacings: -1 1 1")),
                          (InvalidVolumeError, "positive")),
    "space_units_cm": (plain(lambda ls: before(ls, "endian", 'space units: "cm" "cm" "cm"')),
                       (InvalidVolumeError, "millimetres")),
    "centers_other": (plain(lambda ls: before(ls, "endian", "centers: cell cell middle")),
                      (CorruptFileError, "centers")),
    # -- refused: voxel data -----------------------------------------------------------------------------
    "data_short": (plain(data=lambda d: d[:-1]), (CorruptFileError, r"\(less\)")),
    "data_long": (plain(data=lambda d: d + b"\0"), (CorruptFileError, r"\(more\)")),
    "gzip_truncated": (packed(lambda v: gzip.compress(v, mtime=0)[:-12]), (CorruptFileError, "cut short")),
    "gzip_no_trailer": (packed(lambda v: gzip.compress(v, mtime=0)[:-8]), (CorruptFileError, "cut short")),
    "gzip_garbage": (packed(lambda v: b"\x1f\x8b\x08\x00" + b"garbage!" * 20), (CorruptFileError, "corrupt")),
    "gzip_bad_crc": (packed(lambda v: (lambda g: g[:-8] + bytes([g[-8] ^ 1]) + g[-7:])(gzip.compress(v, mtime=0))),
                     (CorruptFileError, "corrupt")),
    "gzip_too_much": (packed(lambda v: gzip.compress(v + b"\0\0", mtime=0)), (CorruptFileError, "more than")),
    "gzip_too_little": (packed(lambda v: gzip.compress(v[:-2], mtime=0)),
                        (CorruptFileError, "expands to 238 bytes")),
    "gzip_junk_after": (packed(lambda v: gzip.compress(v, mtime=0) + b"junk"), (CorruptFileError, "bytes follow")),
    "gzip_two_members": (packed(lambda v: gzip.compress(v[:100], mtime=0) + gzip.compress(v[100:], mtime=0)),
                         (CorruptFileError, "bytes follow")),
    "gzip_zlib_framing": (packed(lambda v: zlib.compress(v)), (CorruptFileError, "corrupt")),
    "gzip_but_raw": (packed(lambda v: v), (CorruptFileError, "corrupt")),
}
for _np in ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"):
    CASES[f"type_{_np}"] = (plain(dtype=_np), ACCEPT)


def field_value(lines, name: str) -> str:
    return next(line for line in lines if field(line) == name).split(": ", 1)[1]


def canonical(tmp_path: Path, data: bytes) -> Path:
    src = tmp_path / "in.nrrd"
    src.write_bytes(data)
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return nrrd.canonicalise(src, scratch, MAX_VOXELS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_case_is_read_as_itk_reads_it_or_refused_for_its_reason(tmp_path, name):
    build, expected = CASES[name]
    data = build()
    if expected == ACCEPT:
        canon = canonical(tmp_path, data)
        assert sitk_view(canon, "NrrdImageIO") == sitk_view(tmp_path / "in.nrrd")
    else:
        cls, reason = expected
        with pytest.raises(cls, match=reason):
            canonical(tmp_path, data)


def test_a_data_file_in_another_case_is_refused_through_the_upload_path():
    """teem matches field names case-insensitively: 'Data File' is 'data file' to it."""
    with pytest.raises(UnsupportedFormatError, match="separate data file"):
        read_volume_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
                          b"Data File: /etc/passwd\n\n", "upload.nrrd")


def test_a_corrupt_gzip_stream_is_refused_through_the_upload_path():
    lines, _ = written("int16", True)
    data = gzip.compress(written()[1], mtime=0)
    with pytest.raises(CorruptFileError, match="compressed stream"):
        read_volume_bytes(join(lines, data[: len(data) // 2]), "upload.nrrd")


def test_the_canonical_copy_has_only_the_fields_that_decide_array_and_geometry(tmp_path):
    lines = before(list(written("int16", True)[0]), "endian", "content: Doe^John", "ITK_x:=Doe")
    canon = canonical(tmp_path, join(lines, written("int16", True)[1]))
    head, _, rest = canon.read_bytes().partition(b"\n\n")
    assert [field(x) for x in head.decode().splitlines()] == [
        "NRRD0004", "type", "dimension", "space", "sizes", "space directions", "endian", "encoding", "space origin"]
    assert b"encoding: raw" in head and b"Doe" not in head
    assert rest == written()[1]


def test_read_volume_of_a_nrrd_matches_simpleitk(tmp_path):
    lines, data = written("int16", True)
    (tmp_path / "v.nrrd").write_bytes(join(lines, data))
    vol = read_volume(tmp_path / "v.nrrd")
    ref = sitk.ReadImage(str(tmp_path / "v.nrrd"))
    assert np.array_equal(vol.data, np.transpose(sitk.GetArrayFromImage(ref), (2, 1, 0)).astype(np.float32))
    assert np.array_equal(vol.affine, sitk_geometry_to_affine(ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection()))


# -- differential: generated volumes and generated header damage ---------------------------------------------

@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(["int8", "uint8", "int16", "uint16", "int32", "float32", "float64", "uint64"]),
       size=st.tuples(*[st.integers(2, 5)] * 3), four_d=st.booleans(),
       spacing=st.tuples(*[st.floats(0.05, 9.0)] * 3), origin=st.tuples(*[st.floats(-500, 500)] * 3),
       angles=st.tuples(*[st.floats(-math.pi, math.pi)] * 3), compressed=st.booleans(), big=st.booleans(),
       space=st.sampled_from(["left-posterior-superior", "right-anterior-superior", "left-anterior-superior"]))
def test_generated_volumes_read_exactly_as_simpleitk_reads_them(tmp_path, dtype, size, four_d, spacing, origin,
                                                                angles, compressed, big, space):
    arr = np.random.default_rng(sum(size)).integers(-100, 100, size).astype(dtype)
    img = sitk_image(arr, spacing, origin, tuple(rotation(angles).ravel()))
    if four_d:
        img = sitk.JoinSeries([img])
    path = tmp_path / "in.nrrd"
    sitk.WriteImage(img, str(path), False)
    raw = path.read_bytes()
    at = raw.index(b"\n\n") + 2
    head, voxels = raw[:at], raw[at:]
    if not four_d:
        head = head.replace(b"space: left-posterior-superior", f"space: {space}".encode())
    if big and np.dtype(dtype).itemsize > 1:
        voxels = np.frombuffer(voxels, np.dtype(dtype).newbyteorder("<")).astype(
            np.dtype(dtype).newbyteorder(">")).tobytes()
        head = head.replace(b"endian: little", b"endian: big")
    if compressed:
        voxels = gzip.compress(voxels, mtime=0)
        head = head.replace(b"encoding: raw", b"encoding: gzip")
    path.write_bytes(head + voxels)
    (tmp_path / "scratch").mkdir(exist_ok=True)
    canon = nrrd.canonicalise(path, tmp_path / "scratch", MAX_VOXELS)
    assert sitk_view(canon, "NrrdImageIO") == sitk_view(path)
    vol = read_volume(path)
    ref = sitk.ReadImage(str(path))
    assert np.array_equal(vol.data, np.transpose(sitk.GetArrayFromImage(ref), tuple(range(ref.GetDimension()))[::-1])
                          .reshape(vol.shape).astype(np.float32))
    assert np.array_equal(vol.affine, sitk_geometry_to_affine(ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection()))
    canon.unlink()


_TOKENS = [b":", b": ", b":=", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\0", b"#", b"0", b"1", b"3", b"4", b"9",
           b".", b"-", b"+", b"e", b"(", b")", b",", b"nan", b"none", b"raw", b"gzip", b"little", b"big",
           b"space", b"sizes", b"data file: /etc/hostname\n", b"Data File: x\n", b"byte skip: -1\n",
           b"line skip: 1\n", b"kinds: vector domain domain\n", b"space dimension: 3\n", b"\n\n",
           b"right-anterior-superior", b"short", b"double", b"dimension: 4\n"]


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=damage_edits(_TOKENS), compressed=st.booleans())
def test_damaged_headers_are_refused_or_read_exactly_as_simpleitk_reads_them(tmp_path, edits, compressed):
    lines, data = written("int16", compressed)
    head = join(lines, b"")
    damaged = mutate(head[:-1], edits) + b"\n" + data  # the blank line that ends the header stays
    try:
        canon = canonical(tmp_path, damaged)
    except (CorruptFileError, InvalidVolumeError, UnsupportedFormatError, VolumeTooLargeError):
        return
    outcomes = []
    for path, io in ((tmp_path / "in.nrrd", ""), (canon, "NrrdImageIO")):
        try:
            outcomes.append(sitk_view(path, io))
        except RuntimeError:
            outcomes.append("ITK refuses")
    assert outcomes[0] == outcomes[1], damaged[: len(head) + 40]
    canon.unlink()
