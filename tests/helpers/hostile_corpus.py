"""A generated corpus of hostile and broken uploads for the volume decoder.

Nothing binary is committed: every input is built here from nibabel, SimpleITK,
gzip/zlib, zipfile and struct, deterministically (seeded), in well under a second
or two. Each :class:`HostileInput` names the 4xx statuses that
``serve.imaging.volume_io.read_volume_bytes`` may answer with; anything else (another
status, a non-``MrisegError`` exception, a crashed process) is a bug.

The decompression bombs are real: their compressed streams truly expand to the
sizes their headers declare (the repeated deflate block and the CRCs are computed
without ever materialising the expanded bytes), so decoding one by mistake would
show up as gigabytes of memory or disk, not as a quick error.

Run as a script to print what each input yields: ``python -m tests.helpers.hostile_corpus``.
"""

from __future__ import annotations

import base64
import gzip
import io
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

#: The voxel limit the statuses below assume (serve.imaging.volume_io's default, without MRISEG_MAX_VOXELS).
MAX_VOXELS = 512 * 512 * 1024
#: The zip expansion limit the zip bombs must exceed (serve.imaging.volume_io's default, without MRISEG_MAX_ZIP_BYTES).
MAX_ZIP_BYTES = 4 * 1024**3
#: Entries whose payload expands far beyond what it weighs: decoding them must cost next to nothing.
BOMBS = ("nifti_huge_dims", "nifti_gzip_bomb", "zip_bomb", "zip_bomb_forged_size", "mha_huge_dims",
         "nrrd_huge_dims", "dicom_meta_length_bomb", "zip_dicom_meta_length_bomb", "dicom_meta_unknown_vr",
         "dicom_dataset_length_bomb", "nifti_extension_bomb", "nifti_extension_negative_size")

_MIB = 1 << 20
_EXTENSION_BOMB_MIB = 512
_BOMB_ENTRY_MIB = 2304  # 2.25 GiB: two such entries pass MAX_ZIP_BYTES without needing ZIP64 fields


@dataclass(frozen=True)
class HostileInput:
    """One upload: its bytes, the name it is uploaded under, and the acceptable 4xx statuses."""

    name: str
    filename: str
    data: bytes
    statuses: tuple[int, ...]
    what: str


# -- helpers ---------------------------------------------------------------------------------

def _ramp(shape: tuple[int, ...] = (12, 10, 8)) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


def _nifti(data: np.ndarray, edit: Callable[[nib.Nifti1Header], None] | None = None, gz: bool = False,
           affine: np.ndarray | None = None) -> bytes:
    """NIfTI-1 bytes of ``data``; ``edit`` changes raw header fields afterwards (no consistency fixes)."""
    affine = np.diag([1.2, 1.3, 2.0, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    if edit is not None:
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
        edit(hdr)
        raw = hdr.binaryblock + raw[348:]  # binaryblock skips write_to's checks, so broken values survive
    return gzip.compress(raw, mtime=0) if gz else raw


def _sitk_bytes(image: sitk.Image, suffix: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="hostile-") as d:
        path = Path(d) / f"v{suffix}"
        sitk.WriteImage(image, str(path))
        return path.read_bytes()


def _sitk_image(arr_ijk: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(np.transpose(arr_ijk, tuple(range(arr_ijk.ndim))[::-1]).copy())
    img.SetSpacing((0.9, 1.1, 2.5)[: arr_ijk.ndim])
    return img


def _dicom_slices(depth: int, positions: Sequence[Sequence[float]] | None = None,
                  orientations: Sequence[str] | None = None) -> list[tuple[str, bytes]]:
    """A small int16 DICOM series, one file per slice; ``positions``/``orientations`` override the
    ImagePositionPatient/ImageOrientationPatient of each slice (one series UID either way)."""
    arr = (_ramp((16, 12, depth)) % 300).astype(np.int16)
    img = _sitk_image(arr)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    out = []
    with tempfile.TemporaryDirectory(prefix="hostile-dcm-") as d:
        for k in range(depth):
            sl = img[:, :, k]
            # every UID and date fixed: ITK would otherwise make up new ones, and the corpus must not change
            for tag, value in {"0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.9.1",
                               "0008|0018": f"1.2.826.0.1.3680043.2.1125.9.3.{k + 1}",
                               "0020|0052": "1.2.826.0.1.3680043.2.1125.9.4", "0008|0012": "20240101",
                               "0008|0013": "000000", "0008|0020": "20240101", "0008|0030": "000000",
                               "0020|000e": "1.2.826.0.1.3680043.2.1125.9.2", "0020|0013": str(k + 1),
                               "0020|0037": orientations[k] if orientations else "1\\0\\0\\0\\1\\0",
                               # GDCM writes the rescale tags only once some earlier read has set them: fix them
                               "0028|1052": "0", "0028|1053": "1", "0028|1054": "US",
                               "0020|0032": "\\".join(f"{v:.3f}" for v in (
                                   positions[k] if positions else img.TransformIndexToPhysicalPoint((0, 0, k))))
                               }.items():
                sl.SetMetaData(tag, value)
            path = Path(d) / f"slice{k:03d}.dcm"
            writer.SetFileName(str(path))
            writer.Execute(sl)
            out.append((path.name, path.read_bytes()))
    return out


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, payload in entries:
            zf.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), payload, zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def crc32_repeat(block: bytes, n: int, crc: int = 0) -> int:
    """``zlib.crc32(block * n, crc)`` without building ``block * n``.

    Extending a CRC by a fixed block is an affine map over GF(2), so its n-th power takes
    O(log n) compositions instead of gigabytes of CRC work.
    """
    Affine = tuple[list[int], int]  # images of the 32 unit vectors under the linear part, and the constant

    def apply(m: Affine, s: int) -> int:
        cols, out = m
        for i in range(32):
            if s >> i & 1:
                out ^= cols[i]
        return out

    def compose(g: Affine, h: Affine) -> Affine:  # g after h
        return [apply(g, c) ^ g[1] for c in h[0]], apply(g, h[1])

    const = zlib.crc32(block, 0)
    step: Affine = ([zlib.crc32(block, 1 << i) ^ const for i in range(32)], const)
    result: Affine = ([1 << i for i in range(32)], 0)
    while n:
        if n & 1:
            result = compose(step, result)
        step = compose(step, step)
        n >>= 1
    return apply(result, crc)


def _zero_deflate(mib: int, prefix: bytes = b"") -> tuple[bytes, int]:
    """A raw deflate stream of ``prefix`` then ``mib`` MiB of zeros, and its CRC-32; about 1 KiB per MiB."""
    zeros = bytes(_MIB)
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = head.compress(prefix) + head.flush(zlib.Z_FULL_FLUSH)
    # after a full flush a block depends on nothing before it, so one compressed MiB can be repeated
    rep = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = rep.compress(zeros) + rep.flush(zlib.Z_FULL_FLUSH)
    stream = first + block * mib + b"\x03\x00"  # an empty final block ends the stream
    return stream, crc32_repeat(zeros, mib, zlib.crc32(prefix))


def _raw_zip(entries: list[tuple[bytes, bytes, int, int, int]], version: int = 20, flags: int = 0,
             local_flags: int | None = None) -> bytes:
    """A zip of already-compressed entries (name, stream, crc, declared size, method) built by hand, so
    every field (sizes, version needed, flags, in the local header and the central directory) can say anything."""
    out, central = bytearray(), bytearray()
    local_flags = flags if local_flags is None else local_flags
    for fname, stream, crc, size, method in entries:
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", version, local_flags, method, 0, 0x21, crc, len(stream), size,
                           len(fname), 0) + fname + stream
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, version, flags, method, 0, 0x21, crc,
                               len(stream), size, len(fname), 0, 0, 0, 0, 0o100644 << 16, offset) + fname
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), len(out), 0)
    return bytes(out + central + eocd)


def _mha_header(**fields: str) -> bytes:
    base = {"ObjectType": "Image", "NDims": "3", "BinaryData": "True", "BinaryDataByteOrderMSB": "False",
            "ElementSpacing": "1 1 1", "DimSize": "4 4 4", "ElementType": "MET_UCHAR"}
    base.update(fields)
    lines = [f"{k} = {v}" for k, v in base.items() if v is not None and k != "ElementDataFile"]
    lines.append(f"ElementDataFile = {fields.get('ElementDataFile', 'LOCAL')}")
    return ("\n".join(lines) + "\n").encode()


# -- the corpus --------------------------------------------------------------------------------

def corpus() -> list[HostileInput]:
    """Every hostile input, freshly generated (about 10 MB, about a second)."""
    rng = np.random.default_rng(20240808)
    noise = rng.normal(size=(24, 24, 24)).astype(np.float32)
    random_bytes = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    out: list[HostileInput] = []

    def add(name: str, filename: str, data: bytes, statuses: tuple[int, ...], what: str) -> None:
        out.append(HostileInput(name, filename, data, statuses, what))

    # -- NIfTI: truncation, wrong magic, size mismatches ------------------------------------
    gz = _nifti(noise, gz=True)
    add("nifti_gz_truncated", "scan.nii.gz", gz[: len(gz) // 2], (422,), "gzip NIfTI cut in half")
    plain = _nifti(_ramp((20, 20, 20)))
    add("nifti_truncated", "scan.nii", plain[:2000], (422,), "plain NIfTI cut inside the voxel data")
    add("nifti_header_truncated", "scan.nii", plain[:200], (422,), "plain NIfTI cut inside the header")
    add("random_bytes_nii_gz", "scan.nii.gz", random_bytes, (422,), "random bytes named .nii.gz (no gzip magic)")
    add("random_bytes_nii", "scan.nii", random_bytes, (422,), "random bytes named .nii (no NIfTI magic)")
    add("gzip_of_garbage", "scan.nii.gz", gzip.compress(random_bytes, mtime=0), (422,),
        "a valid gzip stream of random bytes")
    add("plain_nifti_named_gz", "scan.nii.gz", _nifti(_ramp()), (422,), "an uncompressed NIfTI named .nii.gz")

    def dims(*d: int) -> Callable[[nib.Nifti1Header], None]:
        def edit(h: nib.Nifti1Header) -> None:
            h["dim"][0] = len(d)
            h["dim"][1: 1 + len(d)] = d
        return edit

    add("nifti_too_little_data", "scan.nii", _nifti(_ramp((16, 16, 8)), dims(16, 16, 40)), (422,),
        "header dims (16,16,40) but voxel data for (16,16,8)")
    add("nifti_gz_too_little_data", "scan.nii.gz", _nifti(_ramp((16, 16, 8)), dims(16, 16, 40), gz=True), (422,),
        "gzip NIfTI: header dims (16,16,40) but voxel data for (16,16,8)")

    def vox_offset(offset: float) -> Callable[[nib.Nifti1Header], None]:
        def edit(h: nib.Nifti1Header) -> None:
            h["vox_offset"] = offset
        return edit

    add("nifti_vox_offset_past_end", "scan.nii", _nifti(_ramp(), vox_offset(1e6)), (422,),
        "vox_offset points past the end of the file")
    # found by the fuzz target: numpy.memmap raised OverflowError (a 500)
    add("nifti_vox_offset_overflow", "scan.nii", _nifti(_ramp(), vox_offset(1.1e27)), (422,),
        "vox_offset = 1.1e27, past any C long")

    # -- bombs --------------------------------------------------------------------------------
    big = nib.Nifti1Header()
    big.set_data_shape((2000, 2000, 2000))
    big.set_data_dtype(np.float32)
    big.set_data_offset(352)
    add("nifti_huge_dims", "scan.nii.gz", gzip.compress(big.binaryblock + bytes(4 + 4096), mtime=0), (413,),
        "header promises 2000^3 float32 voxels (32 GB), the file holds 4 KB")
    bomb = nib.Nifti1Header()
    bomb.set_data_shape((1024, 1024, 1024))
    bomb.set_data_dtype(np.uint8)
    bomb.set_data_offset(352)
    prefix = bomb.binaryblock + bytes(4)  # header + empty extension flag: the voxels start at byte 352
    stream, crc = _zero_deflate(1024, prefix)
    member = (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + stream
              + struct.pack("<2L", crc, (len(prefix) + 1024 * _MIB) & 0xFFFFFFFF))
    add("nifti_gzip_bomb", "scan.nii.gz", member, (413,),
        "1 MB of gzip that really expands to 1 GiB: a 1024^3 uint8 volume over the voxel limit")
    for name, esize, statuses, what in (
            ("nifti_extension_bomb", _EXTENSION_BOMB_MIB * _MIB, (413,),
             "0.5 MB of gzip whose header extension really is 512 MiB (nibabel reads an extension whole)"),
            ("nifti_extension_negative_size", -8, (422,),
             "header extension of size -8 before 512 MiB of zeros (nibabel would read(-16): all the rest)")):
        small = nib.Nifti1Header()
        small.set_data_shape((4, 4, 4))
        small.set_data_dtype(np.uint8)
        small["vox_offset"] = 352 + _EXTENSION_BOMB_MIB * _MIB
        prefix = small.binaryblock + bytes([1, 0, 0, 0]) + struct.pack("<2i", esize, 0)
        stream, crc = _zero_deflate(_EXTENSION_BOMB_MIB, prefix)
        add(name, "scan.nii.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + stream
            + struct.pack("<2L", crc, (len(prefix) + _EXTENSION_BOMB_MIB * _MIB) & 0xFFFFFFFF), statuses, what)
    stream, crc = _zero_deflate(_BOMB_ENTRY_MIB)
    size = _BOMB_ENTRY_MIB * _MIB
    add("zip_bomb", "series.zip", _raw_zip([(b"a.dcm", stream, crc, size, 8), (b"b.dcm", stream, crc, size, 8)]),
        (413,), "5 MB zip of two entries that really expand to 2.25 GiB each (over the 4 GiB zip limit)")
    add("zip_bomb_forged_size", "series.zip", _raw_zip([(b"a.dcm", stream, crc, _MIB, 8)]), (413, 422),
        "zip entry declaring 1 MiB whose data expands to 2.25 GiB")

    # -- NIfTI: values and geometry -------------------------------------------------------------
    for name, value in (("nifti_nan_voxels", np.nan), ("nifti_inf_voxels", np.inf)):
        data = _ramp()
        data[3, 4, 5] = value
        add(name, "scan.nii.gz", _nifti(data, gz=True), (422,), f"one voxel is {value}")

    def pixdim(x: float) -> Callable[[nib.Nifti1Header], None]:
        def edit(h: nib.Nifti1Header) -> None:
            h["sform_code"] = 0  # the qform (built from pixdim) is the transform in use
            h["pixdim"][1] = x
        return edit

    add("nifti_zero_pixdim", "scan.nii", _nifti(_ramp(), pixdim(0.0)), (422,),
        "qform in use, pixdim[1] = 0 (nibabel would silently use 1 mm)")
    add("nifti_negative_pixdim", "scan.nii", _nifti(_ramp(), pixdim(-1.2)), (422,),
        "qform in use, pixdim[1] = -1.2 (nibabel takes |x|, ITK flips the axis)")

    def zero_sform(h: nib.Nifti1Header) -> None:
        h["qform_code"], h["sform_code"] = 0, 1
        for row in ("srow_x", "srow_y", "srow_z"):
            h[row] = 0

    def zero_qform(h: nib.Nifti1Header) -> None:
        h["qform_code"], h["sform_code"] = 1, 0
        for f in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"):
            h[f] = 0
        h["pixdim"][1:4] = 0

    def inf_sform(h: nib.Nifti1Header) -> None:
        h["srow_x"][0] = np.inf

    def bad_quaternion(h: nib.Nifti1Header) -> None:
        h["sform_code"] = 0
        h["quatern_b"] = 5.0  # b^2 + c^2 + d^2 > 1: no rotation has it

    add("nifti_zero_sform", "scan.nii", _nifti(_ramp(), zero_sform), (422,), "sform in use and all zero")
    add("nifti_zero_qform", "scan.nii", _nifti(_ramp(), zero_qform), (422,),
        "qform in use, all-zero quaternion, offsets and pixdim")
    def no_orientation(h):
        h["sform_code"] = 0
        h["qform_code"] = 0

    add("nifti_no_orientation", "scan.nii", _nifti(_ramp(), no_orientation), (422,),
        "sform and qform codes 0: no orientation, so left and right would be a guess (found by review)")
    add("nifti_sform_qform_flipped", "scan.nii",
        _nifti(_ramp(), lambda h: h.set_qform(np.diag([-1.2, 1.3, 2.0, 1.0]), code=1)), (422,),
        "sform RAS, qform LAS: nibabel follows the sform, ITK the qform (found by review)")
    add("nifti_sform_qform_spacing", "scan.nii",
        _nifti(_ramp(), lambda h: h.set_qform(np.diag([1.2, 1.3, 3.0, 1.0]), code=1)), (422,),
        "sform and qform both RAS, slice thickness 2.0 vs 3.0 mm: volumes in mL would depend on the reader")
    add("nifti_sform_qform_shift", "scan.nii",
        _nifti(_ramp(), lambda h: h.set_qform(np.array([[1.2, 0, 0, 0], [0, 1.3, 0, 0], [0, 0, 2.0, 40.0],
                                                        [0, 0, 0, 1]]), code=1)), (422,),
        "sform and qform 40 mm apart (a registration written to one field only): labels off the scan in ITK")
    add("nifti_inf_affine", "scan.nii", _nifti(_ramp(), inf_sform), (422,), "sform with an infinite entry")
    add("nifti_bad_quaternion", "scan.nii", _nifti(_ramp(), bad_quaternion), (422,),
        "qform in use with an impossible quaternion")

    # -- NIfTI: shapes and data types ----------------------------------------------------------
    add("nifti_4d", "scan.nii.gz", _nifti(np.zeros((8, 8, 8, 3), np.float32), gz=True), (422,),
        "true 4D: three time points")
    add("nifti_2d", "scan.nii.gz", _nifti(np.zeros((16, 16), np.float32), gz=True), (422,), "a 2D image")
    add("nifti_single_slice", "scan.nii.gz", _nifti(np.zeros((16, 16, 1), np.float32), gz=True), (422,),
        "a single slice (16,16,1)")
    add("nifti_zero_size_dim", "scan.nii", _nifti(_ramp(), dims(12, 0, 8)), (422,), "dim[2] = 0")
    add("nifti_negative_dim", "scan.nii", _nifti(_ramp(), dims(12, -10, 8)), (422,), "dim[2] = -10")
    add("nifti_complex64", "scan.nii", _nifti(_ramp().astype(np.complex64) * (1 + 1j)), (422,),
        "complex64 voxels (casting would drop the imaginary part)")
    rgb = np.zeros((12, 10, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    add("nifti_rgb24", "scan.nii", _nifti(rgb), (422,), "RGB24 voxels")

    def datatype(h: nib.Nifti1Header) -> None:
        h["datatype"] = 1234

    add("nifti_unknown_datatype", "scan.nii", _nifti(_ramp(), datatype), (422,), "datatype code 1234")

    # -- MetaImage / NRRD ---------------------------------------------------------------------
    add("mha_bad_header", "scan.mha", _mha_header(DimSize=None) + bytes(64), (422,), "MetaImage without DimSize")
    add("mha_detached_data", "scan.mha", _mha_header(ElementDataFile="/etc/passwd"), (415,),
        "MetaImage whose voxels are a server file")
    padding = "".join(f"Comment{i} = {'x' * 100}\n" for i in range(800))  # ~85 KB of header before the bad line
    add("mha_detached_padded", "scan.mha",
        _mha_header().replace(b"ElementDataFile", padding.encode() + b"ElementDataFile").replace(
            b"= LOCAL", b"= /etc/passwd"), (422,),
        "detached data file hidden behind 85 KB of header lines (refused at the first key MetaIO does not define)")
    # issue #33: a check matching keys case-insensitively stopped at the decoy; MetaIO (case-sensitive, later
    # line wins) read /etc/passwd as the voxels, and the job succeeded with the file in its preview
    add("mha_case_confused_data_file", "scan.mha",
        _mha_header().replace(b"ElementDataFile = LOCAL", b"elementdatafile = LOCAL\nElementDataFile = /etc/passwd"),
        (422,), "a lower-case 'elementdatafile = LOCAL' decoy before 'ElementDataFile = /etc/passwd' (issue #33)")
    add("mha_header_size", "scan.mha", _mha_header(HeaderSize="-1") + bytes(64), (415,),
        "HeaderSize = -1: MetaIO reads the voxels from the end of the file (any offset of any file it opens)")
    add("mha_data_file_list", "scan.mha", _mha_header(ElementDataFile="LIST") + b"/etc/passwd\n", (415,),
        "ElementDataFile = LIST, then a server path per slice")
    add("mha_data_file_pattern", "scan.mha", _mha_header(ElementDataFile="/proc/self/fd/%d 0 3 1"), (415,),
        "ElementDataFile with a %d pattern over /proc/self/fd")
    stream = zlib.compress(bytes(range(256)) * 250)
    for name, cut, what in (("mha_compressed_truncated", stream[: len(stream) // 3], "cut to a third"),
                            ("mha_compressed_garbage", stream[:2] + random_bytes[: len(stream) - 2], "garbage")):
        add(name, "scan.mha", _mha_header(DimSize="40 40 40", CompressedData="True",
                                          CompressedDataSize=str(len(cut))) + cut, (422,),
            f"compressed voxel data {what}: MetaIO printed 'Uncompress failed' and returned its buffer as it was, "
            f"so heap memory became voxels (issue #33)")
    add("mha_compressed_no_size", "scan.mha", _mha_header(CompressedData="True") + zlib.compress(bytes(64)),
        (422,), "compressed without CompressedDataSize: ITK takes the header for the stream and returns garbage")
    add("mha_ndims_99", "scan.mha", _mha_header(NDims="99") + bytes(64), (422,),
        "NDims = 99 (ITK's MetaIO corrupts its heap)")
    add("mha_ndims_negative", "scan.mha", _mha_header(NDims="-1") + bytes(64), (422,),
        "NDims = -1 (ITK's MetaIO segfaults)")
    add("mha_ndims_behind_nul", "scan.mha",
        _mha_header().replace(b"ElementSpacing", b"NDims\0x = -1\nElementSpacing") + bytes(64), (422,),
        "NDims = -1 behind a NUL in the key (MetaIO reads C strings; found by the fuzzer: hangs or segfaults)")
    mha = _sitk_bytes(_sitk_image(_ramp((20, 20, 20))), ".mha")
    # the fuzzer's find, byte for byte: a first header without DimSize/ElementType, then another header with
    # NDims = -1 behind a NUL where the voxels start; MetaIO read on into it and the process died (SIGSEGV)
    add("mha_second_header_in_data", "scan.mha", base64.b64decode(
        "T2JqZWN0VHlwZSA9IEltYWdlCk5EaW1zID0gMwpCaW5hcnlEYXRhID0gVHJ1ZQpCaW5hcnlEYXRhQnlfVUNIQVIKRWxlbWVudERh"
        "dGFGaWxlID0gTE9DQUwKAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABPYmplY3RUeXBlID0g"
        "SW1hZ2UKTkRpbXMgPSAzCkJpbmFyeURhdGEgPSBUcnVlCkJpbmFyAAAAAHlEYXRhQnl0ZU9yZGVyTVNCID0gRmFsc2UKTkRpbXMA"
        "eCA9IC0xCkVsZW1lbnRTcGFjaW5nID0gMSAxIDEKRGltU2l6ZSA9IDQgNCA0CkVsZW1lbnRUeXBlID0gTUVUX1VDSEFSCkVsZW1l"
        "bnREYXRhRmlsZSA9IExPQ0FMCgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        "AAAAAAAAAAAAAAAAAAAAAAAAAgAAAAAAAg=="), (422,),
        "header without DimSize/ElementType, a hostile one in the voxel bytes (found by the fuzzer: SIGSEGV)")
    add("mha_truncated", "scan.mha", mha[: len(mha) - 5000], (422,), "MetaImage missing its last 5000 bytes")
    add("mha_huge_dims", "scan.mha", _mha_header(DimSize="2000 2000 2000") + bytes(64), (413,),
        "MetaImage header promising 2000^3 voxels")
    rgb_img = sitk.Image([6, 6, 6], sitk.sitkVectorUInt8, 3)
    add("mha_vector_rgb", "scan.mha", _sitk_bytes(rgb_img, ".mha"), (422,), "three components per voxel")
    add("mhd_upload", "scan.mhd", _mha_header(ElementDataFile="scan.raw"), (415,),
        "a detached-header .mhd (its data cannot come with it)")
    add("nhdr_upload", "scan.nhdr", b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
        b"data file: scan.raw\n\n", (415,), "a detached-header .nhdr (its data cannot come with it)")
    add("nrrd_garbage", "scan.nrrd", b"NRRD0004\n" + random_bytes, (422,), "NRRD magic then random bytes")
    add("nrrd_random", "scan.nrrd", random_bytes, (422,), "random bytes named .nrrd")
    add("nrrd_detached_padded", "scan.nrrd",
        b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
        + b"".join(b"# " + b"x" * 100 + b"\n" for _ in range(800)) + b"data file: /etc/passwd\n\n", (415,),
        "NRRD detached data file hidden behind 80 KB of comments")
    add("nrrd_detached_cr", "scan.nrrd",
        b"NRRD0004\rtype: uint8\rdimension: 3\rsizes: 4 4 4\rencoding: raw\rdata file: /etc/passwd\r\r", (415,),
        "NRRD detached data file in a header whose lines end in a lone CR (teem splits there; a check "
        "splitting at LF only saw one line, and the server read /etc/passwd as voxels)")
    add("nrrd_case_confused_data_file", "scan.nrrd",
        b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\nData File: /etc/passwd\n\n", (415,),
        "'Data File' in another case (teem matches field names case-insensitively)")
    add("nrrd_byte_skip_from_end", "scan.nrrd",
        b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\nbyte skip: -1\n\n" + bytes(64), (415,),
        "byte skip -1: teem reads the voxels from the end of the file")
    nrrd_gz = gzip.compress(bytes(range(256)) * 250, mtime=0)
    add("nrrd_gzip_truncated", "scan.nrrd",
        b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 40 40 40\nencoding: gzip\n\n" + nrrd_gz[: len(nrrd_gz) // 3],
        (422,), "gzip voxel data cut to a third")
    add("nrrd_huge_dims", "scan.nrrd",
        b"NRRD0004\ntype: float\ndimension: 3\nsizes: 2000 2000 2000\nendian: little\nencoding: raw\n\n"
        + bytes(64), (413,),
        "NRRD header promising 2000^3 voxels")

    # -- DICOM and zips ---------------------------------------------------------------------------
    slices = _dicom_slices(3)
    tilt = np.tan(np.radians(15))
    for name, series, what in (
            ("dicom_zip_gap", _dicom_slices(5, [(0, 0, z) for z in (0, 2, 4, 8, 10)]),
             "slices 2 mm apart with one missing: ITK stacks them at 2 mm and says so only on stderr"),
            ("dicom_zip_tilt", _dicom_slices(5, [(0, 2 * k * tilt, 2 * k) for k in range(5)]),
             "a 15 degree gantry tilt: ITK drops the shear"),
            ("dicom_zip_two_orientations", _dicom_slices(5, [(0, 0, 2 * k) for k in range(5)],
                                                         ["1\\0\\0\\0\\1\\0"] * 3 + ["1\\0\\0\\0\\0\\1"] * 2),
             "axial and coronal slices under one series UID (a localizer)"),
            ("dicom_zip_two_echoes", _dicom_slices(6, [(0, 0, 2 * (k % 3)) for k in range(6)]),
             "two echoes at the same three positions under one series UID")):
        add(name, "series.zip", _zip(series), (422,), what + " (found by review)")
    add("zip_path_traversal", "series.zip", _zip([("../evil.dcm", slices[0][1])] + slices[1:]), (422,),
        "zip entry ../evil.dcm")
    add("zip_absolute_path", "series.zip", _zip([("/tmp/evil.dcm", slices[0][1])] + slices[1:]), (422,),
        "zip entry /tmp/evil.dcm")
    add("zip_not_a_zip", "series.zip", random_bytes, (422,), "random bytes named .zip")
    series = _zip(slices)
    add("zip_truncated", "series.zip", series[: len(series) // 2], (422,), "a DICOM zip cut in half")
    add("zip_empty", "series.zip", _zip([]), (415,), "a valid zip with no files")
    link = zipfile.ZipInfo("link.dcm", date_time=(2024, 1, 1, 0, 0, 0))
    link.external_attr = 0o120777 << 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    add("zip_symlink", "series.zip", buf.getvalue(), (422,), "zip entry that is a symbolic link to /etc/passwd")
    one = slices[0][1]
    deflated = zlib.compressobj(9, zlib.DEFLATED, -15)
    one_deflated = deflated.compress(one) + deflated.flush()
    one_entry = (b"slice000.dcm", one_deflated, zlib.crc32(one), len(one), 8)
    # found by tests/imaging/fuzz/fuzz_volume_decoder.py: zipfile raised NotImplementedError (a 500)
    add("zip_newer_version", "series.zip", _raw_zip([one_entry], version=0x73), (415,),
        "zip needing 'version 11.5' to extract")
    add("zip_encrypted", "series.zip", _raw_zip([one_entry], flags=0x1), (415,),
        "zip entry flagged as encrypted (zipfile raised RuntimeError)")
    add("zip_unsupported_method", "series.zip", _raw_zip([one_entry[:4] + (9,)]), (415,),
        "zip entry compressed with deflate64 (zipfile raised NotImplementedError)")
    add("zip_bad_utf8_name", "series.zip", _raw_zip([(b"\xff\xfe.dcm",) + one_entry[1:]], flags=0x800), (422,),
        "zip entry name flagged UTF-8 but not UTF-8 (zipfile raised UnicodeDecodeError)")
    add("zip_bad_utf8_local_name", "series.zip",
        _raw_zip([(b"s\xb0.dcm",) + one_entry[1:]], flags=0, local_flags=0x800), (422,),
        "only the local header flags the name as UTF-8, and it is not (found by the fuzz target: "
        "zipfile.open raised UnicodeDecodeError)")
    add("zip_empty_name", "series.zip", _raw_zip([(b"",) + one_entry[1:]]), (422,),
        "zip entry with an empty name (found by the fuzz target: zipfile raised IndexError)")
    add("zip_file_then_folder", "series.zip", _zip([("a", b"x"), ("a/b.dcm", one)]), (422,),
        "zip entry a/b.dcm under an entry a that is a file (mkdir raised FileExistsError)")
    add("zip_deep_nesting", "series.zip", _zip([("d/" * depth + "x.dcm", one) for depth in range(400, 2001, 400)]),
        (422,), "entries 2000 folders deep (found by review: Python's recursive rglob and rmtree failed with "
        "RecursionError, a 500, and left the tree in /tmp)")
    # found by the fuzz target: GDCM allocates a file-meta element's declared length up front
    # (1.8 GB for this 1.2 KB slice; 3.5 GB, and a 200 answer, for the zip)
    meta_bomb = bytearray(one)
    at = meta_bomb.index(b"\x02\x00\x01\x00OB") + 8
    meta_bomb[at: at + 4] = struct.pack("<L", 0x6A624F00)
    add("dicom_meta_length_bomb", "slice.dcm", bytes(meta_bomb), (422,),
        "DICOM file-meta element (0002,0001) claiming 1.7 GB in a 1.2 KB file")
    add("zip_dicom_meta_length_bomb", "series.zip", _zip([("s0.dcm", bytes(meta_bomb))] + slices[1:]), (422,),
        "DICOM zip whose first slice has the 1.7 GB file-meta element")
    unknown_vr = bytearray(one)
    at = unknown_vr.index(b"\x02\x00\x03\x00UI") + 4
    unknown_vr[at: at + 2] = b"EE"  # GDCM then takes "1.2." of the UID as a 4-byte length: 775 MB
    add("dicom_meta_unknown_vr", "slice.dcm", bytes(unknown_vr), (422,),
        "DICOM file-meta element with the unknown VR 'EE' (found by the fuzz target: GDCM allocated 0.9 GB)")
    # found by the fuzz target: past the file meta, GDCM allocates a data-set element's length too (3.2 GB)
    add("dicom_dataset_length_bomb", "slice.dcm",
        bytes(128) + b"DICM" + b"\x06\x00\x00\x00UL\x04\x00" + b"\xc3" * 160, (422,),
        "DICOM data-set element (c3c3,c3c3) whose length bytes claim 3.2 GB in a 300-byte file")
    pixels = bytearray(one)
    at = pixels.index(b"\xe0\x7f\x10\x00") + 4  # implicit VR: the 4-byte length follows the tag
    pixels[at: at + 4] = struct.pack("<L", 0x7F000000)
    add("dicom_pixel_data_overlong", "slice.dcm", bytes(pixels), (422,),
        "DICOM pixel data claiming 2.1 GB in a 1.2 KB file")
    add("dicom_garbage", "slice.dcm", random_bytes, (422,), "random bytes named .dcm")
    add("dicom_single_slice", "slice.dcm", slices[0][1], (422,), "one valid 2D DICOM slice")
    add("dicom_truncated", "slice.dcm", slices[0][1][:300], (422,), "a DICOM slice cut inside its header")

    # -- upload envelope ---------------------------------------------------------------------------
    add("empty_bytes", "scan.nii.gz", b"", (422,), "an empty upload")
    add("no_suffix", "scan", _nifti(_ramp(), gz=True), (415,), "a valid NIfTI uploaded without a suffix")
    add("unknown_suffix", "scan.png", b"\x89PNG\r\n\x1a\n" + random_bytes, (415,), "a .png")
    return out


def main() -> None:
    """Print what every input yields (status, message)."""
    from serve.errors import MrisegError
    from serve.imaging.volume_io import read_volume_bytes

    for h in corpus():
        try:
            read_volume_bytes(h.data, h.filename, max_voxels=MAX_VOXELS)
            result = "ACCEPTED"
        except MrisegError as e:
            result = f"{e.status} {e.message}"
        print(f"{h.name:26s} {len(h.data):>9d} B  {result}")


if __name__ == "__main__":
    main()
