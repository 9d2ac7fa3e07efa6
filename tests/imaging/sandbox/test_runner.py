"""The sandboxed decoder gives what the in-process reader gives, and reports its layers."""

import numpy as np
import pytest

from serve.errors import MrisegError
from serve.imaging.sandbox import LAYERS, SandboxedDecoder, SandboxPolicy, SandboxUnavailableError
from serve.imaging.nifti import write_nifti
from serve.imaging.volume_io import read_volume


@pytest.fixture
def decoder(tmp_path):
    return SandboxedDecoder(SandboxPolicy(scratch_dir=str(tmp_path / "scratch")))


def test_decode_equals_the_in_process_reader(decoder, tmp_path):
    rng = np.random.default_rng(0)
    path = write_nifti(tmp_path / "scan.nii.gz", rng.normal(size=(12, 10, 8)).astype(np.float32),
                       np.diag([1.2, 0.9, 3.0, 1.0]))
    got, want = decoder.decode(path, 10_000), read_volume(path, 10_000, self_contained=True)
    assert np.array_equal(got.data, want.data) and got.data.dtype == np.float32
    assert np.array_equal(got.affine, want.affine) and got.source_format == "nifti"
    assert got.header.binaryblock == want.header.binaryblock
    assert not list((tmp_path / "scratch").iterdir()), "the work folder was left behind"


def test_the_sandbox_says_which_inputs_are_integer_valued(decoder, tmp_path):
    """An int16 scan is; the same voxels scaled by 0.5 (as MRI often is) or stored as float are not."""
    import nibabel as nib

    data = (np.arange(960) % 300).reshape(12, 10, 8).astype(np.int16)
    plain = write_nifti(tmp_path / "int16.nii.gz", data, np.diag([1.2, 0.9, 3.0, 1.0]))
    img = nib.Nifti1Image(data, np.diag([1.2, 0.9, 3.0, 1.0]))
    img.header.set_slope_inter(0.5, 0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    floats = write_nifti(tmp_path / "float.nii.gz", data.astype(np.float32), np.diag([1.2, 0.9, 3.0, 1.0]))
    assert decoder.decode(plain, 10_000).integer_valued is True
    scaled = decoder.decode(tmp_path / "scaled.nii.gz", 10_000)
    assert scaled.integer_valued is False and np.array_equal(scaled.data, data * 0.5)
    assert decoder.decode(floats, 10_000).integer_valued is False


def test_a_refusal_keeps_its_status_and_message(decoder, tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(MrisegError) as e:
        decoder.decode(bad, 10_000)
    assert e.value.status == 422 and "NIfTI" in e.value.message
    assert str(tmp_path) not in e.value.message  # no server-side path in what the user sees


def test_probe_reports_every_layer_on_this_host(decoder):
    layers = decoder.probe()
    assert set(layers) == set(LAYERS)
    assert decoder.missing_layers(layers) == []


def test_a_missing_required_layer_decodes_nothing(tmp_path):
    """A child whose sandbox lacks a required layer refuses to open the input: 503, not a weak decode."""
    import json

    policy = SandboxPolicy(scratch_dir=str(tmp_path))
    script = ("import json, sys; from pathlib import Path; from serve.imaging.sandbox import child; "
              "child.confine = lambda *a: dict.fromkeys(('rlimits', 'no_new_privs', 'seccomp', 'landlock'), False); "
              "sys.exit(child.main(sys.argv))")
    dec = SandboxedDecoder(policy, entry=("-c", script))
    assert dec.probe() == dict.fromkeys(LAYERS, False)
    path = write_nifti(tmp_path / "scan.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(SandboxUnavailableError) as e:
        dec.decode(path, 1000)
    assert e.value.status == 503
    assert json.dumps(policy.to_json())  # the policy travels as JSON


def test_policy_settings_are_checked():
    with pytest.raises(MrisegError, match="unknown layer"):
        SandboxPolicy.from_mapping({"require": ["selinux"]})
    with pytest.raises(MrisegError, match="unknown setting"):
        SandboxPolicy.from_mapping({"memory": 1})
    assert SandboxPolicy.from_mapping({"require": ["landlock"]}).require == ("landlock",)


def test_a_float64_volume_over_the_decode_memory_is_refused_from_its_header(tmp_path):
    """The same voxel count passes as uint8 and is refused as float64: the budget counts the stored type,
    before anything is decoded (the gzip of zeros would otherwise inflate to 8 bytes a voxel)."""
    import nibabel as nib

    decoder = SandboxedDecoder(SandboxPolicy(scratch_dir=str(tmp_path / "s"), memory_bytes=768 << 20))
    shape = (256, 256, 260)  # 17 M voxels: 260 MiB to decode as float64 (+8 a voxel), 146 MiB as uint8
    for dtype, ok in ((np.uint8, True), (np.float64, False)):
        img = nib.Nifti1Image(np.zeros(shape, dtype), np.eye(4))
        img.set_qform(np.eye(4), 1)
        path = tmp_path / f"{np.dtype(dtype).name}.nii.gz"
        nib.save(img, path)
        if ok:
            assert decoder.decode(path, 1 << 25).shape == shape
        else:
            with pytest.raises(MrisegError) as e:
                decoder.decode(path, 1 << 25)
            assert e.value.status == 413 and "float64" not in e.value.message and "8 bytes" in e.value.message


def test_readiness_is_withheld_while_a_required_layer_is_missing():
    from serve.cluster.app import with_sandbox

    layers = dict.fromkeys(LAYERS, True) | {"landlock": False}
    report = {"ready": True, "submodels": {}}
    assert with_sandbox(report, layers, [])["ready"] is True
    down = with_sandbox(report, layers, ["landlock"])
    assert down["ready"] is False and "landlock" in down["detail"] and down["sandbox"]["landlock"] is False
    assert report["ready"] is True  # the deployments' report is not changed in place


def test_a_cancel_kills_the_child_at_once(tmp_path):
    import threading
    import time

    from serve.imaging.sandbox.runner import DecodeCancelled

    cancel = threading.Event()
    dec = SandboxedDecoder(SandboxPolicy(scratch_dir=str(tmp_path), wall_s=60),
                           entry=("-c", "import time; time.sleep(60)"))
    threading.Timer(0.5, cancel.set).start()
    t = time.monotonic()
    with pytest.raises(DecodeCancelled):
        dec.decode(tmp_path, 1000, cancel=cancel)
    assert time.monotonic() - t < 5
    assert not list(tmp_path.iterdir())


def test_the_child_may_read_the_whole_package_wherever_the_policy_module_sits():
    """An editable install maps serve/ to the source tree, which is not on sys.path: the child's Landlock
    rules must name serve/ itself (the readers import serve.errors and more), not the sandbox's parent folder."""
    import os
    from pathlib import Path

    import serve
    from serve.imaging.sandbox.policy import library_paths

    assert Path(os.path.realpath(Path(serve.__file__).parent)) in library_paths()


def _killed_from_outside_first(marker) -> str:
    """A child that is SIGKILLed from outside (as Ray kills a stopping replica's children) until ``marker``
    exists, and then decodes as the real child does."""
    return ("import os, signal, sys; from pathlib import Path; m = Path(%r)\n"
            "if not m.exists():\n    m.touch(); os.kill(os.getpid(), signal.SIGKILL)\n"
            "from serve.imaging.sandbox import child; sys.exit(child.main(sys.argv))" % str(marker))


def test_a_child_killed_from_outside_is_decoded_again_not_blamed_on_the_input(tmp_path):
    """Ray kills a stopping replica's children before the replica: a decode killed so must not settle its job
    as a corrupt input (422) in the replica's last moments; it is tried again once, after a pause."""
    dec = SandboxedDecoder(SandboxPolicy(scratch_dir=str(tmp_path / "scratch")),
                           entry=("-c", _killed_from_outside_first(tmp_path / "killed-once")))
    data = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    path = write_nifti(tmp_path / "scan.nii.gz", data, np.eye(4))
    got = dec.decode(path, 1000)
    assert (tmp_path / "killed-once").exists() and np.array_equal(got.data, data)
    assert not list((tmp_path / "scratch").iterdir()), "a work folder was left behind"


def test_a_child_killed_from_outside_twice_is_a_retryable_503_not_a_bad_input(tmp_path):
    from serve.imaging.sandbox.runner import DecoderKilledError

    dec = SandboxedDecoder(SandboxPolicy(scratch_dir=str(tmp_path)),
                           entry=("-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    with pytest.raises(DecoderKilledError) as e:
        dec.decode(tmp_path, 1000)
    assert e.value.status == 503 and "resubmitted as is" in e.value.message
