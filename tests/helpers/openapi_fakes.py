"""The served OpenAPI document as the referee of the tests' fake mriseg APIs (http.server handlers that
script the cluster's answers for client and bulk tests), so a fake cannot drift from what the API answers.

The document is the one the ingress serves at ``/v1/openapi.json``: ``create_app().openapi()``, built without
Ray (tests/api/test_schemathesis.py checks that the running stack serves this same document). Every answer a
fake sends (status, the headers the schema declares, body) must be one the schema allows for its path and
method, and every request the client under test sends must be one the schema accepts (path, method, parameters
including headers such as ``Idempotency-Key``, credentials, body). An answer that stands in for a proxy in front
of the API (a gateway's HTML page) is a :class:`ProxyAnswer`, which the API's schema does not describe.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from http.server import ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from jsonschema.exceptions import best_match
from openapi_schema_validator import OAS31Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

#: the URI the document is registered under, so ``$ref``s inside it resolve from any schema in it
SCHEMA_URI = "urn:mriseg:openapi"
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}  # pydantic's lax booleans


class SchemaMismatch(AssertionError):
    """A fake's answer or a client's request that the served OpenAPI document does not allow."""


class ProxyAnswer(NamedTuple):
    """An answer from a proxy in front of the API (e.g. a gateway's 502 page): not the API's, so unchecked."""

    status: int
    content_type: str
    body: bytes


@functools.cache
def served_schema() -> dict[str, Any]:
    """The OpenAPI document the ingress serves, from its FastAPI app (no Ray needed).

    Returns:
        The document (shared: do not change it).
    """
    from serve.api.app import create_app

    return create_app().openapi()


def _pointer(*parts: str) -> str:
    """A JSON pointer (RFC 6901) to ``parts``, with ``~`` and ``/`` escaped."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def _types(schema: Mapping[str, Any]) -> set[str]:
    """The JSON types ``schema`` allows, looking into its ``anyOf``/``oneOf`` branches."""
    kinds = schema.get("type", [])
    found = set([kinds] if isinstance(kinds, str) else kinds)
    for branch in schema.get("anyOf", []) + schema.get("oneOf", []):
        found |= _types(branch)
    return found


def _coerce(value: str, schema: Mapping[str, Any]) -> Any:
    """A parameter's text as the JSON value the server parses it to (FastAPI's rules), so it can be validated."""
    kinds = _types(schema)
    if "boolean" in kinds and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    if "integer" in kinds and re.fullmatch(r"[+-]?\d+", value):
        return int(value)
    if "number" in kinds and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value):
        return float(value)
    return value


class OpenApiReferee:
    """Checks requests and answers against an OpenAPI 3.1 document (by default the served one)."""

    def __init__(self, document: Mapping[str, Any] | None = None) -> None:
        """Args:
            document: the OpenAPI document (default: :func:`served_schema`).
        """
        self.doc = served_schema() if document is None else document
        self._registry = Registry().with_resource(
            SCHEMA_URI, Resource.from_contents(self.doc, default_specification=DRAFT202012))

    # -- finding the operation ---------------------------------------------------------------------
    def operation(self, method: str, target: str) -> tuple[str, dict[str, Any], dict[str, str]]:
        """The schema's operation for a request.

        Args:
            method: the HTTP method.
            target: the request target (path and query) or the path.

        Returns:
            ``(templated path, operation object, path parameters)``.

        Raises:
            SchemaMismatch: no path of the schema matches, or the path does not declare ``method``.
        """
        path = urlsplit(target).path
        paths = self.doc["paths"]
        # a literal path wins over a template that matches it too (OpenAPI's rule)
        for template in sorted(paths, key=lambda p: "{" in p):
            names = re.findall(r"{([^}]+)}", template)
            pattern = re.escape(template)
            for name in names:
                pattern = pattern.replace(re.escape("{" + name + "}"), "([^/]+)")
            match = re.fullmatch(pattern, path)
            if match:
                op = paths[template].get(method.lower())
                if op is None:
                    declared = sorted(m.upper() for m in paths[template] if m != "parameters")
                    raise SchemaMismatch(f"{method} {path}: the schema declares only {declared} for {template}")
                values = {n: unquote(v) for n, v in zip(names, match.groups(), strict=True)}
                return template, {**op, "parameters": paths[template].get("parameters", []) +
                                  op.get("parameters", [])}, values
        raise SchemaMismatch(f"{method} {path}: no path of the schema matches")

    def _validate(self, instance: Any, pointer: str, where: str) -> None:
        """Raises :class:`SchemaMismatch` naming ``where`` if ``instance`` fails the schema at ``pointer``."""
        validator = OAS31Validator({"$ref": f"{SCHEMA_URI}#{pointer}"}, registry=self._registry)
        error = best_match(validator.iter_errors(instance))
        if error is not None:
            at = "/".join(str(p) for p in error.absolute_path)
            raise SchemaMismatch(f"{where}{' at ' + at if at else ''}: {error.message}")

    # -- requests ----------------------------------------------------------------------------------
    def check_request(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> None:
        """Checks a request a client sent: path, method, parameters, credentials and body.

        Args:
            method: the HTTP method.
            target: the request target, path and query.
            headers: the request's headers (any case).
            body: the request's body (``b""`` for none).

        Raises:
            SchemaMismatch: naming the request's method, path and what the schema does not allow.
        """
        template, op, path_values = self.operation(method, target)
        where = f"{method} {urlsplit(target).path} (request)"
        hdrs = {k.lower(): v for k, v in headers.items()}
        query = parse_qs(urlsplit(target).query, keep_blank_values=True)
        base = _pointer("paths", template, method.lower())
        known_query = set()
        for i, param in enumerate(op["parameters"]):
            name, kind, schema = param["name"], param["in"], param.get("schema", {})
            known_query |= {name} if kind == "query" else set()
            if kind == "path":
                raw = [path_values[name]] if name in path_values else []
            elif kind == "query":
                raw = query.get(name, [])
            elif kind == "header":
                raw = [hdrs[name.lower()]] if name.lower() in hdrs else []
            else:  # cookies: none of the API's operations read one
                continue
            if not raw:
                if param.get("required"):
                    raise SchemaMismatch(f"{where}: the required {kind} parameter {name!r} is missing")
                continue
            value = ([_coerce(v, schema.get("items", {})) for v in raw] if "array" in _types(schema)
                     else _coerce(raw[-1], schema))
            # parameters declared on the path item come first in op["parameters"]; FastAPI declares none there
            self._validate(value, base + _pointer("parameters", str(i), "schema"), f"{where}: {kind} {name!r}")
        self._check_credentials(op, hdrs, query, where, known_query)
        unknown = sorted(set(query) - known_query)
        if unknown:
            raise SchemaMismatch(f"{where}: query parameter(s) {unknown} that the schema does not declare")
        self._check_request_body(op, base, hdrs, body, where)

    def _check_credentials(self, op: Mapping[str, Any], hdrs: Mapping[str, str], query: Mapping[str, Any],
                           where: str, known_query: set[str]) -> None:
        """At least one of the operation's security requirements is met (none declared: nothing to meet)."""
        requirements = op.get("security", self.doc.get("security", []))
        schemes = self.doc.get("components", {}).get("securitySchemes", {})

        def met(name: str) -> bool:
            scheme = schemes[name]
            if scheme["type"] == "http":
                auth = hdrs.get("authorization", "").split(" ", 1)
                return len(auth) == 2 and auth[0].lower() == scheme["scheme"].lower() and bool(auth[1].strip())
            if scheme["type"] == "apiKey":
                if scheme["in"] == "query":
                    known_query.add(scheme["name"])
                    return scheme["name"] in query
                return scheme["name"].lower() in hdrs
            return False

        if requirements and not any(all(met(n) for n in req) for req in requirements):
            raise SchemaMismatch(f"{where}: no credentials the schema accepts (any of {requirements})")

    def _check_request_body(self, op: Mapping[str, Any], base: str, hdrs: Mapping[str, str], body: bytes,
                            where: str) -> None:
        declared = op.get("requestBody")
        if not body:
            if declared and declared.get("required"):
                raise SchemaMismatch(f"{where}: the schema requires a body; none was sent")
            return
        if not declared:
            raise SchemaMismatch(f"{where}: a body, which the schema does not declare for this operation")
        media = hdrs.get("content-type", "").split(";")[0].strip().lower()
        if media not in declared["content"]:
            raise SchemaMismatch(f"{where}: body of type {media!r}; the schema declares "
                                 f"{sorted(declared['content'])}")
        if media.endswith("json"):
            try:
                doc = json.loads(body)
            except ValueError as e:
                raise SchemaMismatch(f"{where}: the {media} body is not JSON ({e})") from None
            self._validate(doc, base + _pointer("requestBody", "content", media, "schema"), f"{where}: body")

    # -- answers -----------------------------------------------------------------------------------
    def check_response(self, method: str, target: str, status: int, headers: Mapping[str, str],
                       body: bytes) -> None:
        """Checks an answer to a request: its status, the headers the schema declares for it, and its body.

        A status whose entry declares no ``content`` (FastAPI's extra 200 of a POST) has its body unchecked.

        Args:
            method: the request's HTTP method.
            target: the request's target (path and query) or path.
            status: the answer's status code.
            headers: the answer's headers (any case).
            body: the answer's body.

        Raises:
            SchemaMismatch: naming the request's method, path and what the schema does not allow.
        """
        template, op, _ = self.operation(method, target)
        where = f"{method} {urlsplit(target).path} answered {status}"
        responses = op.get("responses", {})
        key = next((k for k in (str(status), f"{status // 100}XX", "default") if k in responses), None)
        if key is None:
            raise SchemaMismatch(f"{where}: a status the schema does not declare for {method} {template} "
                                 f"(declared: {sorted(responses)})")
        base = _pointer("paths", template, method.lower(), "responses", key)
        hdrs = {k.lower(): v for k, v in headers.items()}
        for name, spec in responses[key].get("headers", {}).items():
            if name.lower() not in hdrs:
                if spec.get("required"):
                    raise SchemaMismatch(f"{where}: the required header {name!r} is missing")
                continue
            self._validate(_coerce(hdrs[name.lower()], spec.get("schema", {})),
                           base + _pointer("headers", name, "schema"), f"{where}: header {name!r}")
        content = responses[key].get("content")
        if not content:
            return
        media = hdrs.get("content-type", "").split(";")[0].strip().lower()
        if media not in content:
            raise SchemaMismatch(f"{where}: Content-Type {media!r}; the schema declares {sorted(content)}")
        if media.endswith("json"):
            try:
                doc = json.loads(body)
            except ValueError as e:
                raise SchemaMismatch(f"{where}: the {media} body is not JSON ({e})") from None
            if "schema" in content[media]:
                self._validate(doc, base + _pointer("content", media, "schema"), f"{where}: body")


class CheckedServer(ThreadingHTTPServer):
    """A fake API's HTTP server that keeps what the schema does not allow of its traffic in ``mismatches``.

    Its handler calls :meth:`check_request` and :meth:`check_answer`; the fake still answers as scripted (so the
    test runs on), and the test's fixture calls :meth:`assert_conforms` at its end.
    """

    def __init__(self, address: tuple[str, int], handler: type, referee: OpenApiReferee | None = None) -> None:
        """Args:
            address: ``(host, port)`` to listen on.
            handler: the fake's request handler class.
            referee: the checker (default: one for the served document).
        """
        super().__init__(address, handler)
        self.referee = referee or OpenApiReferee()
        self.mismatches: list[str] = []

    def check_request(self, handler: Any, body: bytes) -> None:
        """Records what the schema does not allow of the request ``handler`` (a BaseHTTPRequestHandler) got."""
        try:
            self.referee.check_request(handler.command, handler.path, dict(handler.headers.items()), body)
        except SchemaMismatch as e:
            self.mismatches.append(str(e))

    def check_answer(self, handler: Any, status: int, headers: Mapping[str, str], body: bytes) -> None:
        """Records what the schema does not allow of the answer ``handler`` is about to send."""
        try:
            self.referee.check_response(handler.command, handler.path, status, headers, body)
        except SchemaMismatch as e:
            self.mismatches.append(str(e))

    def assert_conforms(self) -> None:
        """Fails with every request and answer the schema did not allow.

        Raises:
            SchemaMismatch: one line per mismatch.
        """
        if self.mismatches:
            raise SchemaMismatch("the fake API's traffic does not match the served OpenAPI schema:\n" +
                                 "\n".join(self.mismatches))
