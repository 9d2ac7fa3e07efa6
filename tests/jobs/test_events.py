"""Event parsing: S3 Records (SQS/MinIO), SNS-wrapped, EventBridge, test events, suffix rules, duplicates."""

from __future__ import annotations

import json

import pytest

from serve.errors import MrisegError
from serve.jobs.events import EventFormatError, ObjectEvent, is_volume_key, parse_message, volume_events


def s3_record(key: str, name: str = "ObjectCreated:Put", etag: str = "abc", bucket: str = "inbox") -> dict:
    return {"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": name,
            "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 10, "eTag": etag,
                                                          "sequencer": "00A1"}}}


def test_url_encoded_record_keys_are_decoded():
    body = json.dumps({"Records": [s3_record("site+a/in/patient%C3%A9+01%2B2.nii.gz")]})
    [ev] = parse_message(body)
    assert ev == ObjectEvent("inbox", "site a/in/patienté 01+2.nii.gz", "abc", None, 10, "ObjectCreated:Put", "00A1")
    assert ev.uri == "s3://inbox/site a/in/patienté 01+2.nii.gz"


def test_test_event_and_removals_are_ignored():
    assert parse_message({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "inbox"}) == []
    assert parse_message({"Records": [s3_record("a.nii", name="ObjectRemoved:Delete")]}) == []


def test_s3_records_wrapped_in_an_sns_notification_are_unwrapped():
    inner = json.dumps({"Records": [s3_record("x/y.mha")]})
    body = json.dumps({"Type": "Notification", "MessageId": "1", "TopicArn": "arn:aws:sns:x", "Message": inner})
    assert [e.key for e in parse_message(body)] == ["x/y.mha"]


def test_eventbridge_object_created_is_parsed_and_other_types_ignored():
    msg = {"version": "0", "detail-type": "Object Created", "source": "aws.s3",
           "detail": {"bucket": {"name": "inbox"},
                      "object": {"key": "raw/2023-08-08T14:03:40.zip", "size": 5, "etag": "e-12",
                                 "version-id": "v1"}, "reason": "CompleteMultipartUpload"}}
    [ev] = parse_message(msg)
    assert (ev.bucket, ev.key, ev.version_id, ev.etag) == ("inbox", "raw/2023-08-08T14:03:40.zip", "v1", "e-12")
    assert parse_message({**msg, "detail-type": "Object Deleted"}) == []


def test_only_volume_suffixes_count_as_volume_keys():
    for ok in ("a.nii", "a.nii.gz", "A.NII.GZ", "b.mha", "c.nrrd", "dicom/series.zip"):
        assert is_volume_key(ok)
    for no in ("a.txt", "folder/", "a.nii.gz.tmp", "job.json", "preview.png", "a.mhd"):
        assert not is_volume_key(no)


def test_multipart_duplicates_collapse_to_one_event():
    body = {"Records": [s3_record("big.nii.gz", "ObjectCreated:CompleteMultipartUpload", "d41d-3"),
                        s3_record("big.nii.gz", "ObjectCreated:CompleteMultipartUpload", "d41d-3"),
                        s3_record("notes.txt"), s3_record("big.nii.gz", etag="other-version")]}
    evs = volume_events(parse_message(body))
    assert [(e.key, e.etag) for e in evs] == [("big.nii.gz", "d41d-3"), ("big.nii.gz", "other-version")]


@pytest.mark.parametrize("bad", ["not json", "[1, 2]", json.dumps({"hello": 1}),
                                 json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {}}]})])
def test_unrecognised_messages_are_clear_errors(bad):
    with pytest.raises(EventFormatError):
        parse_message(bad)


def test_inbox_rules_map_events_to_site_jobs():
    from serve.jobs.rules import InboxRule, specs_for_events

    rules = [InboxRule(bucket="inbox", prefix="a/in/", site="site-a", output_root="s3://out/r"),
             InboxRule(bucket="inbox", prefix="b/in/", site="site-b", output_root="s3://out/r")]
    body = {"Records": [s3_record("a/in/x/case1.nii.gz"), s3_record("b/in/case2.mha"), s3_record("c/in/z.nii"),
                        s3_record("a/in/readme.md")]}
    specs, ignored = specs_for_events(parse_message(body), rules)
    assert [(s.site, s.output_prefix) for s in specs] == [("site-a", "s3://out/r/site-a/x/case1/"),
                                                          ("site-b", "s3://out/r/site-b/case2/")]
    assert ignored == 2


def test_inbox_rules_take_whole_segments_and_no_dot_segments():
    """The intake reads inputs with its own credentials: a key must not climb out of the inbox, even URL-encoded."""
    from serve.jobs.rules import InboxRule, specs_for_events

    rules = [InboxRule(bucket="consortium", prefix="site-a/inbox/", site="site-a", output_root="s3://out/r"),
             # a prefix without its trailing slash
             InboxRule(bucket="consortium", prefix="site-c", site="site-c", output_root="s3://out/r")]
    body = {"Records": [s3_record("site-a/inbox/%2E%2E/%2E%2E/site-b/inbox/patient.nii.gz", bucket="consortium"),
                        s3_record("site-a/inbox/./x.nii.gz", bucket="consortium"),
                        s3_record("site-cd/secret.nii.gz", bucket="consortium"),
                        s3_record("site-c/ok.nii.gz", bucket="consortium"),
                        s3_record("site-a/inbox/sub/ok..name.nii.gz", bucket="consortium")]}
    specs, ignored = specs_for_events(parse_message(body), rules)
    assert [s.input_uri for s in specs] == ["s3://consortium/site-c/ok.nii.gz",
                                            "s3://consortium/site-a/inbox/sub/ok..name.nii.gz"]
    assert ignored == 3


def test_deeply_nested_body_is_a_format_error():
    with pytest.raises(EventFormatError, match="too deeply"):
        parse_message("[" * 30000 + "]" * 30000)


def test_sns_envelopes_nested_past_the_limit_are_a_format_error():
    """A body that json.loads takes but that wraps envelope in envelope must not overflow the stack."""
    from serve.jobs.events import MAX_ENVELOPES

    inner = json.dumps({"Records": [s3_record("a/x.nii.gz")]})
    body = inner
    for _ in range(MAX_ENVELOPES):
        body = json.dumps({"Type": "Notification", "Message": body})
    assert [e.key for e in parse_message(body)] == ["a/x.nii.gz"]
    deep: dict = {"Records": []}
    for _ in range(5000):
        deep = {"Type": "Notification", "Message": deep}
    with pytest.raises(EventFormatError, match="SNS envelopes"):
        parse_message(deep)


def test_a_key_that_cannot_name_an_output_is_ignored_alone(caplog):
    """One bad key must neither stop its neighbours nor become a job that could never record its failure."""
    from serve.jobs.rules import InboxRule, specs_for_events

    rules = [InboxRule(bucket="inbox", prefix="a/", site="site-a", output_root="s3://out/r")]
    body = {"Records": [s3_record("a/good.nii"), s3_record("a/bad%00.nii"), s3_record("a/" + "x" * 1100 + ".nii")]}
    specs, ignored = specs_for_events(parse_message(body), rules)
    assert [s.input_uri for s in specs] == ["s3://inbox/a/good.nii"] and ignored == 2
    assert "cannot name an output" in caplog.text and "bad" not in caplog.text


def test_a_job_whose_key_is_unusable_still_fails_with_a_reason():
    from serve.errors import MrisegError
    from serve.jobs.runner import JobRunner
    from serve.jobs.spec import JobSpec

    runner = JobRunner.__new__(JobRunner)  # _fail_unclaimed touches no store or engine
    out = runner._fail_unclaimed(JobSpec("s3://in/a/bad\x01.nii", "s3://out/r"), MrisegError("input unusable"))
    assert out.state == "failed" and out.error["detail"] == "input unusable" and out.output_prefix == ""


RULE = {"bucket": "in", "prefix": "a/", "site": "a", "output_root": "s3://out/x"}


@pytest.mark.parametrize("change,says", [
    ({"prefx": "a/"}, "unknown setting"),                          # a typo is not a silent default
    ({"site": None}, "must be strings"),
    ({"fast": "false"}, "fast must be true or false"),             # a string would have been truthy
    ({"roi_subset": "liver"}, "list of names"),                    # a string would have become letters
    ({"roi_subset": ["livr"]}, "livr"),
    ({"outputs": ["preveiw"]}, "outputs must name some of"),
    ({"resampling_order": 6}, "resampling_order must be a whole number from 0 to 5"),
    ({"resampling_order": "3"}, "resampling_order must be a whole number from 0 to 5"),
    ({"resampling_order": True}, "resampling_order must be a whole number from 0 to 5"),
    ({"output_root": "/tmp/out"}, "s3://"),
    ({"prefix": "", "output_root": "s3://in/results"}, "inside the inbox"),  # outputs would be ingested again
    ({"output_root": "s3://in/a/out"}, "inside the inbox"),
])
def test_inbox_rules_are_checked_when_loaded(change, says):
    from serve.jobs.rules import InboxRule

    with pytest.raises(MrisegError, match=says):
        InboxRule.from_mapping({**RULE, **change})
    assert InboxRule.from_mapping({**RULE, "roi_subset": ["spleen", "liver"], "fast": True}).roi_subset == \
        ("spleen", "liver")


@pytest.mark.parametrize("change,says", [
    ({"rules": {"a": RULE}}, "must be a list"),
    ({"concurrency": "two"}, "concurrency must be an integer"),
    ({"jobs": "/tmp/jobs"}, "s3://"),
    ({"record_key_file": ["/etc/mriseg/record.key"]}, "record_key_file must be a file path"),
    ({"queue": "http://q"}, "unknown setting"),
    ({"queue_url": "http://q", "sqs_options": {"visibility_timeout": 60}}, "unknown SQS setting"),
    # the API serves no per-structure masks, so every such event job in the cluster would fail
    ({"rules": [{**RULE, "outputs": ["multilabel", "per_structure"]}]}, "per_structure"),
    # one site's inbox inside another's: either could push (or be sent) the other's objects
    ({"rules": [RULE, {**RULE, "prefix": "a/b/", "site": "b"}]}, "nest"),
    ({"rules": [RULE, {**RULE, "prefix": "", "site": "b", "output_root": "s3://out/y"}]}, "nest"),
    # site a's outputs written into site b's inbox would be segmented again as b's
    ({"rules": [{**RULE, "output_root": "s3://in/b/out"}, {**RULE, "prefix": "b/", "site": "b"}]}, "inside site 'b'"),
])
def test_event_settings_are_checked_when_loaded(change, says, monkeypatch):
    from serve.jobs.intake_settings import ENV, IntakeSettings

    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MrisegError, match=says):
        IntakeSettings.from_mapping({"jobs": "s3://j/p", "rules": [RULE], **change})


def test_sites_with_inboxes_side_by_side_or_one_site_with_nested_inboxes_are_accepted(monkeypatch):
    from serve.jobs.intake_settings import ENV, IntakeSettings

    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    rules = [RULE, {**RULE, "prefix": "ab/", "site": "b"}, {**RULE, "prefix": "a/deep/", "fast": True},
             {**RULE, "bucket": "in2", "prefix": "", "site": "b"}]  # "ab/" is not inside "a/"
    assert len(IntakeSettings.from_mapping({"jobs": "s3://j/p", "rules": rules}).rules) == 4


def test_unparseable_rules_file_is_a_clear_error(tmp_path, monkeypatch):
    from serve.jobs.intake_settings import ENV, IntakeSettings

    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "rules.yaml").write_text("- {bucket: in\n")
    with pytest.raises(MrisegError, match="not valid JSON/YAML"):
        IntakeSettings.from_mapping({"jobs": "s3://j/p", "rules_file": str(tmp_path / "rules.yaml")})


# sites a and b of a tenants file: the intake's rules must lie inside what it grants them
TENANTS = {"sites": {"a": {"keys": ["a" * 16], "prefixes": ["s3://in/a/", "s3://out/x/a/"]},
                     "b": {"keys": ["b" * 16], "prefixes": ["s3://in/b", "s3://out/x/b/", "s3://in2"]}}}


@pytest.mark.parametrize("rule,says", [
    ({**RULE, "site": "c"}, "no such site"),                                   # a site the tenants do not know
    ({**RULE, "prefix": "b/"}, "the inbox s3://in/b/ is not inside"),           # another site's inbox
    ({**RULE, "prefix": "ab/"}, "the inbox s3://in/ab/ is not inside"),         # a sibling is not inside
    ({**RULE, "prefix": ""}, "the inbox s3://in/ is not inside"),               # the whole bucket
    ({**RULE, "prefix": "a"}, None),                                           # "a" is "a/": inside
    ({**RULE, "bucket": "in3"}, "the inbox s3://in3/a/ is not inside"),         # a bucket the site has nothing in
    ({**RULE, "output_root": "s3://out/y"}, "outputs would go under s3://out/y/a/"),
    ({**RULE, "output_root": "s3://out/x/a/../b"}, "outputs would go under"),   # no way out by '..'
    ({**RULE, "site": "b", "prefix": "b/", "output_root": "s3://out/x/"}, None),  # out/x/b/ is b's
    ({**RULE, "site": "b", "bucket": "in2", "prefix": "", "output_root": "s3://out/x"}, None),  # b has all of in2
])
def test_rules_are_checked_against_the_tenants_at_start(rule, says, monkeypatch):
    from serve.jobs.intake_settings import ENV, IntakeSettings
    from serve.router.tenancy import Tenancy

    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    settings = {"jobs": "s3://j/p", "rules": [rule]}
    tenancy = Tenancy.from_mapping(TENANTS)
    if says is None:
        assert IntakeSettings.from_mapping(settings, tenancy=tenancy).rules[0].site == rule["site"]
        return
    with pytest.raises(MrisegError, match=says) as e:
        IntakeSettings.from_mapping(settings, tenancy=tenancy)
    assert f"site {rule['site']!r}" in e.value.message
    assert IntakeSettings.from_mapping(settings).rules  # without the tenants nothing more is checked


@pytest.mark.parametrize("jobs,holder", [
    ("s3://in/a/_jobs/", "a"),       # inside a site's prefix: the site could forge the records the intake trusts
    ("s3://in/a", "a"),              # the prefix itself
    ("s3://in/", "a"),               # around a site's prefix: the site's objects would lie among the records
    ("s3://in2/records/", "b"),      # b holds the whole bucket in2
    ("s3://out/x/b/jobs", "b"),
    ("s3://jobs/records/", None),    # a bucket of its own
    ("s3://out/x/records/", None),   # beside the sites' folders, not inside one
    ("s3://in/ab/", None),           # "ab/" is not inside "a/" or "b/"
])
def test_the_job_record_prefix_lies_outside_every_sites_prefixes(jobs, holder, monkeypatch):
    from serve.jobs.intake_settings import ENV, IntakeSettings
    from serve.router.tenancy import Tenancy

    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    tenancy = Tenancy.from_mapping(TENANTS)
    if holder is None:
        assert IntakeSettings.from_mapping({"jobs": jobs, "rules": [RULE]}, tenancy=tenancy).jobs == jobs
        return
    with pytest.raises(MrisegError, match=f"job-record prefix {jobs} overlaps site '{holder}'"):
        IntakeSettings.from_mapping({"jobs": jobs, "rules": [RULE]}, tenancy=tenancy)


@pytest.mark.parametrize("a,b,nest", [
    ("s3://in/a/", "s3://in/a", True),        # the same prefix, written with and without the slash
    ("s3://in/a/jobs/", "s3://in/a/", True),  # one inside the other, either way round
    ("s3://in/", "s3://in/a/", True),         # the whole bucket holds every prefix in it
    ("s3://in/ab/", "s3://in/a/", False),     # whole path segments: "ab/" is not inside "a/"
    ("s3://in2/a/", "s3://in/a/", False),     # another bucket
])
def test_prefixes_nest_on_whole_path_segments(a, b, nest):
    from serve.jobs.rules import prefixes_nest

    assert prefixes_nest(a, b) is nest and prefixes_nest(b, a) is nest


def test_the_site_keys_of_earlier_versions_are_ignored_with_a_warning(monkeypatch, caplog):
    """The intake reaches the router by Ray handle; a config still naming the keys starts, and says to remove them."""
    from serve.jobs.intake_settings import ENV, IntakeSettings

    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MRISEG_EVENTS_SITE_KEYS_FILE", "/nonexistent/site-keys.json")  # not read any more
    with caplog.at_level("WARNING", logger="serve.jobs.intake_settings"):
        settings = IntakeSettings.from_mapping({"jobs": "s3://j/p", "rules": [RULE], "api_url": "http://x:8000",
                                                "site_keys_file": "/nonexistent/site-keys.json",
                                                "site_keys": {"a": "k" * 16}})
    assert settings.rules[0].site == "a" and not hasattr(settings, "site_keys")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "api_url, site_keys, site_keys_file are no longer used" in warned and "k" * 16 not in warned


def test_an_inbox_rule_names_the_resampling_order_of_its_jobs():
    """A site's event jobs are resampled as its rule says (TotalSegmentator's -ro), TotalSegmentator's 1 unless."""
    from serve.jobs.rules import InboxRule

    ev = volume_events(parse_message({"Records": [s3_record("a/scan.nii.gz", bucket="in")]}))[0]
    assert InboxRule.from_mapping(RULE).spec(ev).resampling_order == 1
    spec = InboxRule.from_mapping({**RULE, "resampling_order": 3}).spec(ev)
    assert spec.resampling_order == 3 and spec.options()["resampling_order"] == 3
