"""One job vocabulary and versioned record formats (issue #36): the models, their documented schemas, what
every writer writes, legacy ``done`` records, and formats from a newer version."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve.storage import staging
from serve.cli.bulk import FAILED, SKIPPED, already_done, run_bulk
from serve.jobs.spec import JobSpec, idempotency_key
from serve.jobs.store import JobRecord, JobStore
from serve.records_schema import (DOCUMENTED, JOB_FORMAT, JOURNAL_FORMAT, OUTPUT_FORMAT, PUSH_FORMAT, SUCCEEDED,
                                  JournalRecord, MalformedRecord, OutputRecord, PushRecord, SignedEnvelope,
                                  UnsupportedRecordFormat, check_output_record, output_meta_doc, output_record,
                                  read_job_record, read_output_meta, read_output_record, read_versioned,
                                  versioned_doc)
from serve.records_schema import JobRecord as JobRecordModel

DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"
OPTIONS = {"roi_subset": None, "fast": False, "outputs": ["multilabel"], "resampling_order": 1}


def _documented_schemas() -> dict[str, dict]:
    blocks = re.findall(r"<!-- schema: (\w+) [^>]*-->\n```json\n(.*?)\n```", DOC.read_text(encoding="utf-8"), re.S)
    return {name: json.loads(body) for name, body in blocks}


def test_the_documented_schemas_are_the_models_schemas():
    """docs/formats.md cannot drift from the models: each schema block is the model's JSON Schema."""
    documented = _documented_schemas()
    assert set(documented) == set(DOCUMENTED)
    for name, model in DOCUMENTED.items():
        assert documented[name] == model.model_json_schema(), \
            f"the {name} schema of docs/formats.md is stale: python -m serve.records_doc docs/formats.md"


def test_a_legacy_job_record_reads_done_as_succeeded():
    legacy = {"key": "k", "state": "done", "spec": {}, "models": {}, "output_prefix": "s3://o/"}
    rec = read_job_record(legacy)
    assert rec.state == SUCCEEDED and rec.format == JOB_FORMAT and rec.attempts == 0
    assert JobRecord.from_json(legacy, None).state == SUCCEEDED
    # members of older versions are left out, as before formats; within mriseg.job/1 they are errors
    failed = {**legacy, "state": "failed", "gone": 1, "error": {"status": 422, "title": "t", "retryable": False,
                                                                "trace": "x"}}
    assert read_job_record(failed).error.status == 422
    with pytest.raises(MalformedRecord):
        read_job_record({**legacy, "state": "succeeded", "format": JOB_FORMAT, "gone": 1})


def test_a_legacy_job_json_reads_done_as_succeeded_and_publishing_as_running():
    assert read_output_record({"status": "done", "options": OPTIONS})["status"] == SUCCEEDED
    assert read_output_record({"status": "publishing", "job_key": "k"})["status"] == "running"
    assert read_output_record({"status": "failed"})["status"] == "failed"


@pytest.mark.parametrize("reader, doc", [
    (read_job_record, {"format": "mriseg.job/2", "key": "k", "state": "succeeded"}),
    (read_output_record, {"format": "mriseg.output/2", "status": "succeeded"}),
    (read_output_record, {"format": JOB_FORMAT, "status": "succeeded"}),
    (read_output_meta, {"format": "mriseg.meta/2", "structures": {}}),
    (lambda d: read_versioned(d, JournalRecord), {"format": "mriseg.journal/2", "id": "j1", "status": "queued"}),
    (lambda d: read_versioned(d, PushRecord), {"format": "mriseg.push/2", "spec": {}}),
    (lambda d: read_versioned(d, PushRecord), {"format": JOURNAL_FORMAT, "spec": {}}),
], ids=["job/2", "output/2", "a job record's format in a job.json", "meta/2", "journal/2", "push/2",
        "a journal record's format in a held push"])
def test_a_format_this_version_does_not_know_is_refused_not_misread(reader, doc):
    with pytest.raises(UnsupportedRecordFormat) as e:
        reader(doc)
    assert e.value.status == 503 and doc["format"] in e.value.message and "newer mriseg-serve" in e.value.message


def test_a_journal_record_or_held_push_is_written_with_its_format_and_never_malformed():
    push = {"spec": {"input_uri": "s3://i/a.nii"}, "attempts": 0, "created": 1.0, "not_before": 0.0}
    assert versioned_doc(PushRecord, push) == {"format": PUSH_FORMAT, **push}
    for bad in ({**push, "attempts": -1}, {**push, "attempts": "1"}, {**push, "extra": 1}, {"spec": {}}):
        with pytest.raises(ValidationError):
            versioned_doc(PushRecord, bad)
    with pytest.raises(ValidationError):
        versioned_doc(JournalRecord, {"id": "j1", "status": "done"})
    # a legacy one (no format) is read as it is, for its reader's own rules; within /1 a stray member is an error
    assert read_versioned({"spec": {}, "attempts": "2"}, PushRecord) == {"spec": {}, "attempts": "2"}
    with pytest.raises(MalformedRecord, match="extra"):
        read_versioned({"format": PUSH_FORMAT, **push, "extra": 1}, PushRecord)


def test_writers_cannot_write_the_legacy_vocabulary_or_a_malformed_record():
    rec = JobRecord("k", "done", {}, {}, "s3://o/")
    with pytest.raises(ValidationError):
        rec.to_json()
    good = output_record(SUCCEEDED, options=OPTIONS, input=None, meta={}, software_version="1")
    for bad in ({**good, "status": "done"}, {**good, "extra": 1}, {**good, "mac": "x"},
                {**good, "options": {**OPTIONS, "fast": "no"}}):
        with pytest.raises(ValidationError):
            check_output_record(bad)
    assert check_output_record({**good, "mac": "0" * 64})["format"] == OUTPUT_FORMAT


def test_a_malformed_mriseg_json_is_never_written_and_a_legacy_one_is_read_as_it_is():
    good = {"structures": {"5": "liver"}, "models": {}, "unavailable": {}, "fast": False, "roi_subset": None,
            "demo": False, "resampling_order": 1, "input_cast": "none", "files": {}}
    assert output_meta_doc(good)["format"] == "mriseg.meta/1"
    for bad in ({**good, "resampling_order": 7}, {**good, "input_cast": "float"}, {**good, "extra": 1}):
        with pytest.raises(ValidationError):
            output_meta_doc(bad)
    assert read_output_meta({"structures": {"5": "liver"}}) == {"structures": {"5": "liver"}}


def test_the_one_builder_makes_valid_records_for_both_writers_and_the_marker():
    runner_doc = output_record("running", options=OPTIONS, site="site-a", case="c", job_key="k", attempt=1,
                               input={"uri": "s3://i/a.nii", "etag": "e", "version_id": None, "size": 3,
                                      "sha256": None},
                               meta={"structures": {"5": "liver"}, "models": {"organs": "c1"}, "demo": True,
                                     "input_cast": "none"},
                               software_version="1", timings={"download_s": 0.5}, started=0.0)
    api_doc = output_record(SUCCEEDED, options=OPTIONS, input=None, meta={"models": {"organs": "c1"}},
                            software_version="1", files=["segmentation.nii.gz"])
    failed = output_record("failed", options=OPTIONS, input={"uri": "s3://i/a.nii"}, meta={}, software_version="1",
                           models={"organs": "c1"}, error={"status": 422, "title": "t", "detail": "d",
                                                           "retryable": False})
    for doc in (runner_doc, api_doc, failed):
        OutputRecord.model_validate(json.loads(json.dumps(doc)))
        assert doc["format"] == OUTPUT_FORMAT and "mac" not in doc
    assert runner_doc["demo_models"] is True and "total_s" in runner_doc["timings"]
    assert failed["models"] == {"organs": "c1"}


# -- through real S3 ---------------------------------------------------------------------
def _stored_body(store: JobStore, key: str) -> dict:
    okey = f"{store.prefix}jobs/{key}.json"
    env = json.loads(store.client.get_object(Bucket=store.bucket, Key=okey)["Body"].read())
    SignedEnvelope.model_validate(env)
    return env["body"]


@pytest.mark.s3
def test_every_job_record_the_store_writes_validates(seaweed, unique_prefix):
    spec = JobSpec(f"s3://inbox/{unique_prefix}/a.nii", "s3://outbox/o", etag='"1"')
    key = idempotency_key(spec, {})
    store = JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings)
    store.enqueue(key, spec, {"organs": "c1"})
    assert JobRecordModel.model_validate(_stored_body(store, key)).state == "queued"
    rec, won = store.claim(key, spec, {"organs": "c1"})
    assert won and JobRecordModel.model_validate(_stored_body(store, key)).state == "running"
    store.finish(rec, SUCCEEDED, outputs={"job.json": "s3://outbox/o/job.json"})
    assert JobRecordModel.model_validate(_stored_body(store, key)).state == SUCCEEDED


@pytest.mark.s3
def test_a_legacy_done_record_still_counts_as_done_for_its_job_key(seaweed, unique_prefix):
    """A job finished before the vocabulary changed (its record says ``done``, no format) is not run again."""
    spec = JobSpec(f"s3://inbox/{unique_prefix}/a.nii", "s3://outbox/o", "site-a", etag='"1"')
    key = idempotency_key(spec, {})
    store = JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings)
    okey = f"{unique_prefix}/jobs/{key}.json"
    legacy = {"key": key, "state": "done", "spec": spec.to_dict(), "models": {}, "output_prefix": spec.output_prefix,
              "owner": None, "lease_until": None, "attempts": 1, "created": 1.0, "updated": 2.0, "error": None,
              "outputs": {"job.json": spec.output_prefix + "job.json"}}
    staging.put_json(store.signer.seal(legacy, bucket="jobs", key=okey, site="site-a"), f"s3://jobs/{okey}",
                     seaweed.settings)
    assert store.get(key).state == SUCCEEDED
    rec, won = store.claim(key, spec, {})
    assert not won and rec.state == SUCCEEDED and rec.attempts == 1 and rec.outputs == legacy["outputs"]


@pytest.mark.s3
def test_a_job_record_of_a_newer_format_is_refused_and_kept(seaweed, unique_prefix):
    spec = JobSpec(f"s3://inbox/{unique_prefix}/a.nii", "s3://outbox/o", "site-a", etag='"1"')
    key = idempotency_key(spec, {})
    store = JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings)
    okey = f"{unique_prefix}/jobs/{key}.json"
    newer = {"format": "mriseg.job/2", "key": key, "state": "succeeded", "what": "a newer version's member"}
    staging.put_json(store.signer.seal(newer, bucket="jobs", key=okey, site="site-a"), f"s3://jobs/{okey}",
                     seaweed.settings)
    with pytest.raises(UnsupportedRecordFormat, match="mriseg.job/2"):
        store.get(key)
    with pytest.raises(UnsupportedRecordFormat):
        store.claim(key, spec, {})
    assert _stored_body(store, key) == newer  # not replaced by this version's claim


@pytest.mark.s3
def test_bulk_skips_a_legacy_done_set_and_refuses_a_newer_format(seaweed, unique_prefix):
    inbox, out = f"s3://inbox/{unique_prefix}/in/", f"s3://outbox/{unique_prefix}/"
    info = {n: staging.put_bytes(b"x", f"{inbox}{n}.nii.gz", seaweed.settings) for n in ("old", "new")}
    ran = []

    def backend(spec):
        ran.append(spec.input_uri)
        return SUCCEEDED, "", "job"

    def record(name: str) -> dict:
        return {"options": JobSpec(f"{inbox}{name}.nii.gz", out).options(),
                "input": {"uri": f"{inbox}{name}.nii.gz", "etag": info[name]["ETag"]}}

    spec = JobSpec(f"{inbox}old.nii.gz", out, input_prefix=f"{unique_prefix}/in/")
    staging.put_json({"status": "done", **record("old")}, spec.output_prefix + "job.json", seaweed.settings)
    newer = JobSpec(f"{inbox}new.nii.gz", out, input_prefix=f"{unique_prefix}/in/")
    staging.put_json({"format": "mriseg.output/2", "status": "succeeded", **record("new")},
                     newer.output_prefix + "job.json", seaweed.settings)
    assert already_done(spec.output_prefix, seaweed.settings, spec.options())
    with pytest.raises(UnsupportedRecordFormat):
        already_done(newer.output_prefix, seaweed.settings, newer.options())
    items = {i.input: i for i in run_bulk(inbox, out, backend, seaweed.settings, progress=False)}
    assert items[spec.input_uri].outcome == SKIPPED and ran == []
    assert items[newer.input_uri].outcome == FAILED and "mriseg.output/2" in items[newer.input_uri].reason


@pytest.mark.s3
def test_the_api_copys_job_json_validates(seaweed, tmp_path, unique_prefix):
    """``upload_results`` ends an API output set with a job.json of the one builder, valid as written."""
    from serve.jobs.results import upload_results

    out = tmp_path / "apiout"
    out.mkdir()
    (out / "segmentations.nii.gz").write_bytes(b"seg")
    (out / "mriseg.json").write_text(json.dumps({"structures": {"5": "liver"}, "models": {"organs": "c1"},
                                                 "fast": False, "resampling_order": 1, "input_cast": "none",
                                                 "files": {"multilabel": "segmentations.nii.gz"}}))
    got = upload_results(out, f"s3://outbox/{unique_prefix}/api/", seaweed.settings)
    doc = OutputRecord.model_validate(json.loads(staging.download_bytes(got["job.json"], settings=seaweed.settings)))
    assert doc.status == SUCCEEDED and doc.files == ["segmentation.nii.gz"] and doc.input is None
