"""Schemathesis against the API's own OpenAPI document, on the shared real stack: generated
requests (valid and invalid) for every operation never get a 5xx, and documented responses
match their schemas. Bounded: ``MRISEG_SCHEMATHESIS_EXAMPLES`` examples per operation (default 12).
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from serve.api.app import create_app
from tests.helpers.stack import auth

pytestmark = pytest.mark.ray

# The document the router serves at /v1/openapi.json (the test below checks they are the same).
app = create_app()
schema = schemathesis.openapi.from_dict(app.openapi())
EXAMPLES = int(os.environ.get("MRISEG_SCHEMATHESIS_EXAMPLES", "12"))


def test_served_document_is_the_one_tested(serve_stack):
    with serve_stack.client() as c:
        served, here = c.get("/v1/openapi.json").json(), app.openapi()
    diff = {p: (served["paths"].get(p), here["paths"].get(p)) for p in set(served["paths"]) | set(here["paths"])
            if served["paths"].get(p) != here["paths"].get(p)}
    assert not diff
    assert served == here


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_responses_match_the_schema(case, serve_stack):
    # site-b: its own rate and job limits, so a 429 here does not slow the other tests' site-a
    headers = {**(case.headers or {}), **auth("site-b")}
    response = case.call(base_url=serve_stack.url, headers=headers, timeout=120)
    case.validate_response(response, checks=(not_a_server_error, response_schema_conformance,
                                             content_type_conformance))
