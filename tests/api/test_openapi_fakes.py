"""The referee of the tests' fake APIs (tests/helpers/openapi_fakes.py): requests and answers the served OpenAPI schema
allows pass, and each kind it does not allow fails with the path and what is wrong, both when checked directly
and when a fake server sends or gets it."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler

import httpx
import pytest

from serve.api.client import ApiClient, ApiError
from tests.helpers.openapi_fakes import CheckedServer, OpenApiReferee, SchemaMismatch, served_schema

AUTH = {"Authorization": "Bearer key-site-a"}
JSON = {"Content-Type": "application/json"}
PROBLEM = {"Content-Type": "application/problem+json"}


def _doc(**fields) -> bytes:
    return json.dumps(fields).encode()


def _problem(status: int, **leave_out) -> bytes:
    doc = {"type": "about:blank", "title": "t", "status": status, "detail": "d", "retryable": True}
    return json.dumps({k: v for k, v in doc.items() if k not in leave_out}).encode()


@pytest.fixture(scope="module")
def referee() -> OpenApiReferee:
    return OpenApiReferee()


def test_the_document_is_the_ingress_apps_and_declares_what_the_fakes_stand_in_for():
    from serve.api.app import create_app

    doc = served_schema()
    assert doc == create_app().openapi()  # tests/api/test_schemathesis.py: the stack serves this very document
    assert {"/v1/segmentations", "/v1/segmentations/upload", "/v1/segmentations/{job_id}"} <= set(doc["paths"])


@pytest.mark.parametrize("method,target,headers,body", [
    ("POST", "/v1/segmentations", {**AUTH, **JSON, "Idempotency-Key": "0f3a-b"}, _doc(input="s3://b/a.nii.gz")),
    ("POST", "/v1/segmentations?wait=false", {"X-API-Key": "k", **JSON}, _doc(input="s3://b/a", fast=True)),
    ("POST", "/v1/segmentations/upload?filename=a.nii.gz&roi_subset=liver,spleen&resampling_order=3&wait=false",
     {**AUTH, "Content-Type": "application/octet-stream"}, b"\x00nifti"),
    ("GET", "/v1/segmentations/j1", AUTH, b""),
    ("DELETE", "/v1/segmentations/j1", AUTH, b""),
    ("GET", "/healthz", {}, b""),
])
def test_requests_the_schema_allows_pass(referee, method, target, headers, body):
    referee.check_request(method, target, headers, body)


@pytest.mark.parametrize("method,target,headers,body,mismatch", [
    ("PUT", "/v1/segmentations/j1", AUTH, b"", r"PUT /v1/segmentations/j1: the schema declares only \['DELETE', "),
    ("GET", "/v1/jobs/j1", AUTH, b"", "GET /v1/jobs/j1: no path of the schema matches"),
    ("GET", "/v1/segmentations/j1", {}, b"", "GET /v1/segmentations/j1 .request.: no credentials"),
    ("GET", "/v1/segmentations/j1", {"Authorization": "Bearer "}, b"", "no credentials"),
    ("POST", "/v1/segmentations", {**AUTH, **JSON}, _doc(fast=True), "body: 'input' is a required property"),
    ("POST", "/v1/segmentations", {**AUTH, **JSON}, _doc(input="s3://b/a", wait=True),
     "body: Additional properties are not allowed"),
    ("POST", "/v1/segmentations", {**AUTH, **JSON}, _doc(input="s3://b/a", resampling_order=7),
     "body at resampling_order: 7 is greater than the maximum of 5"),
    ("POST", "/v1/segmentations", {**AUTH, **JSON}, b"", "the schema requires a body"),
    ("POST", "/v1/segmentations", {**AUTH, **JSON}, b"{", "is not JSON"),
    ("POST", "/v1/segmentations", {**AUTH, "Content-Type": "text/plain"}, b"s3://b/a", "body of type 'text/plain'"),
    ("POST", "/v1/segmentations", {**AUTH, **JSON, "Idempotency-Key": "two words"}, _doc(input="s3://b/a"),
     "header 'Idempotency-Key': 'two words' does not match"),
    ("POST", "/v1/segmentations?wait=maybe", {**AUTH, **JSON}, _doc(input="s3://b/a"),
     "query 'wait': 'maybe' is not of type 'boolean'"),
    ("POST", "/v1/segmentations/upload?name=a.nii.gz", {**AUTH, "Content-Type": "application/octet-stream"}, b"x",
     r"query parameter\(s\) \['name'\] that the schema does not declare"),
    ("GET", "/v1/segmentations/j1", {**AUTH, **JSON}, b"{}", "a body, which the schema does not declare"),
])
def test_a_request_the_schema_does_not_allow_fails_naming_the_path_and_the_mismatch(
        referee, method, target, headers, body, mismatch):
    with pytest.raises(SchemaMismatch, match=mismatch):
        referee.check_request(method, target, headers, body)


@pytest.mark.parametrize("method,target,status,headers,body", [
    ("POST", "/v1/segmentations", 202, JSON, _doc(id="j1", status="queued")),
    ("POST", "/v1/segmentations", 200, {**JSON, "Idempotent-Replayed": "true"}, _doc(id="j1", status="queued")),
    ("GET", "/v1/segmentations/j1?x=1", 200, JSON, _doc(id="j1", status="running")),
    ("GET", "/v1/segmentations/j1", 404, {"Content-Type": "application/problem+json; charset=utf-8"}, _problem(404)),
    ("DELETE", "/v1/segmentations/j1", 503, PROBLEM, _problem(503, retryable=None)),
])
def test_answers_the_schema_allows_pass(referee, method, target, status, headers, body):
    referee.check_response(method, target, status, headers, body)


@pytest.mark.parametrize("method,target,status,headers,body,mismatch", [
    ("GET", "/v1/segmentations/j1", 201, JSON, _doc(id="j1"),
     r"GET /v1/segmentations/j1 answered 201: a status the schema does not declare .*\['200', '4XX', '5XX'\]"),
    ("GET", "/v1/segmentations/j1", 200, JSON, b'["j1", "running"]', "body: .* is not of type 'object'"),
    ("GET", "/v1/segmentations/j1", 503, PROBLEM, _problem(503, detail=None), "body: 'detail' is a required"),
    ("GET", "/v1/segmentations/j1", 429, PROBLEM, _doc(type="about:blank", title="t", status="429", detail="d"),
     "body at status: '429' is not of type 'integer'"),
    ("GET", "/v1/segmentations/j1", 503, JSON, _problem(503), "Content-Type 'application/json'; the schema declares"),
    ("GET", "/v1/segmentations/j1", 500, PROBLEM, b"<html>oops</html>", "body is not JSON"),
    ("POST", "/v1/segmentations", 200, {**JSON, "Idempotent-Replayed": "yes"}, _doc(id="j1"),
     "header 'Idempotent-Replayed': 'yes' is not one of"),
    # the job body is typed (serve.api.models.SegmentationJob): a job without its id, or in a state the API
    # does not have, is not a job the API answers
    ("GET", "/v1/segmentations/j1", 200, JSON, _doc(status="running"), "body: 'id' is a required property"),
    ("GET", "/v1/segmentations/j1", 200, JSON, _doc(id="j1", status="done"),
     "body at status: 'done' is not one of \\['queued', 'running', 'succeeded', 'failed', 'cancelled'\\]"),
    ("GET", "/v1/segmentations/j1", 200, JSON, _doc(id="j1"), "body: 'status' is a required property"),
    ("POST", "/v1/segmentations", 202, JSON, _doc(status="queued"), "body: 'id' is a required property"),
    ("POST", "/v1/segmentations", 200, {**JSON, "Idempotent-Replayed": "true"}, _doc(id="j1", status="accepted"),
     "body at status: 'accepted' is not one of"),
    ("POST", "/v1/segmentations/upload", 202, JSON, _doc(job_id="j1", status="queued"),
     "body: 'id' is a required property"),
    ("DELETE", "/v1/segmentations/j1", 200, JSON, _doc(id=1, status="cancelled"), "body at id: 1 is not of type"),
    ("GET", "/v1/segmentations/j1", 200, JSON, _doc(id="j1", status="failed", error={"detail": "d"}),
     "body at error: .* is not valid under any of the given schemas"),
])
def test_an_answer_the_schema_does_not_allow_fails_naming_the_path_and_the_mismatch(
        referee, method, target, status, headers, body, mismatch):
    with pytest.raises(SchemaMismatch, match=mismatch):
        referee.check_response(method, target, status, headers, body)


class _Fixed(BaseHTTPRequestHandler):
    """Answers every request with ``server.answer`` ``(status, content type, body)``, checked by its server."""

    def _answer(self):
        self.server.check_request(self, self.rfile.read(int(self.headers.get("Content-Length", 0))))
        status, content_type, body = self.server.answer
        self.server.check_answer(self, status, {"Content-Type": content_type}, body)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *_args):
        pass


@pytest.fixture
def fixed():
    server = CheckedServer(("127.0.0.1", 0), _Fixed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_fake_server_keeps_each_wrong_answer_it_sent_and_fails_the_test_with_them(fixed):
    """The wiring the client and bulk fakes use: the client still gets the scripted answer (so the test runs on),
    and the fixture's ``assert_conforms`` then fails naming the path and the mismatch."""
    fixed.answer = (200, "application/json", b'["j1", "succeeded"]')  # a job that is not a job object
    client = ApiClient(f"http://127.0.0.1:{fixed.server_address[1]}", "key", timeout_s=5)
    assert client.job("j1") == ["j1", "succeeded"]
    fixed.answer = (418, "application/problem+json", _problem(418, detail=None))
    with pytest.raises(ApiError):
        client.job("j2")
    with pytest.raises(SchemaMismatch) as e:
        fixed.assert_conforms()
    assert str(e.value).splitlines()[1:] == [
        "GET /v1/segmentations/j1 answered 200: body: ['j1', 'succeeded'] is not of type 'object'",
        "GET /v1/segmentations/j2 answered 418: body: 'detail' is a required property"]


def test_a_fake_server_keeps_each_request_the_schema_does_not_allow(fixed):
    fixed.answer = (202, "application/json", b'{"id": "j1", "status": "queued"}')
    url = f"http://127.0.0.1:{fixed.server_address[1]}"
    httpx.post(f"{url}/v1/segmentations", json={"input": "s3://b/a.nii.gz"}, headers=AUTH)
    fixed.assert_conforms()
    httpx.post(f"{url}/v1/segmentations", json={"input": "s3://b/a.nii.gz", "roi": ["liver"]},
               headers={"Idempotency-Key": "k1"})
    with pytest.raises(SchemaMismatch) as e:
        fixed.assert_conforms()
    assert [line.split(": ", 1)[0] for line in str(e.value).splitlines()[1:]] == [
        "POST /v1/segmentations (request)"]
    assert "no credentials" in str(e.value)


def test_a_fake_server_answering_a_job_without_its_id_or_with_an_unknown_state_fails_the_test(fixed):
    """What a fake job API could drift to and the client would not notice: the job has no ``id``, or a
    state the API never answers (the router's word before the one vocabulary)."""
    client = ApiClient(f"http://127.0.0.1:{fixed.server_address[1]}", "key", timeout_s=5)
    fixed.answer = (200, "application/json", b'{"status": "succeeded"}')
    client.job("j1")
    fixed.answer = (200, "application/json", b'{"id": "j2", "status": "done"}')
    client.job("j2")
    with pytest.raises(SchemaMismatch) as e:
        fixed.assert_conforms()
    assert str(e.value).splitlines()[1:] == [
        "GET /v1/segmentations/j1 answered 200: body: 'id' is a required property",
        "GET /v1/segmentations/j2 answered 200: body at status: 'done' is not one of "
        "['queued', 'running', 'succeeded', 'failed', 'cancelled']"]
