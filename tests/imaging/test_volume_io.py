"""Reading inputs: every format, and a clear error for every bad input."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from serve.errors import CorruptFileError, InvalidVolumeError, UnsupportedFormatError, VolumeTooLargeError
from serve.imaging.archives import safe_extract_zip
from serve.imaging.itk import sitk_geometry_to_affine
from serve.imaging.volume_io import read_volume, read_volume_bytes
from tests.helpers.volumes import oriented_affine


def nifti(path: Path, data, affine=None, dtype=None) -> Path:
    affine = np.diag([1.2, 1.3, 2.0, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(np.asarray(data) if dtype is None else np.asarray(data, dtype=dtype), affine)
    nib.save(img, str(path))
    return path


def ramp(shape=(12, 10, 8)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def sitk_image(arr_ijk: np.ndarray, spacing=(0.9, 1.1, 2.5), origin=(10.0, -20.0, 5.0), direction=None):
    img = sitk.GetImageFromArray(np.transpose(arr_ijk, (2, 1, 0)).copy())
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


# -- good inputs ------------------------------------------------------------------------

def test_gzipped_and_plain_nifti_read_with_their_voxels_and_affine(tmp_path):
    aff = oriented_affine("LPS", (1.2, 1.3, 2.0), origin=(5, 6, 7), rotation_deg=10)
    for name in ("a.nii.gz", "a.nii"):
        vol = read_volume(nifti(tmp_path / name, ramp(), aff, np.int16))
        assert vol.data.dtype == np.float32 and vol.shape == (12, 10, 8)
        assert np.array_equal(vol.data, ramp().astype(np.int16))
        assert np.allclose(vol.affine, aff, atol=1e-5)
        assert vol.source_format == "nifti"


def test_nifti_scaling_is_applied(tmp_path):
    img = nib.Nifti1Image(ramp().astype(np.int16), np.eye(4))
    img.header.set_slope_inter(0.5, 10)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    vol = read_volume(tmp_path / "s.nii.gz")
    assert np.allclose(vol.data, ramp() * 0.5 + 10)


def test_4d_with_one_time_point_is_squeezed(tmp_path):
    vol = read_volume(nifti(tmp_path / "t.nii.gz", ramp()[..., None]))
    assert vol.shape == (12, 10, 8)


def test_mha_and_nrrd_affine_is_ras(tmp_path):
    """SimpleITK's LPS geometry becomes the same RAS affine nibabel reads from the equivalent NIfTI."""
    t = np.deg2rad(20)
    direction = (np.cos(t), -np.sin(t), 0, np.sin(t), np.cos(t), 0, 0, 0, -1)
    img = sitk_image(ramp(), direction=direction)
    for suffix in (".mha", ".nrrd", ".nii.gz"):
        sitk.WriteImage(img, str(tmp_path / f"v{suffix}"))
    ref = nib.load(str(tmp_path / "v.nii.gz"))  # SimpleITK's NIfTI writer does LPS -> RAS itself
    for suffix in (".mha", ".nrrd"):
        vol = read_volume(tmp_path / f"v{suffix}")
        assert vol.source_format == "sitk"
        assert np.array_equal(vol.data, ramp())
        assert np.allclose(vol.affine, ref.affine, atol=1e-4), suffix
        assert nib.aff2axcodes(vol.affine) == nib.aff2axcodes(ref.affine)


def test_sitk_geometry_conversion_identity_is_lps():
    aff = sitk_geometry_to_affine((1, 2, 3), (10, 20, 30), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert nib.aff2axcodes(aff) == ("L", "P", "S")
    assert np.allclose(aff[:3, 3], [-10, -20, 30])


def write_dicom_series(folder: Path, arr_ijk: np.ndarray, spacing=(0.8, 0.9, 2.0), origin=(-50.0, -40.0, 10.0),
                       direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), compressor: str | None = None,
                       series_uid: str = "1.2.826.0.1.3680043.2.1125.1.1") -> sitk.Image:
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk_image(arr_ijk.astype(np.int16), spacing, origin, direction)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    if compressor:  # explicit VR with encapsulated pixel data: items of undefined and defined length
        writer.SetUseCompression(True)
        writer.SetCompressor(compressor)
    study_uid = "1.2.826.0.1.3680043.2.1125.1.2"
    d = direction
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": "MR", "0020|000d": study_uid, "0020|000e": series_uid,
            "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0020|0032": "\\".join(f"{v:.4f}" for v in pos), "0020|0013": str(k + 1),
            "0018|0050": f"{spacing[2]:.4f}", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    return img


def test_a_dicom_series_reads_the_same_from_a_folder_a_zip_and_zip_bytes(tmp_path):
    arr = (ramp((16, 12, 6)) % 500).astype(np.int16)
    img = write_dicom_series(tmp_path / "series", arr)
    expected = sitk_geometry_to_affine(img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    vol = read_volume(tmp_path / "series")
    assert vol.source_format == "dicom" and vol.shape == (16, 12, 6)
    assert np.array_equal(vol.data, arr)
    assert np.allclose(vol.affine, expected, atol=1e-3)
    zpath = tmp_path / "series.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted((tmp_path / "series").iterdir()):
            zf.write(f, f"study/{f.name}")
    zvol = read_volume(zpath)
    assert np.array_equal(zvol.data, arr) and np.allclose(zvol.affine, vol.affine)
    zbytes = read_volume_bytes(zpath.read_bytes(), "upload.zip")
    assert np.array_equal(zbytes.data, arr)


def test_two_dicom_series_of_equal_size_are_refused_and_the_larger_one_is_taken(tmp_path):
    """A zip of one study's T1 and T2: segmenting whichever GDCM lists first would be a silent guess."""
    arr = (ramp((16, 12, 6)) % 500).astype(np.int16)
    write_dicom_series(tmp_path / "study" / "t1", arr)
    write_dicom_series(tmp_path / "study" / "t2", arr[..., ::-1] + 7, series_uid="1.2.826.0.1.3680043.2.1125.1.9")
    zpath = tmp_path / "study.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted((tmp_path / "study").rglob("*.dcm")):
            zf.write(f, f.relative_to(tmp_path).as_posix())
    for source in (tmp_path / "study", zpath):
        with pytest.raises(InvalidVolumeError, match="2 DICOM series of 6 file"):
            read_volume(source)
    (tmp_path / "study" / "t2" / "slice005.dcm").unlink()  # now t1 is the larger: taken, as before
    assert np.array_equal(read_volume(tmp_path / "study").data, arr)


@pytest.mark.parametrize("compressor", ["JPEG2000", "JPEG"])
def test_compressed_dicom_passes_the_length_walk(tmp_path, compressor):
    arr = (ramp((16, 12, 4)) % 200).astype(np.int16)
    write_dicom_series(tmp_path / "series", arr, compressor=compressor)
    first = (tmp_path / "series" / "slice000.dcm").read_bytes()
    assert b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" in first  # really encapsulated
    vol = read_volume(tmp_path / "series")
    assert vol.shape == (16, 12, 4)
    if compressor == "JPEG2000":  # lossless here; baseline JPEG is lossy
        assert np.array_equal(vol.data, arr)


def test_dicom_element_longer_than_the_file_is_refused(tmp_path):
    write_dicom_series(tmp_path / "series", (ramp((16, 12, 3)) % 200).astype(np.int16), compressor="JPEG2000")
    path = tmp_path / "series" / "slice001.dcm"
    data = bytearray(path.read_bytes())
    at = data.index(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12
    fragment = data.index(b"\xfe\xff\x00\xe0", at + 8)  # the first fragment, after the offset table
    data[fragment + 4: fragment + 8] = (3 * 2**30).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"\(fffe,e000\) claims 3221225472 bytes"):
        read_volume(tmp_path / "series")

def test_upload_bytes_use_only_the_suffix(tmp_path):
    p = nifti(tmp_path / "x.nii.gz", ramp())
    vol = read_volume_bytes(p.read_bytes(), "Doe^John 1970.nii.gz")
    assert vol.shape == (12, 10, 8)


# -- bad inputs ------------------------------------------------------------------------------

def test_true_4d_is_refused(tmp_path):
    with pytest.raises(InvalidVolumeError, match="only 3D volumes"):
        read_volume(nifti(tmp_path / "t.nii.gz", np.zeros((8, 8, 8, 3), np.float32)))


@pytest.mark.parametrize("shape", [(10, 10, 1), (10, 1, 10), (10, 10), (10, 10, 1, 1)])
def test_single_slice_is_refused(tmp_path, shape):
    with pytest.raises(InvalidVolumeError, match="single slice"):
        read_volume(nifti(tmp_path / "s.nii.gz", np.zeros(shape, np.float32)))


def test_single_slice_mha_is_refused(tmp_path):
    sitk.WriteImage(sitk_image(np.zeros((9, 9, 1), np.float32)), str(tmp_path / "s.mha"))
    with pytest.raises(InvalidVolumeError, match="single slice"):
        read_volume(tmp_path / "s.mha")


def test_zero_size_dimension_is_refused(tmp_path):
    p = nifti(tmp_path / "z.nii", np.zeros((4, 4, 4), np.float32))
    raw = bytearray(p.read_bytes())
    raw[42:44] = (0).to_bytes(2, "little")  # dim[1] = 0 in the NIfTI-1 header
    p.write_bytes(bytes(raw))
    with pytest.raises(InvalidVolumeError, match="zero-size dimension"):
        read_volume(p)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(tmp_path, value):
    data = ramp()
    data[3, 4, 5] = value
    with pytest.raises(InvalidVolumeError, match="non-finite"):
        read_volume(nifti(tmp_path / "n.nii.gz", data))


def test_non_invertible_affine_is_refused(tmp_path):
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 2] = aff[:3, 0]  # third axis parallel to the first
    with pytest.raises(InvalidVolumeError, match="not invertible"):
        read_volume(nifti(tmp_path / "a.nii.gz", ramp(), aff))


def test_truncated_gzip_is_corrupt(tmp_path):
    p = nifti(tmp_path / "t.nii.gz", np.random.default_rng(0).normal(size=(30, 30, 30)).astype(np.float32))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError, match="truncated or corrupt"):
        read_volume(p)


def test_truncated_plain_nifti_is_corrupt(tmp_path):
    p = nifti(tmp_path / "t.nii", ramp((20, 20, 20)))
    p.write_bytes(p.read_bytes()[:2000])
    with pytest.raises(CorruptFileError):
        read_volume(p)


@pytest.mark.parametrize("name,payload", [
    ("junk.nii.gz", gzip.compress(b"this is not a nifti header" * 20)),
    ("junk.nii", b"\x00" * 400),
    ("junk.nii.gz", b"not even gzip" * 40),
    ("junk.mha", b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"),
    ("junk.nrrd", b"NOT A NRRD FILE" * 20),
])
def test_wrong_magic_or_corrupt_is_refused(tmp_path, name, payload):
    p = tmp_path / name
    p.write_bytes(payload)
    with pytest.raises((CorruptFileError, UnsupportedFormatError)) as ei:
        read_volume(p)
    assert "corrupt" in str(ei.value).lower() or "not" in str(ei.value).lower()


def test_voxel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    # the header promises 2000^3 voxels but the file holds almost nothing: a bomb must not be decoded
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2000, 2000, 2000))
    hdr.set_data_dtype(np.float32)
    buf = io.BytesIO()
    hdr.write_to(buf)
    buf.write(b"\x00" * 4 + b"\x00" * 1024)
    p = tmp_path / "bomb.nii.gz"
    p.write_bytes(gzip.compress(buf.getvalue()))
    with pytest.raises(VolumeTooLargeError, match="more than the limit"):
        read_volume(p)


def test_voxel_limit_is_configurable(tmp_path):
    p = nifti(tmp_path / "v.nii.gz", ramp())
    with pytest.raises(VolumeTooLargeError):
        read_volume(p, max_voxels=100)
    sitk.WriteImage(sitk_image(ramp()), str(tmp_path / "v.mha"))
    with pytest.raises(VolumeTooLargeError):
        read_volume(tmp_path / "v.mha", max_voxels=100)


def test_unsupported_missing_and_empty_inputs_are_refused_clearly(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(UnsupportedFormatError, match="unsupported file type"):
        read_volume(tmp_path / "x.png")
    with pytest.raises(UnsupportedFormatError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(UnsupportedFormatError, match="unsupported upload type"):
        read_volume_bytes(b"abc", "scan.exe")
    with pytest.raises(CorruptFileError, match="empty"):
        read_volume_bytes(b"", "scan.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedFormatError, match="no DICOM series"):
        read_volume(tmp_path / "empty")


def test_vector_images_are_refused(tmp_path):
    rgb = sitk.Image([6, 6, 6], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    with pytest.raises(InvalidVolumeError, match="components per voxel"):
        read_volume(tmp_path / "rgb.mha")


def test_truncated_mha_is_corrupt(tmp_path):
    sitk.WriteImage(sitk_image(ramp((20, 20, 20))), str(tmp_path / "t.mha"), False)
    raw = (tmp_path / "t.mha").read_bytes()
    (tmp_path / "t.mha").write_bytes(raw[: len(raw) - 5000])
    with pytest.raises(CorruptFileError):
        read_volume(tmp_path / "t.mha")


# -- zip safety --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../evil.dcm", "/abs/evil.dcm", "a/../../evil.dcm", "C:/evil.dcm"])
def test_zip_path_traversal_is_refused(tmp_path, name):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(name, b"x")
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(CorruptFileError, match="unsafe path"):
        safe_extract_zip(z, dest)
    assert not (tmp_path / "evil.dcm").exists()


def test_zip_symlink_is_refused(tmp_path):
    z = tmp_path / "link.zip"
    info = zipfile.ZipInfo("link.dcm")
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    (tmp_path / "out").mkdir()
    with pytest.raises(CorruptFileError, match="symbolic link"):
        safe_extract_zip(z, tmp_path / "out")


def test_zip_bomb_is_refused(tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\x00" * 5_000_000)
    assert z.stat().st_size < 100_000
    (tmp_path / "out").mkdir()
    with pytest.raises(VolumeTooLargeError, match="expands to"):
        safe_extract_zip(z, tmp_path / "out", max_bytes=1_000_000)


def test_corrupt_zip_is_refused(tmp_path):
    z = tmp_path / "c.zip"
    z.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(CorruptFileError, match="zip"):
        read_volume(z)


@pytest.mark.parametrize("name,header", [
    ("x.mha", b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n"
              b"ElementDataFile = /etc/passwd\n"),
    ("x.nrrd", b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: /etc/passwd\n\n"),
])
def test_uploads_cannot_point_at_server_files(name, header):
    with pytest.raises(UnsupportedFormatError, match="separate data file"):
        read_volume_bytes(header, name)


def test_colon_syntax_mha_is_read_when_self_contained_refused_when_not(tmp_path):
    """MetaIO also reads ``key: value``; a self-contained file in that spelling is accepted, a detached one is not."""
    sitk.WriteImage(sitk_image(ramp()), str(tmp_path / "v.mha"))
    data = (tmp_path / "v.mha").read_bytes()
    assert b"ElementDataFile = LOCAL" in data  # else the replacements below would test nothing
    vol = read_volume_bytes(data.replace(b"ElementDataFile = LOCAL", b"ElementDataFile: LOCAL"), "upload.mha")
    assert np.array_equal(vol.data, ramp())
    with pytest.raises(UnsupportedFormatError, match="separate data file"):
        read_volume_bytes(data.replace(b"ElementDataFile = LOCAL", b"ElementDataFile: /etc/hostname"), "upload.mha")


def test_self_contained_mha_and_nrrd_uploads_read_exactly(tmp_path):
    for suffix in (".mha", ".nrrd"):
        sitk.WriteImage(sitk_image(ramp()), str(tmp_path / f"v{suffix}"))
        vol = read_volume_bytes((tmp_path / f"v{suffix}").read_bytes(), f"upload{suffix}")
        assert np.array_equal(vol.data, ramp())


def test_a_4d_image_with_one_timepoint_reads_as_3d_and_more_are_refused(tmp_path):
    one = sitk.JoinSeries([sitk_image(ramp())])  # x, y, z, t=1
    sitk.WriteImage(one, str(tmp_path / "one.nrrd"))
    vol = read_volume(tmp_path / "one.nrrd")
    assert vol.shape == (12, 10, 8) and np.array_equal(vol.data, ramp())
    three = sitk.JoinSeries([sitk_image(ramp())] * 3)
    sitk.WriteImage(three, str(tmp_path / "three.nrrd"))
    with pytest.raises(InvalidVolumeError, match="only 3D volumes"):
        read_volume(tmp_path / "three.nrrd")


NRRD_AT_PASSWD = b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: /etc/passwd\n\n"


@pytest.mark.parametrize("eol", [b"\r", b"\r\n"])
def test_nrrd_header_lines_split_as_teem_splits_them(eol):
    """teem ends a NRRD line at LF, CRLF or a lone CR; SimpleITK reads such a header's data file, so must we see it."""
    header = NRRD_AT_PASSWD.replace(b"\n", eol)
    with pytest.raises(UnsupportedFormatError, match="separate data file"):
        read_volume_bytes(header, "x.nrrd")


def test_crlf_across_a_read_boundary_is_not_a_blank_line():
    """A CR ending one 64 KiB read and its LF starting the next must not end the NRRD header early."""
    head = b"NRRD0004\r\ntype: uint8\r\n"
    comment = b"# " + b"x" * ((1 << 16) - len(head) - 3) + b"\r\n"
    data = head + comment + b"dimension: 3\r\nsizes: 4 4 4\r\nencoding: raw\r\ndata file: /etc/passwd\r\n\r\n"
    assert data[(1 << 16) - 1:(1 << 16) + 1] == b"\r\n"  # the boundary falls between CR and LF
    with pytest.raises(UnsupportedFormatError, match="separate data file"):
        read_volume_bytes(data, "x.nrrd")


def test_header_line_over_the_limit_is_corrupt():
    from serve.imaging.formats import nrrd

    data = b"NRRD0004\n# " + b"x" * (nrrd.MAX_LINE + 10) + b"\ndata file: /etc/passwd\n\n"
    with pytest.raises(CorruptFileError, match="header line"):
        read_volume_bytes(data, "x.nrrd")


def test_self_contained_applies_to_files_on_disk(tmp_path):
    """Local files may keep voxels apart (a .nhdr and its .raw); files from elsewhere (S3 jobs) may not."""
    np.arange(64, dtype=np.uint8).tofile(tmp_path / "v.raw")
    (tmp_path / "v.nhdr").write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
                                      b"data file: v.raw\n\n")
    assert read_volume(tmp_path / "v.nhdr").shape == (4, 4, 4)
    with pytest.raises(UnsupportedFormatError, match="separate file"):
        read_volume(tmp_path / "v.nhdr", self_contained=True)
    (tmp_path / "in.nrrd").write_bytes(NRRD_AT_PASSWD.replace(b"\n", b"\r"))
    with pytest.raises(UnsupportedFormatError, match="separate data file"):
        read_volume(tmp_path / "in.nrrd", self_contained=True)


def test_job_engine_reads_its_input_as_self_contained(tmp_path):
    from serve.jobs.engine import SegmenterEngine
    from serve.jobs.spec import JobSpec

    (tmp_path / "input.nrrd").write_bytes(NRRD_AT_PASSWD.replace(b"\n", b"\r"))
    engine = SegmenterEngine(segmenter=None)  # never reached: the input is refused first
    with pytest.raises(UnsupportedFormatError, match="separate data file"):
        engine.segment_file(tmp_path / "input.nrrd", JobSpec("s3://b/in.nrrd", "s3://b/out"), tmp_path / "out")


def _tags(positions, orientation="1\\0\\0\\0\\1\\0"):
    return [("\\".join(f"{v:.5f}" for v in p), orientation) for p in positions]


def test_regular_stacks_pass_the_slice_geometry_check():
    from serve.imaging.dicom import check_slice_geometry

    c, s = np.cos(np.radians(25)), np.sin(np.radians(25))
    normal = np.cross([1, 0, 0], [0, c, s])
    check_slice_geometry(_tags([(10, 20, 30 + 3 * k + 1e-4 * (k % 2)) for k in range(8)]))  # scanner jitter
    check_slice_geometry(_tags([(10, 20, 30 - 3 * k) for k in range(8)]))  # descending, any file order
    check_slice_geometry(_tags([np.array([10, 20, 30]) + 3 * k * normal for k in (3, 0, 5, 1, 4, 2)],
                               f"1\\0\\0\\0\\{c}\\{s}"))  # oblique and orthogonal
    check_slice_geometry([None, None])  # no positions to check: left to ITK


@pytest.mark.parametrize("positions,orientations,says", [
    ([(0, 0, z) for z in (0, 3, 6, 12)], None, "unevenly spaced"),
    ([(0, 0.8 * k, 3 * k) for k in range(4)], None, "not stacked perpendicular"),
    ([(0, 0, 3 * (k % 2)) for k in range(4)], None, "same position"),
    ([(0, 0, 3 * k) for k in range(4)], ["1\\0\\0\\0\\1\\0"] * 2 + ["1\\0\\0\\0\\0\\1"] * 2, "mixes slice orientations"),
])
def test_irregular_stacks_are_refused(positions, orientations, says):
    from serve.imaging.dicom import check_slice_geometry

    tags = _tags(positions) if orientations is None else [(t[0], o) for t, o in zip(_tags(positions), orientations)]
    with pytest.raises(InvalidVolumeError, match=says):
        check_slice_geometry(tags)


def test_a_dicom_series_split_over_folders_is_read_whole_in_slice_order(tmp_path):
    """CD and PACS exports split long series over folders; a part of one must not pass for the whole."""
    arr = (ramp((16, 12, 6)) % 500).astype(np.int16)
    write_dicom_series(tmp_path / "export", arr)
    (tmp_path / "export" / "A").mkdir()
    (tmp_path / "export" / "B").mkdir()
    for k in range(6):  # slices 0, 2, 4 and 5 in A; 1 and 3 in B
        f = tmp_path / "export" / f"slice{k:03d}.dcm"
        f.rename(tmp_path / "export" / ("B" if k in (1, 3) else "A") / f.name)
    vol = read_volume(tmp_path / "export")
    assert vol.shape == (16, 12, 6) and np.array_equal(vol.data, arr)


def test_a_forged_header_whose_voxel_count_overflows_int64_is_refused_as_too_large():
    from serve.imaging.volume import check_shape

    with pytest.raises(VolumeTooLargeError):
        check_shape((2**21, 2**21, 2**22), 10**9)


@pytest.mark.parametrize("unit", ["meter", "micron"])
def test_a_nifti_in_metres_or_microns_is_refused_not_read_as_millimetres(tmp_path, unit):
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.diag([0.001, 0.001, 0.002, 1]))
    img.header.set_xyzt_units(unit)
    nib.save(img, str(tmp_path / "m.nii.gz"))
    with pytest.raises(InvalidVolumeError, match=f"in {unit}s, not millimetres"):
        read_volume(tmp_path / "m.nii.gz")
    img.header["xyzt_units"] = 7  # no unit the standard defines (what the fuzzer found)
    nib.save(img, str(tmp_path / "odd.nii.gz"))
    with pytest.raises(InvalidVolumeError, match="unit code"):
        read_volume(tmp_path / "odd.nii.gz")
    img.header.set_xyzt_units("mm")
    nib.save(img, str(tmp_path / "mm.nii.gz"))
    assert read_volume(tmp_path / "mm.nii.gz").shape == (8, 8, 8)


# -- integer-valued inputs (only these get TotalSegmentator's int32 cast after resampling) ---------------

def _nifti_with_raw_scaling(path: Path, data: np.ndarray, slope: float | None, inter: float | None) -> Path:
    """A .nii whose scl_slope/scl_inter bytes are written as given (nibabel would normalise some away)."""
    import struct

    nib.save(nib.Nifti1Image(data, np.diag([1.2, 1.3, 2.0, 1.0])), str(path))
    if slope is not None:
        raw = bytearray(path.read_bytes())
        struct.pack_into("<ff", raw, 112, slope, inter)
        path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("dtype,slope,inter,integer", [
    (np.int16, None, None, True),        # no scaling written
    (np.int16, 1.0, 0.0, True),
    (np.int16, 0.0, 5.0, True),          # slope 0: unscaled, the intercept ignored (the standard, nibabel)
    (np.int16, float("nan"), 7.0, True),
    (np.int16, 1.0, -1024.0, True),      # an integral shift keeps integers integers (as DICOM's rule)
    (np.uint8, None, None, True),
    (np.uint16, 1.0, 0.0, True),
    (np.int16, 0.5, 0.0, False),         # scaled MRI: the cast would destroy it
    (np.int16, 2.0, 0.0, False),
    (np.int16, 1.0, 0.5, False),
    (np.float32, None, None, False),     # float on disk, whatever its values
    (np.float64, 1.0, 0.0, False),
])
def test_integer_valued_nifti_is_an_integer_type_with_identity_scaling(tmp_path, dtype, slope, inter, integer):
    data = (np.arange(60).reshape(5, 4, 3) % 50).astype(dtype)
    vol = read_volume(_nifti_with_raw_scaling(tmp_path / "s.nii", data, slope, inter))
    assert vol.integer_valued is integer


@pytest.mark.parametrize("dtype,integer", [(np.int16, True), (np.uint8, True), (np.float32, False)])
def test_integer_valued_mha_and_nrrd_follow_the_pixel_type(tmp_path, dtype, integer):
    img = sitk_image((ramp() % 100).astype(dtype))
    for suffix in (".mha", ".nrrd"):
        sitk.WriteImage(img, str(tmp_path / f"v{suffix}"))
        assert read_volume(tmp_path / f"v{suffix}").integer_valued is integer, suffix


def _rescale(folder: Path, slope: str, intercept: str, only: int | None = None) -> None:
    """Set RescaleSlope/RescaleIntercept of the series' files (or of file ``only``) with pydicom."""
    import pydicom

    for k, f in enumerate(sorted(folder.glob("*.dcm"))):
        if only is not None and k != only:
            continue
        ds = pydicom.dcmread(f)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.save_as(f)


def _multiframe(series: Path, arr: np.ndarray, dest: Path) -> Path:
    """The series' first file made a multi-frame file holding all of ``arr`` (its rescale tags kept)."""
    import pydicom

    ds = pydicom.dcmread(sorted(series.glob("*.dcm"))[0])
    ds.NumberOfFrames, ds.SpacingBetweenSlices = arr.shape[2], "2.0"
    ds.PixelData = np.ascontiguousarray(np.transpose(arr, (2, 1, 0))).astype("<i2").tobytes()
    ds.save_as(dest)
    return dest


@pytest.mark.parametrize("slope,intercept,integer", [
    ("1", "0", True), ("1", "-1024", True), ("1.0", "3.000", True),
    ("0.5", "0", False), ("1", "2.5", False), ("2", "0", False),
])
def test_integer_valued_dicom_needs_rescale_slope_1_and_an_integral_intercept(tmp_path, slope, intercept, integer):
    arr = (ramp((16, 12, 6)) % 500).astype(np.int16)
    write_dicom_series(tmp_path / "series", arr)
    _rescale(tmp_path / "series", slope, intercept)
    vol = read_volume(tmp_path / "series")
    assert np.allclose(vol.data, arr * float(slope) + float(intercept))
    assert vol.integer_valued is integer
    single = read_volume(_multiframe(tmp_path / "series", arr, tmp_path / "volume.dcm"))  # the one-file reader
    assert single.shape == arr.shape and np.allclose(single.data, arr * float(slope) + float(intercept))
    assert single.integer_valued is integer


def test_one_scaled_dicom_slice_makes_the_series_float(tmp_path):
    """Scanners may scale slice by slice: one scaled file is enough to keep the series' floats."""
    arr = (ramp((16, 12, 6)) % 500).astype(np.int16)
    write_dicom_series(tmp_path / "series", arr)
    _rescale(tmp_path / "series", "1", "0")
    assert read_volume(tmp_path / "series").integer_valued is True
    _rescale(tmp_path / "series", "0.5", "0", only=3)
    assert read_volume(tmp_path / "series").integer_valued is False


def test_integer_valued_rule_reads_garbled_rescale_tags_as_float():
    import SimpleITK as sitk_

    from serve.imaging.itk import dicom_integer_valued

    assert dicom_integer_valued(sitk_.sitkInt16, [(None, None), ("1 ", " -7")])
    assert not dicom_integer_valued(sitk_.sitkInt16, [("1\\2", "0")])
    assert not dicom_integer_valued(sitk_.sitkFloat32, [("1", "0")])


def test_every_supported_suffix_has_its_reader_in_the_registry():
    """One reader per file type, found by suffix (as nnU-Net v2's imageio registry)."""
    from serve.imaging.volume import SUPPORTED
    from serve.imaging.volume_io import READERS

    assert tuple(READERS) == SUPPORTED
    assert READERS[".nii.gz"] is READERS[".nii"] and READERS[".mha"] is READERS[".nrrd"]
