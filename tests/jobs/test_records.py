"""Signed records (serve/jobs/records.py): what verifies, what does not, and the key file."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from serve.jobs.records import ENV, ForgedRecord, RecordKeyError, RecordSigner, rejected

BODY = {"state": "running", "spec": {"input_uri": "s3://inbox/site-a/ünï.nii.gz", "site": "site-a"},
        "lease_until": 1.5, "attempts": 1, "error": None}
AT = {"bucket": "jobs", "key": "p/jobs/0123.json"}


@pytest.fixture(scope="module")
def signer() -> RecordSigner:
    return RecordSigner(os.urandom(32))


def stored(doc) -> object:
    """What a reader gets back: the JSON the server wrote (put_json's formatting), parsed."""
    return json.loads(json.dumps(doc, indent=1, sort_keys=True))


def test_an_envelope_round_trips_through_storage(signer):
    doc = signer.seal(BODY, **AT, site="site-a")
    assert set(doc) == {"v", "site", "body", "mac"} and doc["v"] == 1 and len(doc["mac"]) == 64
    assert signer.unseal(stored(doc), **AT) == ("site-a", BODY)


@pytest.mark.parametrize("tamper", [
    lambda d: d["body"].update(state="done"),
    lambda d: d["body"]["spec"].update(input_uri="s3://inbox/site-b/secret.nii.gz"),
    lambda d: d.update(site="site-b"),
    lambda d: d.update(mac=d["mac"][:-1] + ("0" if d["mac"][-1] != "0" else "1")),
    lambda d: d.update(mac="é" * 64),  # non-ASCII: refused, not a TypeError from compare_digest
    lambda d: d.update(v=2),
    lambda d: d.pop("mac"),
    lambda d: d.update(body=[1]),
], ids=["body", "nested body", "site", "mac", "non-ascii mac", "version", "no mac", "body not an object"])
def test_a_tampered_envelope_is_rejected(signer, tamper):
    doc = stored(signer.seal(BODY, **AT, site="site-a"))
    tamper(doc)
    with pytest.raises(ForgedRecord):
        signer.unseal(doc, **AT)


@pytest.mark.parametrize("where", [{"bucket": "jobs", "key": "p/jobs/4567.json"},
                                   {"bucket": "other", "key": "p/jobs/0123.json"}], ids=["other key", "other bucket"])
def test_a_valid_record_replayed_elsewhere_is_rejected(signer, where):
    doc = stored(signer.seal(BODY, **AT, site="site-a"))
    with pytest.raises(ForgedRecord) as e:
        signer.unseal(doc, **where)
    assert e.value.reason == "bad mac"


def test_another_keys_record_and_an_unsigned_one_are_rejected(signer):
    with pytest.raises(ForgedRecord):
        signer.unseal(stored(RecordSigner(os.urandom(32)).seal(BODY, **AT, site="site-a")), **AT)
    for unsigned in (BODY, [], "x", None):
        with pytest.raises(ForgedRecord) as e:
            signer.unseal(unsigned, **AT)
        assert e.value.reason == "unsigned"


def test_an_inline_stamp_keeps_the_document_readable_and_binds_its_place_and_site(signer):
    doc = {"status": "done", "site": "site-a", "job_key": "k", "input": {"uri": "s3://i/a.nii"}, "timings": {"t": 0.1}}
    at = {"bucket": "outbox", "key": "r/site-a/a/job.json"}
    stamped = stored(signer.stamp(doc, **at))
    assert stamped["status"] == "done" and signer.check(stamped, **at) == doc  # readers see the same members
    for bad in ({**stamped, "status": "failed"}, {**stamped, "site": "site-b"}, {**stamped, "extra": 1}, doc):
        with pytest.raises(ForgedRecord):
            signer.check(bad, **at)
    with pytest.raises(ForgedRecord):
        signer.check(stamped, bucket="outbox", key="r/site-a/b/job.json")


def test_rejections_are_audited_without_the_key(caplog):
    with caplog.at_level(logging.INFO, logger="mriseg.audit"):
        rejected("push", "jobs", "p/pushed/patient-name.json", "bad mac")
    [line] = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mriseg.audit"]
    assert line["event"] == "record.rejected" and line["kind"] == "push" and line["reason"] == "bad mac"
    assert "patient" not in caplog.text and len(line["key"]) == 16


def test_the_key_file_is_made_0600_never_overwritten_and_read_back(tmp_path, monkeypatch):
    path = RecordSigner.generate(tmp_path / "record.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text().strip()) == 64
    with pytest.raises(RecordKeyError, match="exists"):
        RecordSigner.generate(path)
    monkeypatch.setenv(ENV, str(path))
    a, b = RecordSigner.from_env(), RecordSigner.from_file(path)
    assert b.unseal(a.seal(BODY, **AT, site="s"), **AT)[1] == BODY
    assert path.read_text().strip() not in repr(a)


def test_a_missing_or_short_key_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(RecordKeyError, match=f"set {ENV}.*mriseg record-key generate"):
        RecordSigner.from_env()
    short = tmp_path / "short.key"
    short.write_text("ab" * 16)
    monkeypatch.setenv(ENV, str(short))
    with pytest.raises(RecordKeyError, match="16 bytes; it needs at least 32.*record-key generate"):
        RecordSigner.from_env()
    short.write_text("not hex at all" * 8)
    with pytest.raises(RecordKeyError, match="hex digits only"):
        RecordSigner.from_file(short)
    with pytest.raises(RecordKeyError, match="cannot read.*record-key generate"):
        RecordSigner.from_file(tmp_path / "absent.key")


def test_the_cli_makes_a_key(tmp_path, capsys):
    from serve.cli.main import main

    assert main(["record-key", "generate", str(tmp_path / "k")]) == 0
    RecordSigner.from_file(tmp_path / "k")
    assert main(["record-key", "generate", str(tmp_path / "k")]) == 2
    assert "exists" in capsys.readouterr().err
