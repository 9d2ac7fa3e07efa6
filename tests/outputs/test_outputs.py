"""Output files: TotalSegmentator-compatible multilabel NIfTI, per-structure masks, statistics, preview."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from serve.outputs.labeltable import EXTENSION_CODE, label_table_xml, parse_label_table, read_label_table
from serve.outputs.statistics import touches_border
from serve.outputs.writers import write_outputs
from serve.inference.pipeline import SegmentationResult
from serve.records_schema import OutputMeta, OutputRecord
from serve.imaging.nifti import write_nifti
from serve.imaging.volume_io import read_volume
from tests.helpers.volumes import oriented_affine

SHAPE = (20, 16, 12)


@pytest.fixture()
def case(tmp_path):
    """An input volume (NIfTI, oblique LPS, anisotropic) and a hand-made result with an overlap."""
    aff = oriented_affine("LPS", (1.2, 0.9, 2.5), origin=(30, -10, 4), rotation_deg=8)
    rng = np.random.default_rng(1)
    data = rng.normal(100, 10, size=SHAPE).astype(np.float32)
    img = nib.Nifti1Image(data, aff)
    img.header["descrip"] = b"input header"
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(tmp_path / "in.nii.gz"))
    vol = read_volume(tmp_path / "in.nii.gz")
    tissue = np.zeros(SHAPE, np.uint8)
    tissue[6:12, 6:10, 3:9] = 53                 # skeletal_muscle, >= 4.5 mm from the FOV border
    muscles = np.zeros(SHAPE, np.uint8)
    muscles[6:8, 6:10, 3:9] = 46                 # autochthon_left, overlapping skeletal_muscle
    muscles[0:3, 0:3, 0:3] = 30                  # humerus_left, at the FOV corner
    labels = tissue.copy()
    np.copyto(labels, muscles, where=muscles > 0)
    res = SegmentationResult(labels, {"tissue_types": tissue, "muscles": muscles},
                             {30: "humerus_left", 46: "autochthon_left", 53: "skeletal_muscle", 31: "humerus_right"},
                             vol.affine.copy())
    return vol, res


def test_multilabel_nifti_has_totalsegmentators_label_table(case, tmp_path):
    vol, res = case
    out = write_outputs(res, vol, tmp_path / "out", per_structure=False, statistics=False, preview=False)
    img = nib.load(str(out["multilabel"]))
    assert img.shape == SHAPE and img.get_data_dtype() == np.uint8
    assert np.array_equal(img.affine, nib.load(str(tmp_path / "in.nii.gz")).affine)
    assert np.array_equal(np.asarray(img.dataobj), res.labels)
    assert img.header["descrip"].tobytes().startswith(b"input header")  # input header kept
    exts = list(img.header.extensions)
    assert len(exts) == 1 and exts[0].get_code() == EXTENSION_CODE == 0
    xml = exts[0].get_content().decode()
    assert xml.startswith('<?xml version="1.0" encoding="UTF-8"?> <CaretExtension>')
    assert '<Label Key="53" Red="0.0" Green="1.0" Blue="1.0" Alpha="1"><![CDATA[skeletal_muscle]]></Label>' in xml
    assert read_label_table(out["multilabel"]) == {30: "humerus_left", 31: "humerus_right",
                                                   46: "autochthon_left", 53: "skeletal_muscle"}


def test_a_label_table_round_trips_and_malformed_ones_are_refused():
    table = {i: f"s{i}" for i in range(1, 81)}
    assert parse_label_table(label_table_xml(table)) == table
    with pytest.raises(ValueError):
        parse_label_table("<NotCaret/>")
    with pytest.raises(ValueError):
        parse_label_table("not xml at all")
    with pytest.raises(ValueError):
        label_table_xml({1: "evil]]>name"})


def test_per_structure_masks_are_whole_where_structures_overlap(case, tmp_path):
    vol, res = case
    out = write_outputs(res, vol, tmp_path / "out", multilabel=False, per_structure=True, statistics=False,
                        preview=False)
    files = sorted(p.name for p in out["per_structure"].iterdir())
    assert files == ["autochthon_left.nii.gz", "humerus_left.nii.gz", "humerus_right.nii.gz",
                     "skeletal_muscle.nii.gz"]
    sm = np.asarray(nib.load(str(out["per_structure"] / "skeletal_muscle.nii.gz")).dataobj)
    assert sm.sum() == 6 * 4 * 6  # includes the part the autochthon overwrote in the single-label map
    assert np.asarray(nib.load(str(out["per_structure"] / "humerus_right.nii.gz")).dataobj).sum() == 0


def test_statistics_give_volume_intensity_and_qc_per_structure(case, tmp_path):
    vol, res = case
    out = write_outputs(res, vol, tmp_path / "out", multilabel=False, preview=False)
    stats = json.loads(out["statistics"].read_text())
    voxel_mm3 = abs(np.linalg.det(vol.affine[:3, :3]))
    assert voxel_mm3 == pytest.approx(1.2 * 0.9 * 2.5)
    sm = stats["skeletal_muscle"]
    mask = res.per_model["tissue_types"] == 53
    assert sm["voxel_count"] == 144
    assert sm["volume"] == pytest.approx(144 * voxel_mm3, rel=1e-6)
    assert sm["intensity"] == pytest.approx(float(vol.data[mask].mean()), abs=1e-4)
    assert sm["intensity_std"] == pytest.approx(float(vol.data[mask].std()), abs=1e-4)
    assert sm["qc"] == {"empty": False, "touches_border": False}
    assert stats["humerus_left"]["qc"]["touches_border"] is True
    assert stats["humerus_right"] == {"volume": 0.0, "intensity": 0.0, "intensity_std": 0.0, "voxel_count": 0,
                                      "qc": {"empty": True, "touches_border": False}}


def test_touches_border_is_true_only_within_the_margin():
    m = np.zeros((10, 10, 10), bool)
    m[5, 5, 5] = True
    assert not touches_border(m, (3, 3, 3))
    m[8, 5, 5] = True
    assert not touches_border(m, (1, 1, 1)) and touches_border(m, (2, 2, 2))


def test_the_preview_is_a_large_png_with_coloured_overlays(case, tmp_path):
    import matplotlib.image as mpimg

    vol, res = case
    out = write_outputs(res, vol, tmp_path / "out", multilabel=False, statistics=False)
    png = out["preview"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(str(png))
    assert img.shape[0] > 300 and img.shape[1] > 500
    # coloured overlays: some pixels are clearly not grey
    rgb = img[..., :3]
    assert np.any(np.ptp(rgb, axis=-1) > 0.2)


@pytest.mark.parametrize("affine", [np.diag([2.0, 2.0, 2.0, 1.0]), np.diag([-2.0, -2.0, 2.0, 1.0])])
def test_preview_puts_the_patients_left_on_the_viewers_right(affine, tmp_path):
    """Radiological convention in axial and coronal rows, anterior on the right in sagittal, whatever the storage."""
    import matplotlib.image as mpimg

    from serve.outputs.preview import render_preview

    img, lab = np.zeros((40, 40, 40), np.float32), np.zeros((40, 40, 40), np.uint8)
    img[5:35, 5:35, 5:35] = 20
    # RAS+: world x grows toward the patient's right, so the left is at low i for +2 mm columns, high i for -2 mm
    left, anterior = (slice(4, 12), slice(22, 34)) if affine[0, 0] > 0 else (slice(28, 36), slice(6, 18))
    centre = affine @ [20, 20, 20, 1]
    label = affine @ [(left.start + left.stop) / 2, (anterior.start + anterior.stop) / 2, 20, 1]
    assert label[0] < centre[0] and label[1] > centre[1]  # left of and in front of the body's centre
    lab[left, anterior, 15:25] = 1  # the patient's left and front, in either storage order
    png = render_preview(img, lab, affine, {1: "left_front"}, tmp_path / "p.png", n_slices=1)
    rgb = mpimg.imread(str(png))[..., :3]
    h, w = rgb.shape[:2]
    panel = rgb[:, : int(w * 0.7)]  # left of the legend
    coloured = (np.ptp(panel, axis=-1) > 0.2) & ~((panel[..., 0] > 0.8) & (panel[..., 2] < 0.3))  # not the letters
    for row in range(3):
        xs = np.nonzero(coloured[row * h // 3:(row + 1) * h // 3])[1]
        assert xs.size and xs.mean() > panel.shape[1] / 2, f"row {row}: the label is drawn on the viewer's left"


def test_result_must_be_on_the_volume_grid(case, tmp_path):
    vol, res = case
    res.labels = res.labels[:-1]
    with pytest.raises(ValueError, match="not the volume's"):
        write_outputs(res, vol, tmp_path / "o")


def test_non_nifti_input_gets_a_fresh_header(case, tmp_path):
    vol, res = case
    vol.header = None
    out = write_outputs(res, vol, tmp_path / "out", statistics=False, preview=False)
    img = nib.load(str(out["multilabel"]))
    assert np.allclose(img.affine, vol.affine) and img.header["sform_code"] == 1
    write_nifti(tmp_path / "x.nii.gz", res.labels, vol.affine)


def test_an_output_sets_completion_record_names_the_options_that_made_it_as_a_job_does(case, tmp_path):
    """``completion_doc`` (what the API's uploads end with) and a job's job.json state options alike,
    so ``mriseg bulk`` can tell a set made with other options from its own."""
    from serve.jobs.spec import JobSpec
    from serve.jobs.results import completion_doc

    vol, res = case
    write_outputs(res, vol, tmp_path / "a", preview=False, roi_subset=["skeletal_muscle", "humerus_left"])
    write_outputs(res, vol, tmp_path / "b", preview=False, statistics=False, per_structure=True)
    spec = JobSpec("s3://in/a.nii.gz", "s3://out", roi_subset=("humerus_left", "skeletal_muscle"),
                   outputs=("statistics", "multilabel"))
    assert completion_doc(tmp_path / "a")["options"] == spec.options()
    assert completion_doc(tmp_path / "b")["options"] == JobSpec(
        "s3://in/a.nii.gz", "s3://out", outputs=("multilabel", "per_structure")).options()


def test_an_output_set_from_demo_models_says_so_in_its_completion_record(case, tmp_path):
    from serve.jobs.results import completion_doc

    vol, res = case
    write_outputs(res, vol, tmp_path / "real", preview=False)
    res.demo = True
    write_outputs(res, vol, tmp_path / "demo", preview=False)
    assert completion_doc(tmp_path / "real")["demo_models"] is False
    assert completion_doc(tmp_path / "demo")["demo_models"] is True


def test_mriseg_json_records_the_resampling_order_and_the_input_cast(case, tmp_path):
    """What was done to the input's intensities (TotalSegmentator's -ro and int32 cast) travels with the labels."""
    vol, res = case
    write_outputs(res, vol, tmp_path / "default", preview=False, statistics=False)
    meta = json.loads((tmp_path / "default" / "mriseg.json").read_text())
    assert (meta["resampling_order"], meta["input_cast"]) == (1, "none")
    assert OutputMeta.model_validate(meta).format == "mriseg.meta/1"  # the writers' record, as written
    res.resampling_order, res.input_cast = 3, "int32"
    write_outputs(res, vol, tmp_path / "ro3", preview=False, statistics=False)
    meta = json.loads((tmp_path / "ro3" / "mriseg.json").read_text())
    assert (meta["resampling_order"], meta["input_cast"]) == (3, "int32")


def test_a_completion_record_states_the_resampling_order_and_none_for_an_old_set(case, tmp_path):
    """An API output set says how its input was resampled, as a job's job.json does; one whose mriseg.json
    predates the option has none, so its options never equal a new job's."""
    from serve.jobs.spec import JobSpec
    from serve.jobs.results import completion_doc

    vol, res = case
    res.resampling_order, res.input_cast = 3, "int32"
    write_outputs(res, vol, tmp_path / "a", preview=False, statistics=False)
    doc = completion_doc(tmp_path / "a")
    assert OutputRecord.model_validate(doc).status == "succeeded"  # the API's job.json, as built
    assert doc["options"] == JobSpec("s3://in/a.nii.gz", "s3://out", outputs=("multilabel",),
                                     resampling_order=3).options()
    assert doc["input_cast"] == "int32"
    meta = json.loads((tmp_path / "a" / "mriseg.json").read_text())
    del meta["resampling_order"], meta["input_cast"], meta["format"]  # as written before these existed
    (tmp_path / "a" / "mriseg.json").write_text(json.dumps(meta))
    old = completion_doc(tmp_path / "a")
    assert old["options"]["resampling_order"] is None and old["input_cast"] is None
    assert all(old["options"] != JobSpec("s3://in/a.nii.gz", "s3://out", outputs=("multilabel",),
                                         resampling_order=o).options() for o in range(6))


def test_every_written_file_is_named_by_the_layout_and_maps_to_its_s3_name(case, tmp_path):
    """serve.outputs.layout names each file once: the writers use it, and so does the S3 upload."""
    from serve.outputs import layout

    vol, res = case
    written = write_outputs(res, vol, tmp_path, per_structure=True)
    assert {k: p.name for k, p in written.items()} == layout.FILE_OF_KIND
    assert layout.s3_name(layout.MULTILABEL) == "segmentation.nii.gz"
    assert layout.s3_name(f"{layout.PER_STRUCTURE_DIR}/liver.nii.gz") == "structures/liver.nii.gz"
    assert layout.s3_name(layout.METADATA) is None
    assert layout.s3_name(layout.STATISTICS) == "statistics.json" and layout.s3_name(layout.JOB_RECORD) == "job.json"
