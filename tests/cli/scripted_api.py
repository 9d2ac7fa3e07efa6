"""A scripted stand-in for the cluster API, for the ``serve_api`` fixture (tests/cli/conftest.py)."""

from __future__ import annotations

import json
import socket
from http.server import BaseHTTPRequestHandler

from tests.helpers.openapi_fakes import ProxyAnswer


class Scripted(BaseHTTPRequestHandler):
    """POST /v1/segmentations answers from ``server.posts`` (``"drop"``: close without answering), GET
    from ``server.gets``; each list's last answer repeats. Each POST's Idempotency-Key is kept in
    ``server.keys``. Requests and answers (but a :class:`ProxyAnswer`) are checked against the served
    OpenAPI schema."""

    def do_POST(self):  # noqa: N802 - http.server's name
        self.server.check_request(self, self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.server.posted += 1
        self.server.keys.append(self.headers.get("Idempotency-Key"))
        answer = self.server.posts.pop(0) if len(self.server.posts) > 1 else self.server.posts[0]
        if answer == "drop":  # the router took it, then the connection went (a proxy, a restart)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(answer)

    def do_GET(self):  # noqa: N802
        self.server.check_request(self, b"")
        gets = self.server.gets
        self._send(gets.pop(0) if len(gets) > 1 else gets[0])

    def _send(self, answer: tuple[int, dict] | ProxyAnswer) -> None:
        if isinstance(answer, ProxyAnswer):
            status, content_type, body = answer
        else:  # the API's own answer: every error is a problem document
            status, body = answer[0], json.dumps(answer[1]).encode()
            content_type = "application/problem+json" if status >= 400 else "application/json"
            self.server.check_answer(self, status, {"Content-Type": content_type}, body)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status in (429, 503):
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):
        pass


def problem(status: int, title: str, detail: str = "d") -> tuple[int, dict]:
    return status, {"type": "about:blank", "title": title, "status": status, "detail": detail}
