"""Property-based tests: the parsers behind the API and the event intake take any input and either
succeed or raise their documented 4xx error type, never anything else (which would be a 500)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.errors import MrisegError
from serve.jobs.events import EventFormatError, ObjectEvent, parse_message
from serve.jobs.spec import MAX_CASE_BYTES, case_name
from serve.storage.s3client import parse_s3_uri

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=25)

# bodies shaped like the formats we accept, with any value in any field
record = st.fixed_dictionaries({
    "eventName": st.sampled_from(["ObjectCreated:Put", "s3:ObjectCreated:CompleteMultipartUpload"]) | json_values,
    "s3": json_values | st.fixed_dictionaries({
        "bucket": json_values | st.fixed_dictionaries({"name": json_values}),
        "object": json_values | st.fixed_dictionaries({"key": json_values, "eTag": json_values,
                                                       "versionId": json_values, "size": json_values})})})
s3_body = st.fixed_dictionaries({"Records": json_values | st.lists(record | json_values, max_size=4)})
eventbridge_body = st.fixed_dictionaries({
    "detail-type": st.just("Object Created") | json_values,
    "detail": json_values | st.fixed_dictionaries({
        "bucket": json_values | st.fixed_dictionaries({"name": json_values}),
        "object": json_values | st.fixed_dictionaries({"key": json_values, "etag": json_values})})})
sns_body = st.fixed_dictionaries({"Type": st.just("Notification"),
                                  "Message": (s3_body | eventbridge_body).map(json.dumps) | json_values})
bodies = s3_body | eventbridge_body | sns_body | json_values


def _check(body) -> None:
    try:
        events = parse_message(body)
    except EventFormatError:
        return
    assert isinstance(events, list)
    for ev in events:
        assert isinstance(ev, ObjectEvent)
        assert isinstance(ev.bucket, str) and ev.bucket and isinstance(ev.key, str)
        assert ev.etag is None or isinstance(ev.etag, str)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_parse_message_accepts_or_refuses_any_structure(body):
    _check(body)


@settings(max_examples=300, deadline=None)
@given(bodies)
def test_parse_message_accepts_or_refuses_any_serialised_body(body):
    _check(json.dumps(body))
    _check(json.dumps(body).encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_parse_message_refuses_non_json_cleanly(raw):
    _check(raw)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80) | st.builds(lambda b, k: f"s3://{b}/{k}", st.text(max_size=20), st.text(max_size=40)))
def test_parse_s3_uri_returns_bucket_and_key_or_a_clear_error(uri):
    try:
        bucket, key = parse_s3_uri(uri)
    except MrisegError as e:
        assert e.status < 500 and "s3://" in e.message
        return
    assert bucket and isinstance(key, str)
    # the key is taken literally ('?' and '#' included)
    assert uri in (f"s3://{bucket}/{key}", f"s3://{bucket}") or uri.startswith(f"s3://{bucket}//")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=1100), st.sampled_from(["", "in/", "site-a/in/"]))
def test_case_names_are_safe_folder_names(key, prefix):
    case = case_name(prefix + key, prefix)
    parts = case.split("/")
    assert case and all(p and p not in (".", "..") for p in parts)
    assert len(case.encode()) <= MAX_CASE_BYTES
    assert case_name(prefix + key, prefix) == case  # deterministic: redelivery finds the same folder
