"""mriseg's output equals TotalSegmentator 2.18's, voxel for voxel, on the same weights and input.

The real package runs in the side venv (``.venv-ts``, built by scripts/bootstrap.sh): its
``TotalSegmentator -ta total_mr --ml`` CLI on generated int16 MR-like volumes with 3 mm slices in
LPS, PIR and oblique orientations, against ``mriseg segment`` with default options. Both read the
same planted random-weight models (850 and 851, under TotalSegmentator's own folder names), which
magnify any difference in preprocessing. A float-scaled volume takes mriseg's documented
departure (float intensities are not cast to int32): it is compared with TotalSegmentator's own
steps fed those float intensities. The licensed tasks (855, 856, 857, 925), whose CLI needs a
licence number, are compared through the function their CLI path calls (tests/parity/ts_driver.py).

TotalSegmentator runs with its usage statistics off and every proxy variable pointed at a local
recorder: a download or statistics request would show up there, and the test asserts none did.
Skipped where the side venv is absent, except where ``MRISEG_REQUIRE_TOTALSEG=1`` (scripts/test.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.parity import cases as pc, sidevenv as sv
from tests.parity.cases import Case

TOTAL_MR_CASES = (
    Case("lps", "LPS", (1.25, 1.25, 3.0), (40, 36, 14), seed=1),
    Case("pir", "PIR", (3.0, 1.2, 1.1), (14, 38, 40), seed=2),
    Case("oblique", "RAS", (1.3, 1.3, 3.0), (36, 38, 14), oblique_deg=20.0, seed=3),
)
FLOAT_CASE = Case("float_scaled", "RAS", (1.1, 1.1, 3.0), (40, 38, 14), float_scaled=True, seed=4)
#: TotalSegmentator's licensed MR tasks -> task id; each runs on the LPS volume
LICENSED = {"appendicular_bones_mr": 855, "face_mr": 856, "thigh_shoulder_muscles_mr": 857, "tissue_types_mr": 925}
TOTAL_MR_IDS = (850, 851)
DRIVER_TIMEOUT_S = 600


class NetworkRecorder:
    """A loopback TCP listener that every proxy variable points at: it records each connection
    (a download or a usage-statistics request through ``requests``) and closes it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.connections: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    self.connections.append(conn.recv(200))  # e.g. b"CONNECT stats.totalsegmentator.com:443"
                except OSError:
                    self.connections.append(b"")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def ours(input_path: Path, out: Path, models: Path, *extra: str) -> Path:
    """``mriseg segment`` with default options (only the multilabel file, on the CPU), in-process."""
    from serve.cli.main import main

    rc = main(["segment", "-i", str(input_path), "-o", str(out), "--models", str(models), "--ml",
               "--device", "cpu", "-q", *extra])
    assert rc == 0, f"mriseg segment exited {rc}"
    return out / "segmentations.nii.gz"


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """Plant the models, write the volumes, run TotalSegmentator (one driver process, in the
    background) and mriseg (in this process, meanwhile) on every case; return where all went."""
    py = sv.require_side_venv()
    tmp = tmp_path_factory.mktemp("parity")
    home = tmp / "home"
    config = pc.write_home_config(home)
    results = home / ".totalsegmentator" / "nnunet" / "results"
    planted = pc.plant_models(results, [*TOTAL_MR_IDS, *LICENSED.values()])
    # mriseg's full run uses every sub-model it finds: its total_mr source holds 850 and 851 only
    # (copies of the very files TotalSegmentator reads)
    total_mr_models = tmp / "models-total_mr"
    for tid in TOTAL_MR_IDS:
        shutil.copytree(planted[tid], total_mr_models / planted[tid].name)
    inputs = {c.name: pc.write_case(c, tmp / "inputs") for c in (*TOTAL_MR_CASES, FLOAT_CASE)}
    ts_out, our_out = tmp / "totalseg", tmp / "mriseg"
    ts_out.mkdir()

    jobs = [{"kind": "cli", "name": c.name,
             "argv": ["-i", str(inputs[c.name]), "-o", str(ts_out / f"{c.name}.nii.gz"), "-ta", "total_mr", "--ml",
                      "--device", "cpu", "--nr_thr_resamp", "1", "--nr_thr_saving", "1", "--quiet"]}
            for c in TOTAL_MR_CASES]
    jobs.append({"kind": "float_reference", "name": FLOAT_CASE.name, "input": str(inputs[FLOAT_CASE.name]),
                 "output": str(ts_out / f"{FLOAT_CASE.name}.nii.gz")})
    jobs += [{"kind": "task", "name": task, "task": task, "input": str(inputs["lps"]),
              "output": str(ts_out / f"{task}.nii.gz")} for task in LICENSED]
    (tmp / "jobs.json").write_text(json.dumps(jobs, indent=1))
    before = sorted(p.name for p in results.iterdir())

    recorder = NetworkRecorder()
    log = (tmp / "ts_driver.log").open("w")
    t0 = time.perf_counter()
    driver = subprocess.Popen([str(py), str(sv.DRIVER), "run", str(tmp / "jobs.json")], cwd=tmp,
                              env=sv.side_env(home, recorder.url), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # its own group: nnU-Net's spawned workers go with it
    errors: dict[str, BaseException] = {}
    try:
        for c in (*TOTAL_MR_CASES, FLOAT_CASE):
            try:
                ours(inputs[c.name], our_out / c.name, total_mr_models)
            except (Exception, SystemExit) as e:  # noqa: BLE001 - reported by the case's own test
                errors[c.name] = e
        from serve.catalogue import load_catalogue

        cat = load_catalogue()
        for task, tid in LICENSED.items():
            try:
                ours(inputs["lps"], our_out / task, results, "--roi-subset", *cat.by_task_id(tid).labels)
            except (Exception, SystemExit) as e:  # noqa: BLE001
                errors[task] = e
        t_ours = time.perf_counter() - t0
        rc = driver.wait(timeout=DRIVER_TIMEOUT_S)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        log.close()
        recorder.close()
    t_all = time.perf_counter() - t0
    print(f"parity: mriseg {t_ours:.0f} s, TotalSegmentator {t_all:.0f} s (in parallel)")
    output = (tmp / "ts_driver.log").read_text()
    assert rc == 0, f"TotalSegmentator's driver exited {rc}:\n{output[-6000:]}"
    return {"ts": ts_out, "ours": our_out, "errors": errors, "recorder": recorder, "results": results,
            "before": before, "config": config, "inputs": inputs, "log": output}


def load_labels(path: Path):
    import nibabel as nib

    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine


def assert_same(ours_path: Path, ts_path: Path, what: str, ts_to_ours: np.ndarray | None = None,
                min_structures: int = 2) -> None:
    """Voxel equality of the two multilabel files (``ts_to_ours`` maps TotalSegmentator's ids to ours)."""
    a, a_aff = load_labels(ours_path)
    b, b_aff = load_labels(ts_path)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} (mriseg) and {b.shape} (TotalSegmentator)"
    np.testing.assert_allclose(a_aff, b_aff, atol=1e-5, err_msg=f"{what}: affines differ")
    b = b.astype(np.int64)
    if ts_to_ours is not None:
        b = ts_to_ours[b]
    differ = a.astype(np.int64) != b
    if differ.any():
        labels = sorted(set(np.unique(a[differ]).tolist()) | set(np.unique(b[differ]).tolist()))
        pytest.fail(f"{what}: {int(differ.sum())} of {a.size} voxels differ (agreement "
                    f"{1 - differ.mean():.4f}); labels involved: {labels[:20]}")
    found = len(np.unique(a[a > 0]))
    assert found >= min_structures, f"{what}: {found} structure(s) found; a near-empty result proves little"


def check_ours(parity, name: str, input_cast: str) -> Path:
    """mriseg's multilabel file for ``name``; its mriseg.json records the default order and ``input_cast``."""
    if name in parity["errors"]:
        raise parity["errors"][name]
    meta = json.loads((parity["ours"] / name / "mriseg.json").read_text())
    assert (meta["resampling_order"], meta["input_cast"]) == (1, input_cast), meta
    return parity["ours"] / name / "segmentations.nii.gz"


@pytest.mark.parametrize("case", [c.name for c in TOTAL_MR_CASES])
def test_total_mr_equals_totalsegmentator(parity, case):
    """int16 input, 3 mm slices: ``mriseg segment`` == ``TotalSegmentator -ta total_mr --ml``, every voxel."""
    assert_same(check_ours(parity, case, "int32"), parity["ts"] / f"{case}.nii.gz", case)


def test_float_scaled_input_keeps_float_intensities(parity):
    """The departure: a float-scaled input (scl_slope != 1) is not cast to int32, and its output equals
    TotalSegmentator's own steps fed the same float intensities."""
    assert_same(check_ours(parity, FLOAT_CASE.name, "none"), parity["ts"] / f"{FLOAT_CASE.name}.nii.gz",
                FLOAT_CASE.name)


@pytest.mark.parametrize("task", list(LICENSED))
def test_licensed_task_equals_totalsegmentator(parity, task):
    """Each licensed sub-model alone (``--roi-subset`` its structures) == TotalSegmentator's pipeline for
    that task (its ids mapped to mriseg's merged ids by name)."""
    from serve.catalogue import load_catalogue

    ids = load_catalogue().structure_ids
    class_map = sv.describe()["class_map"][task]
    lut = np.zeros(256, dtype=np.int64)
    for local, name in class_map.items():
        lut[int(local)] = ids[name]
    assert_same(check_ours(parity, task, "int32"), parity["ts"] / f"{task}.nii.gz", task, ts_to_ours=lut,
                min_structures=min(2, len(class_map)))


def test_totalsegmentator_used_no_network_and_planted_weights(parity):
    """No download, no usage statistics: no connection reached the proxy recorder, the planted folders
    are all there is, and the config still has statistics off and no licence number."""
    assert parity["recorder"].connections == [], parity["recorder"].connections
    assert sorted(p.name for p in parity["results"].iterdir()) == parity["before"]
    assert not list(parity["results"].rglob("tmp_download_file.zip"))
    config = json.loads(parity["config"].read_text())
    assert config["send_usage_stats"] is False and "license_number" not in config
    assert config["prediction_counter"] == len(TOTAL_MR_CASES)  # the CLI ran its statistics step, with stats off
