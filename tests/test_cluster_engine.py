"""ClusterEngine against a real HTTP server on 127.0.0.1: which API answers a job retries, which end it."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve.catalogue import load_catalogue
from serve.cluster.client import ApiError
from serve.cluster.engine import ClusterEngine
from serve.errors import ModelUnavailableError, ServiceUnavailableError
from serve.jobs import error_dict


class _Answers(BaseHTTPRequestHandler):
    status = 200
    content_type = "application/json"
    body = b"{}"

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(self.server.answer[0])
        self.send_header("Content-Type", self.server.answer[1])
        self.send_header("Content-Length", str(len(self.server.answer[2])))
        self.end_headers()
        self.wfile.write(self.server.answer[2])

    def log_message(self, *_args):
        pass


@pytest.fixture
def api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    server.answer = (200, "application/json", b"{}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _engine(server) -> ClusterEngine:
    return ClusterEngine(f"http://127.0.0.1:{server.server_address[1]}", {"site-a": "key-a"}, timeout_s=10)


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
    ((502, "text/html", b"<html>Bad Gateway</html>"), True),  # a proxy's page, not the API's
])
def test_api_errors_keep_whether_a_retry_can_help(api, answer, retryable):
    api.answer = answer
    with pytest.raises(ApiError) as e:
        _engine(api).model_checksums(["liver"], False, "site-a")
    assert e.value.status == answer[0] and error_dict(e.value)["retryable"] is retryable


def _structures(states: dict[str, str]) -> tuple[int, str, bytes]:
    subs = [{"name": sm.name, "state": states.get(sm.name, "ready"), "checksum": f"sha-{sm.name}"}
            for sm in list(load_catalogue().submodels) + list(load_catalogue().fast_variants)]
    return 200, "application/json", json.dumps({"submodels": subs}).encode()


def test_an_unreachable_sub_model_is_retried_not_skipped(api):
    api.answer = _structures({"muscles": "unreachable"})
    with pytest.raises(ServiceUnavailableError, match="muscles") as e:
        _engine(api).model_checksums(None, False, "site-a")  # a full run would otherwise lose muscles
    assert error_dict(e.value)["retryable"]
    api.answer = _structures({"muscles": "unavailable"})  # not deployed: a full run goes on without it
    assert "muscles" not in _engine(api).model_checksums(None, False, "site-a")
    with pytest.raises(ModelUnavailableError, match="muscles"):
        _engine(api).model_checksums(["autochthon_left"], False, "site-a")
