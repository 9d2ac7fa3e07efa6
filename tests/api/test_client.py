"""The /v1 API client of ``mriseg demo`` and ``mriseg bulk`` against a real HTTP server on 127.0.0.1: a dead
cluster, a proxy's answer, polling instead of one long request, which ends of a polled job say to retry, and
the Idempotency-Key that makes retrying a POST safe."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from serve.api.client import ApiError
from tests.helpers.openapi_fakes import CheckedServer, ProxyAnswer


class _Answers(BaseHTTPRequestHandler):
    """Answers ``server.answer``, or for a scripted ``(method, path)`` the next answer of its list (the last one
    repeats); every request is recorded in ``server.seen``. Requests and answers (but a :class:`ProxyAnswer`)
    are checked against the served OpenAPI schema."""

    def _answer(self):
        body = self.rfile.read(int(self.headers["Content-Length"])) if self.headers.get("Content-Length") else b""
        self.server.check_request(self, body)
        self.server.seen.append((self.command, self.path))
        self.server.keys.append(self.headers.get("Authorization"))
        self.server.idempotency_keys.append(self.headers.get("Idempotency-Key"))
        script = self.server.script.get((self.command, self.path.split("?")[0]))
        answer = (script.pop(0) if len(script) > 1 else script[0]) if script else self.server.answer
        if not isinstance(answer, ProxyAnswer):
            self.server.check_answer(self, answer[0], {"Content-Type": answer[1]}, answer[2])
        self.send_response(answer[0])
        self.send_header("Content-Type", answer[1])
        self.send_header("Content-Length", str(len(answer[2])))
        self.end_headers()
        self.wfile.write(answer[2])

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *_args):
        pass


@pytest.fixture
def api():
    server = CheckedServer(("127.0.0.1", 0), _Answers)
    server.answer = (200, "application/json", b"{}")
    server.script, server.seen, server.keys, server.idempotency_keys = {}, [], [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    server.assert_conforms()


def _problem(status: int, retryable: bool | None) -> tuple[int, str, bytes]:
    body = {"type": "about:blank", "title": "t", "status": status, "detail": "d"}
    if retryable is not None:
        body["retryable"] = retryable
    return status, "application/problem+json", json.dumps(body).encode()


@pytest.mark.parametrize("answer,retryable", [
    (_problem(429, True), True),                       # the site is at its job or request-rate limit
    (_problem(503, True), True),                       # a sub-model down
    (_problem(409, False), False),                     # a model not installed: retrying cannot help
    (_problem(400, None), False),
    (ProxyAnswer(502, "text/html", b"<html>Bad Gateway</html>"), True),  # a proxy's page, not the API's
])
def test_api_errors_keep_whether_a_retry_can_help(api, answer, retryable):
    from serve.api.client import ApiClient
    from serve.jobs.runner import error_dict

    api.answer = answer
    with pytest.raises(ApiError) as e:
        ApiClient(f"http://127.0.0.1:{api.server_address[1]}", "key", timeout_s=5).job("x")
    assert e.value.status == answer[0] and error_dict(e.value)["retryable"] is retryable


def test_the_api_client_turns_a_dead_cluster_or_a_proxys_json_into_a_retryable_api_error(api):
    """``mriseg demo`` gets an ApiError it handles, not httpx's or a KeyError's traceback."""
    import socket

    from serve.api.client import ApiClient, ApiError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(ApiError, match="Cluster unreachable") as dead:
        ApiClient(f"http://127.0.0.1:{closed}", "key", timeout_s=5).job("x")
    assert dead.value.status == 503 and dead.value.retryable

    # a proxy's JSON, not a problem
    api.answer = ProxyAnswer(502, "application/json", json.dumps(["bad gateway"]).encode())
    with pytest.raises(ApiError) as proxied:
        ApiClient(f"http://127.0.0.1:{api.server_address[1]}", "key", timeout_s=5).job("x")
    assert proxied.value.status == 502 and proxied.value.retryable


def _job(status: str, error: dict | None = None) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps({"id": "j1", "status": status, "error": error}).encode()


def test_the_api_client_polls_a_job_it_submitted_instead_of_holding_one_request_open(api):
    """A poll meeting a restarting cluster is repeated; the upload itself is never sent twice."""
    from serve.api.client import ApiClient

    api.script = {("POST", "/v1/segmentations/upload"): [(202, "application/json", b'{"id": "j1", "status": "queued"}')],
                  ("GET", "/v1/segmentations/j1"): [_problem(503, True), _job("running"), _job("succeeded")]}
    client = ApiClient(f"http://127.0.0.1:{api.server_address[1]}", "key", timeout_s=30, poll_s=0.01)
    assert client.segment_upload(b"x", "a.nii.gz")["status"] == "succeeded"
    posts = [path for method, path in api.seen if method == "POST"]
    assert len(posts) == 1 and "wait=false" in posts[0]
    assert [m for m, _ in api.seen].count("GET") == 3


@pytest.mark.parametrize("answers,status,retryable,cancelled", [
    ([_job("failed", {"status": 422, "title": "Unreadable volume", "detail": "d", "retryable": False})],
     422, False, False),                                    # the job's own failure, as the API would answer it
    ([_job("cancelled")], 409, False, False),               # cancelled by its site: not retried
    ([_problem(404, False)], 503, True, False),             # the router lost it: submitting again is right
    ([_job("running")], 504, True, True),                   # never finishes: cancelled before the caller retries
])
def test_a_polled_job_that_does_not_succeed_is_an_api_error_that_says_whether_to_retry(
        api, answers, status, retryable, cancelled):
    from serve.api.client import ApiClient

    api.script = {("GET", "/v1/segmentations/j1"): answers, ("DELETE", "/v1/segmentations/j1"): [_job("cancelled")]}
    client = ApiClient(f"http://127.0.0.1:{api.server_address[1]}", "key", timeout_s=0.5, poll_s=0.05)
    with pytest.raises(ApiError) as e:
        client.wait("j1")
    assert (e.value.status, e.value.retryable) == (status, retryable)
    assert (("DELETE", "/v1/segmentations/j1") in api.seen) is cancelled


def test_the_api_client_sends_one_idempotency_key_per_job_the_same_on_each_retry(api):
    """Retrying a POST is safe only with the key of its first try: the cluster then answers with the job that
    try made. A 4xx is the answer, not retried."""
    from serve.api.client import ApiClient

    queued = (202, "application/json", b'{"id": "j1", "status": "queued"}')
    gateway = ProxyAnswer(502, "text/html", b"<html>Bad Gateway</html>")
    api.script = {("POST", "/v1/segmentations"): [_problem(503, True), gateway, _problem(429, True), queued]}
    client = ApiClient(f"http://127.0.0.1:{api.server_address[1]}", "key", timeout_s=30, poll_s=0.01)
    assert client.submit({"input": "s3://b/site-a/a.nii.gz"})["id"] == "j1"
    first = list(api.idempotency_keys)
    assert len(first) == 4 and first[0] and len(set(first)) == 1
    client.submit({"input": "s3://b/site-a/b.nii.gz"})
    assert api.idempotency_keys[4] not in first  # another job, another key
    client.submit({"input": "s3://b/site-a/c.nii.gz"}, key="my-key-1")
    assert api.idempotency_keys[5] == "my-key-1"

    api.script = {("POST", "/v1/segmentations"): [_problem(422, False)]}
    with pytest.raises(ApiError) as refused:
        client.submit({"input": "s3://b/site-a/d.nii.gz"})
    assert refused.value.status == 422 and len(api.idempotency_keys) == 7


def test_the_api_client_gives_up_retrying_at_its_deadline_with_the_last_answer(api):
    from serve.api.client import ApiClient

    api.script = {("POST", "/v1/segmentations"): [_problem(503, True)]}
    client = ApiClient(f"http://127.0.0.1:{api.server_address[1]}", "key", timeout_s=2, poll_s=0.05)
    t = time.monotonic()
    with pytest.raises(ApiError) as e:
        client.submit({"input": "s3://b/site-a/a.nii.gz"})
    assert e.value.status == 503 and e.value.retryable and time.monotonic() - t < 4
    # pauses of 0.05 s doubling: at most six tries fit in 2 s (fewer where each request is slow)
    assert 2 <= len(api.idempotency_keys) <= 6 and len(set(api.idempotency_keys)) == 1
