"""ClusterEngine against a real HTTP server on 127.0.0.1: which API answers a job retries, which end it."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve.catalogue import load_catalogue
from serve.cluster.client import ApiError
from serve.cluster.engine import ClusterEngine
from serve.errors import ModelUnavailableError, ServiceUnavailableError
from serve.jobs import error_dict
from tests.s3_fixtures import seaweed, unique_prefix  # noqa: F401


class _Answers(BaseHTTPRequestHandler):
    """Answers ``server.answer``, or for a scripted ``(method, path)`` the next answer of its list (the last one
    repeats); every request is recorded in ``server.seen``."""

    def _answer(self):
        if self.headers.get("Content-Length"):
            self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append((self.command, self.path))
        self.server.keys.append(self.headers.get("Authorization"))
        script = self.server.script.get((self.command, self.path.split("?")[0]))
        answer = (script.pop(0) if len(script) > 1 else script[0]) if script else self.server.answer
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
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    server.answer = (200, "application/json", b"{}")
    server.script, server.seen, server.keys = {}, [], []
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


@pytest.mark.s3
def test_a_jobs_models_are_asked_for_with_its_own_sites_key(api, seaweed, unique_prefix, tmp_path):  # noqa: F811
    """Not the first site's: its rate limit or revoked key would hold up or fail every site's event jobs."""
    import socket

    from serve import staging
    from serve.jobs import JobRunner, JobSpec, JobStore

    api.answer = _structures({})
    engine = ClusterEngine(f"http://127.0.0.1:{api.server_address[1]}", {"site-a": "key-a", "site-b": "key-b"},
                           timeout_s=10)
    runner = JobRunner(JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings), engine, seaweed.settings,
                       work_dir=tmp_path)
    spec = JobSpec(f"s3://inbox/{unique_prefix}/in/case.nii.gz", f"s3://outbox/{unique_prefix}", site="site-b",
                   input_prefix=f"{unique_prefix}/in/")
    staging.put_bytes(b"a volume", spec.input_uri, seaweed.settings)
    runner.key_for(spec)
    assert api.keys == ["Bearer key-b"]

    with socket.socket() as s:  # a cluster that is down: a retryable error, not httpx's exception
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(ApiError) as down:
        ClusterEngine(f"http://127.0.0.1:{closed}", {"site-b": "key-b"}, timeout_s=5).model_checksums(
            None, False, "site-b")
    assert down.value.status == 503 and error_dict(down.value)["retryable"]


def test_an_unreachable_sub_model_is_retried_not_skipped(api):
    api.answer = _structures({"muscles": "unreachable"})
    with pytest.raises(ServiceUnavailableError, match="muscles") as e:
        _engine(api).model_checksums(None, False, "site-a")  # a full run would otherwise lose muscles
    assert error_dict(e.value)["retryable"]
    api.answer = _structures({"muscles": "unavailable"})  # not deployed: a full run goes on without it
    assert "muscles" not in _engine(api).model_checksums(None, False, "site-a")
    with pytest.raises(ModelUnavailableError, match="muscles"):
        _engine(api).model_checksums(["autochthon_left"], False, "site-a")


def _push_until_settled(settings, runner, spec, s3):
    """Push ``spec`` to an intake worker, wait until nothing is held; the job.json it published, and the worker."""
    from serve import staging
    from serve.cluster.intake import IntakeWorker

    worker = IntakeWorker(settings, runner=runner)
    try:
        worker.submit([spec.to_dict()])
        deadline = time.monotonic() + 120  # hang guard only
        while (worker.journal.held() or worker._in_flight) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert worker.journal.held() == []
    finally:
        worker.close()
    return json.loads(staging.download_bytes(spec.output_prefix + "job.json", settings=s3)), worker


@pytest.mark.s3
def test_a_pushed_job_that_keeps_failing_retryably_is_given_up_with_a_reason(api, seaweed, unique_prefix,
                                                                             tmp_path):  # noqa: F811
    """The cluster answers 503 every time: five runs, each after a wait twice the last, then an error job.json
    the site can read, nothing held."""
    from serve import staging
    from serve.cluster.intake import IntakeSettings
    from serve.jobs import JobRunner, JobSpec, JobStore
    from serve.pushes import MAX_ATTEMPTS, retry_delay_s

    api.answer = _problem(503, True)
    settings = IntakeSettings(jobs=f"s3://jobs/{unique_prefix}", lease_s=2.0, s3=seaweed.settings)
    runner = JobRunner(JobStore(settings.jobs, seaweed.settings, lease_s=2.0), _engine(api), seaweed.settings,
                       work_dir=tmp_path)
    spec = JobSpec(f"s3://inbox/{unique_prefix}/in/case.nii.gz", f"s3://outbox/{unique_prefix}", site="site-a",
                   input_prefix=f"{unique_prefix}/in/")
    staging.put_bytes(b"a volume", spec.input_uri, seaweed.settings)
    runs: list[float] = []
    run = runner.run

    def timed(job_spec):
        runs.append(time.monotonic())
        return run(job_spec)

    runner.run = timed
    doc, worker = _push_until_settled(settings, runner, spec, seaweed.settings)
    assert doc["status"] == "failed" and doc["error"]["status"] == 503
    assert f"given up after {MAX_ATTEMPTS} runs" in doc["error"]["detail"]
    assert len(runs) == MAX_ATTEMPTS
    waits = [b - a for a, b in zip(runs, runs[1:])]
    assert all(w >= 0.95 * retry_delay_s(i, worker.sweep_s) for i, w in enumerate(waits, start=1)), waits


@pytest.mark.s3
def test_a_pushed_job_another_worker_holds_waits_for_its_claim_and_is_not_given_up(api, seaweed, unique_prefix,
                                                                                    tmp_path):  # noqa: F811
    """A dead worker's claim outlives the five backed-off runs: those looks at a job running elsewhere are no
    runs of ours, so the pushed job waits for the claim to lapse, then runs and is done -- not let go and lost."""
    from serve import staging
    from serve.cluster.intake import IntakeSettings
    from serve.jobs import JobRunner, JobSpec, JobStore

    api.script = {
        ("GET", "/v1/structures"): [_structures({})],
        ("POST", "/v1/segmentations/upload"): [(202, "application/json", b'{"id": "j1", "status": "queued"}')],
        ("GET", "/v1/segmentations/j1"): [(200, "application/json", json.dumps(
            {"id": "j1", "status": "succeeded", "options": {"outputs": ["multilabel"]}, "timings": {},
             "submodels": {}, "structures": {}, "unavailable": {}}).encode())],
        ("GET", "/v1/segmentations/j1/result"): [(200, "application/gzip", b"labels")]}
    settings = IntakeSettings(jobs=f"s3://jobs/{unique_prefix}", lease_s=2.0, s3=seaweed.settings)
    runner = JobRunner(JobStore(settings.jobs, seaweed.settings, lease_s=2.0), _engine(api), seaweed.settings,
                       work_dir=tmp_path)
    spec = JobSpec(f"s3://inbox/{unique_prefix}/in/case.nii.gz", f"s3://outbox/{unique_prefix}", site="site-a",
                   input_prefix=f"{unique_prefix}/in/", outputs=("multilabel",))
    staging.put_bytes(b"a volume", spec.input_uri, seaweed.settings)
    full, key, models = runner.key_for(spec)
    # longer than the five runs' backoff (1 + 2 + 4 + 8 s with a 1 s sweep)
    dead = JobStore(settings.jobs, seaweed.settings, owner="dead-worker", lease_s=20.0)
    assert dead.claim(key, full, models)[1]
    assert _push_until_settled(settings, runner, spec, seaweed.settings)[0]["status"] == "done"
    assert [m for m, p in api.seen if p.startswith("/v1/segmentations/upload")] == ["POST"]


def test_the_wait_between_runs_of_an_unsettled_pushed_job_doubles_up_to_a_cap():
    from serve.pushes import MAX_RETRY_DELAY_S, retry_delay_s

    assert [retry_delay_s(n, 60) for n in range(1, 5)] == [60, 120, 240, 480]
    assert retry_delay_s(12, 60) == MAX_RETRY_DELAY_S


def test_the_api_client_turns_a_dead_cluster_or_a_proxys_json_into_a_retryable_api_error(api):
    """``mriseg demo`` and the event engine get an ApiError they handle, not httpx's or a KeyError's traceback."""
    import socket

    from serve.cluster.client import ApiClient, ApiError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(ApiError, match="Cluster unreachable") as dead:
        ApiClient(f"http://127.0.0.1:{closed}", "key", timeout_s=5).job("x")
    assert dead.value.status == 503 and dead.value.retryable

    api.answer = (502, "application/json", json.dumps(["bad gateway"]).encode())  # a proxy's JSON, not a problem
    with pytest.raises(ApiError) as proxied:
        ApiClient(f"http://127.0.0.1:{api.server_address[1]}", "key", timeout_s=5).job("x")
    assert proxied.value.status == 502 and proxied.value.retryable


def _job(status: str, error: dict | None = None) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps({"id": "j1", "status": status, "error": error}).encode()


def test_the_api_client_polls_a_job_it_submitted_instead_of_holding_one_request_open(api):
    """A poll meeting a restarting cluster is repeated; the upload itself is never sent twice."""
    from serve.cluster.client import ApiClient

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
    from serve.cluster.client import ApiClient

    api.script = {("GET", "/v1/segmentations/j1"): answers, ("DELETE", "/v1/segmentations/j1"): [_job("cancelled")]}
    client = ApiClient(f"http://127.0.0.1:{api.server_address[1]}", "key", timeout_s=0.5, poll_s=0.05)
    with pytest.raises(ApiError) as e:
        client.wait("j1")
    assert (e.value.status, e.value.retryable) == (status, retryable)
    assert (("DELETE", "/v1/segmentations/j1") in api.seen) is cancelled
