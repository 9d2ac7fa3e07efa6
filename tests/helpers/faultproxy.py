"""An HTTP proxy in front of a real S3 server that can answer with errors for a while.

Requests are forwarded byte for byte with their own ``Host`` header, so SigV4
signatures made for the proxy's address still verify upstream. In ``error``
mode every request gets ``503 SlowDown`` (what S3 sends when throttling); in
``500`` mode an ``InternalError``. A refused upstream connection (the server is
down) drops the client's connection, as a dead server would. With
``drop_answers`` set, that many requests are forwarded and their answers
dropped (the connection closed unanswered): a request that was served but
whose answer was lost, as behind a proxy that restarts. Any HTTP server can
stand behind it (the cluster API too).
"""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ERRORS = {
    "error": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class S3FaultProxy:
    """``with S3FaultProxy(upstream_port) as p: p.mode = "error"; ...``; ``p.injected`` counts the errors sent."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.mode = "pass"
        self.injected = 0
        self.forwarded = 0
        self.drop_answers = 0  # forward this many requests, then close their connections unanswered
        self.dropped = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _handle(self) -> None:
                body = self._body()
                if proxy.mode in _ERRORS:
                    status, code, message = _ERRORS[proxy.mode]
                    proxy.injected += 1
                    xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                           f"<Message>{message}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(upstream_host, upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except OSError:
                    self.close_connection = True  # the server is down: so is the connection
                    self.connection.close()
                    return
                finally:
                    conn.close()
                proxy.forwarded += 1
                if proxy.drop_answers > 0:
                    proxy.drop_answers -= 1
                    proxy.dropped += 1
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and not (k.lower() == "content-length" and self.command != "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "S3FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
