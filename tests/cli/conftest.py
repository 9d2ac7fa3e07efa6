"""Fixtures of tests/cli/: a scripted cluster API for ``mriseg bulk``."""

from __future__ import annotations

import threading

import pytest

from tests.cli.scripted_api import Scripted
from tests.helpers.openapi_fakes import CheckedServer


@pytest.fixture
def serve_api():
    """``serve_api(posts, port=0, gets=None)``: a scripted cluster API on 127.0.0.1 (``port`` 0: a free one);
    GETs answer the job succeeded unless ``gets`` says otherwise. At the test's end each is shut down and
    must have seen and sent only what the served OpenAPI schema allows."""
    servers: list[CheckedServer] = []

    def start(posts: list, port: int = 0, gets: list | None = None) -> CheckedServer:
        server = CheckedServer(("127.0.0.1", port), Scripted)
        server.posts, server.posted, server.keys = posts, 0, []
        server.gets = gets if gets is not None else [(200, {"id": "j1", "status": "succeeded"})]
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    for server in servers:
        server.assert_conforms()
