"""The parent trusts nothing in a child's reply that it has not checked."""

import json
import pickle

import numpy as np
import pytest

from serve.imaging.sandbox import reply


def _reply(out, data, meta=None):
    out.mkdir(exist_ok=True)
    np.save(out / reply.VOLUME, data, allow_pickle=True)
    (out / reply.META).write_text(json.dumps(meta if meta is not None else {"affine": np.eye(4).tolist(), "source_format": "nifti",
                                                      "nifti_header": None, "integer_valued": False,
                                                      "layers": {}}))
    return out


def test_a_valid_reply_is_read(tmp_path):
    out = _reply(tmp_path / "out", np.ones((3, 4, 5), "<f4"))
    assert reply.read_volume(out, 100).data.shape == (3, 4, 5)


@pytest.mark.parametrize("data", [np.ones((3, 4, 5), ">f4"), np.ones((3, 4, 5), "<f8"), np.ones((60,), "<f4"),
                                  np.asfortranarray(np.ones((3, 4, 5), "<f4")), np.array([{"x": 1}], dtype=object)])
def test_other_arrays_are_refused(tmp_path, data):
    with pytest.raises(reply.SandboxReplyError):
        reply.read_volume(_reply(tmp_path / "out", data), 1000)


def test_a_byte_count_other_than_the_shape_says_is_refused(tmp_path):
    out = _reply(tmp_path / "out", np.ones((3, 4, 5), "<f4"))
    with open(out / reply.VOLUME, "ab") as f:
        f.write(b"\0" * 4)
    with pytest.raises(reply.SandboxReplyError, match="number of bytes"):
        reply.read_volume(out, 1000)


def test_more_voxels_than_allowed_are_refused_before_reading(tmp_path):
    with pytest.raises(reply.SandboxReplyError, match="over the limit"):
        reply.read_volume(_reply(tmp_path / "out", np.ones((3, 4, 5), "<f4")), 59)


def test_non_finite_voxels_and_broken_affines_are_refused_again(tmp_path):
    from serve.errors import InvalidVolumeError

    data = np.ones((3, 4, 5), "<f4")
    data[0, 0, 0] = np.nan
    with pytest.raises(InvalidVolumeError):
        reply.read_volume(_reply(tmp_path / "a", data), 1000)
    meta = {"affine": np.zeros((4, 4)).tolist(), "source_format": "nifti", "nifti_header": None,
            "integer_valued": False}
    with pytest.raises(InvalidVolumeError):
        reply.read_volume(_reply(tmp_path / "b", np.ones((3, 4, 5), "<f4"), meta), 1000)


@pytest.mark.parametrize("meta", [[], {"affine": "x", "source_format": "nifti"},
                                  {"affine": np.eye(4).tolist(), "source_format": "pickle"},
                                  {"affine": np.eye(4).tolist(), "source_format": "nifti", "nifti_header": "AAAA"}])
def test_malformed_meta_is_refused(tmp_path, meta):
    with pytest.raises(reply.SandboxReplyError):
        reply.read_volume(_reply(tmp_path / "out", np.ones((3, 4, 5), "<f4"), meta), 1000)


def test_the_integer_valued_flag_travels_from_child_to_parent(tmp_path):
    from serve.imaging.volume import Volume

    for flag in (True, False):
        out = tmp_path / str(flag)
        out.mkdir()
        reply.write_volume(out, Volume(np.arange(60, dtype=np.float32).reshape(3, 4, 5), np.eye(4), "nifti",
                                       integer_valued=flag), {})
        assert reply.read_volume(out, 100).integer_valued is flag


@pytest.mark.parametrize("flag", [None, "true", 1, 0, "MISSING"])
def test_an_integer_valued_flag_that_is_not_a_boolean_is_refused(tmp_path, flag):
    meta = {"affine": np.eye(4).tolist(), "source_format": "nifti", "nifti_header": None, "layers": {}}
    if flag != "MISSING":
        meta["integer_valued"] = flag
    with pytest.raises(reply.SandboxReplyError, match="malformed"):
        reply.read_volume(_reply(tmp_path / "out", np.ones((3, 4, 5), "<f4"), meta), 1000)


def test_a_reply_calling_fractional_voxels_integers_is_refused(tmp_path):
    """The flag decides TotalSegmentator's int32 cast, which would truncate them: a lie is a malformed reply."""
    meta = {"affine": np.eye(4).tolist(), "source_format": "nifti", "nifti_header": None, "integer_valued": True}
    data = np.ones((3, 4, 5), "<f4")
    assert reply.read_volume(_reply(tmp_path / "a", data, meta), 1000).integer_valued is True
    data[2, 3, 4] = 1.5
    with pytest.raises(reply.SandboxReplyError, match="integers"):
        reply.read_volume(_reply(tmp_path / "b", data, meta), 1000)


def test_an_error_reply_cannot_claim_a_server_error(tmp_path):
    reply.write_error(tmp_path, 500, "x", "boom")
    err = reply.read_error(tmp_path / reply.ERROR)
    assert err.status == 422 and err.message == "boom"
    (tmp_path / reply.ERROR).write_bytes(pickle.dumps({"status": 400}))
    with pytest.raises(reply.SandboxReplyError):
        reply.read_error(tmp_path / reply.ERROR)
    (tmp_path / reply.ERROR).write_bytes(b"{" + b" " * (reply.MAX_JSON_BYTES + 1) + b"}")
    with pytest.raises(reply.SandboxReplyError, match="over"):
        reply.read_error(tmp_path / reply.ERROR)


def test_a_refusal_keeps_its_error_class_but_never_gains_another(tmp_path):
    from serve.errors import MrisegError, UnsupportedFormatError

    reply.write_error(tmp_path, 415, "Unsupported media type", "convert it", "UnsupportedFormatError")
    err = reply.read_error(tmp_path / reply.ERROR)
    assert type(err) is UnsupportedFormatError and err.status == 415 and err.title == "Unsupported media type"
    reply.write_error(tmp_path, 409, "x", "y", "ModelUnavailableError")  # not an input error: a plain 4xx
    err = reply.read_error(tmp_path / reply.ERROR)
    assert type(err) is MrisegError and err.status == 409
