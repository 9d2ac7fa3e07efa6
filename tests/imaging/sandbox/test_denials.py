"""The sandbox holds against a hostile child, as root and as an unprivileged uid without capabilities.

Each attack runs in the real sandbox (the same ``confine`` and runner as the decoder) under a stand-in
parent process; it must be denied, or end in a 422 for that input alone with the parent alive.
"""

import json
import os
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from serve.imaging.sandbox import SandboxedDecoder, SandboxPolicy

HERE = Path(__file__).parent
NOBODY = 65534
SECRET = "mriseg-test-secret-4f1c2a"
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox's layers are Linux's")


@contextmanager
def reachable_by_others(paths):
    """Grant traverse (o+x) on the folders above ``paths`` that deny it, for the test's duration.

    The interpreter may live under a private home (/root/.pyenv); the unprivileged uid must reach it.
    """
    changed = []
    try:
        for p in paths:
            for d in reversed(Path(p).resolve().parents):
                mode = d.stat().st_mode
                if not mode & stat.S_IXOTH:
                    os.chmod(d, mode | stat.S_IXOTH)
                    changed.append((d, mode))
        yield
    finally:
        for d, mode in reversed(changed):
            os.chmod(d, mode)


@pytest.fixture(scope="module", params=["root", "unprivileged"])
def run_attack(request):
    """Run one attack; returns (parent exit code, its JSON report or None)."""
    as_nobody = request.param == "unprivileged"
    if os.geteuid() != 0:
        if as_nobody:  # the suite already runs unprivileged: that is this case
            as_nobody = False
        else:
            pytest.skip("the root case needs root (CI runs as root)")
    base = Path(tempfile.mkdtemp(prefix="mriseg-denial-"))
    os.chmod(base, 0o755)
    scratch = base / "scratch"
    scratch.mkdir()
    state = base / "state" / "stack.json"  # stands for mriseg up's state file: the API key
    state.parent.mkdir(mode=0o700)
    state.write_text(json.dumps({"api_key": SECRET}))
    state.chmod(0o600)
    if as_nobody:
        for p in (scratch, state.parent, state):
            os.chown(p, NOBODY, NOBODY)
    interpreter = Path(sys.executable)
    import serve

    needed = [interpreter.resolve(), interpreter, Path(serve.__file__), HERE / "parent.py", scratch]

    def run(attack: str, target: str, **policy):
        pol = {"scratch_dir": str(scratch), "require": ["rlimits", "no_new_privs", "seccomp", "landlock"],
               **policy}
        cmd = [sys.executable, "-I", str(HERE / "parent.py"), attack, target, json.dumps(pol)]
        if as_nobody:
            cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
                   "--bounding-set=-all", *cmd]
        env = {"PATH": "/usr/bin:/bin", "MRISEG_TEST_SECRET": SECRET, "HOME": str(base)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        lines = proc.stdout.strip().splitlines()
        return proc.returncode, (json.loads(lines[-1]) if lines else None), proc.stderr[-2000:]

    run.state, run.base = state, base
    with reachable_by_others(needed):
        yield run


def outcome(report: dict) -> dict:
    assert report["status"] == 422, report
    return json.loads(report["message"])


@pytest.mark.parametrize("attack,target", [
    ("read_file", "/etc/hostname"),
    ("read_file", "state"),
    ("parent_environ", "-"),
    ("socket_inet", "-"),
    ("socket_unix", "-"),
    ("ptrace_parent", "-"),
    ("kill_parent", "-"),
    ("fork", "-"),
    ("exec", "-"),
    ("environment", SECRET),
    ("output", "-"),  # past the file-size limit: EFBIG (Python ignores SIGXFSZ)
])
def test_attack_is_denied(run_attack, attack, target):
    code, report, stderr = run_attack(attack, str(run_attack.state) if target == "state" else target)
    assert code == 0 and report is not None, f"the stand-in parent died ({code}): {stderr}"
    result = outcome(report)
    assert result["outcome"].startswith("denied"), result
    assert all(result["layers"].values()), result["layers"]


@pytest.mark.parametrize("attack,policy", [
    ("memory", {"memory_bytes": 512 << 20}),
    ("cpu", {"cpu_s": 1}),
    ("crash", {}),
])
def test_limit_or_crash_is_a_422_for_that_input(run_attack, attack, policy):
    code, report, stderr = run_attack(attack, "-", **policy)
    assert code == 0 and report is not None, f"the stand-in parent died ({code}): {stderr}"
    assert report["status"] == 422, report
    # the child never reported back: it was stopped by the limit (or the crash), not left to go on
    assert "could not be decoded" in report["message"], report


def test_wall_clock_limit_stops_a_child_that_sleeps(tmp_path):
    """A child that waits (no CPU time spent) is killed at the wall-clock limit."""
    dec = SandboxedDecoder(SandboxPolicy(scratch_dir=str(tmp_path), wall_s=2),
                           entry=("-c", "import time; time.sleep(60)"))
    from serve.errors import MrisegError

    with pytest.raises(MrisegError) as e:
        dec.decode(tmp_path, 1000)
    assert e.value.status == 422 and "SIGKILL" in e.value.message
    assert not list(tmp_path.iterdir()), "the child's work folder was left behind"


def test_every_format_decodes_in_the_sandbox(run_attack):
    """The limits (no new threads for a non-root uid, the file-size limit) leave the readers working:
    NIfTI, .mha, .nrrd (canonical copies) and a DICOM zip decode as root and as the unprivileged uid."""
    import io
    import zipfile

    import numpy as np
    import SimpleITK as sitk

    from serve.imaging.nifti import write_nifti
    from tests.helpers.hostile_corpus import _dicom_slices

    folder = run_attack.base / "inputs"
    folder.mkdir(mode=0o755)
    arr = (np.arange(16 * 18 * 20) % 97).astype(np.int16).reshape(16, 18, 20)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.2, 1.1, 2.0))
    for suffix in (".mha", ".nrrd"):
        sitk.WriteImage(img, str(folder / f"v{suffix}"), True)
    write_nifti(folder / "v.nii.gz", arr.astype(np.float32), np.diag([1.2, 1.1, 2.0, 1.0]))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, payload in _dicom_slices(4):
            zf.writestr(f"series/{name}", payload)
    (folder / "v.zip").write_bytes(buf.getvalue())
    for name in ("v.nii.gz", "v.mha", "v.nrrd", "v.zip"):
        os.chmod(folder / name, 0o644)
        code, report, stderr = run_attack("decode", str(folder / name))
        assert code == 0 and report and report["status"] == 200, (name, report, stderr)

