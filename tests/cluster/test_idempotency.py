"""``Idempotency-Key`` on the API's POSTs, on a real local Ray cluster (the shared stack): the same key and
request answer the first job, another request is a 422, concurrent duplicates make one job, keys are per
site and survive a router restart, and the one API client's retry after a lost answer makes no second job."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers.stack import BUCKET, SITE_KEYS, auth, nifti_bytes

pytestmark = pytest.mark.ray

RAW = {"content-type": "application/octet-stream"}
#: one sub-model and the smallest output: these jobs are cheap where they run at all
SMALL = {"roi_subset": "liver", "outputs": "multilabel", "wait": "false"}


def _key() -> str:
    return f"test-{uuid.uuid4()}"


def _journalled(stack, site: str, key: str) -> list[str]:
    """The ids of the router's journal records (its own files, on this machine) made with ``key`` by ``site``."""
    ids = []
    for p in (Path(stack.extra["args"]["router"]["results_dir"]) / ".jobs").glob("*.json"):
        if p.name.startswith(".tmp-"):
            continue
        try:
            rec = json.loads(p.read_text())
        except (FileNotFoundError, ValueError):  # replaced while read: the next record write is whole
            continue
        if rec.get("site") == site and rec.get("idempotency_key") == key:
            ids.append(rec["id"])
    return ids


def _json_post(c, site: str, body: dict | bytes, key: str | None):
    headers = {**auth(site), "content-type": "application/json", **({"Idempotency-Key": key} if key is not None else {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return c.post("/v1/segmentations", content=content, headers=headers)


def _upload(c, site: str, data: bytes, key: str | None, **params):
    headers = {**auth(site), **RAW, **({"Idempotency-Key": key} if key is not None else {})}
    return c.post("/v1/segmentations/upload", params={**SMALL, **params}, content=data, headers=headers)


def _settle(c, site: str, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = c.get(f"/v1/segmentations/{job_id}", headers=auth(site)).json()
        if body.get("status") in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not settle")


def test_the_same_key_and_request_answer_the_first_job_and_another_request_is_a_422(serve_stack):
    key = _key()
    body = {"input": f"s3://{BUCKET}/site-a/idem-{uuid.uuid4().hex[:8]}.nii.gz", "roi_subset": ["liver"],
            "outputs": ["multilabel"]}
    with serve_stack.client() as c:
        first = _json_post(c, "site-a", body, key)
        assert first.status_code == 202 and "idempotent-replayed" not in first.headers, first.text
        job_id = first.json()["id"]
        # the same request, its fields in another order and spacing, a default spelt out: the same job, as it is now
        again = _json_post(c, "site-a", json.dumps({"outputs": ["multilabel"], "fast": False, "roi_subset": ["liver"],
                                                    "input": body["input"]}, indent=2).encode(), key)
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true", again.text
        assert again.json()["id"] == job_id and again.headers["location"] == f"/v1/segmentations/{job_id}"
        other = _json_post(c, "site-a", {**body, "fast": True}, key)
        assert other.status_code == 422 and other.headers["content-type"] == "application/problem+json"
        problem = other.json()
        assert problem["title"] == "Idempotency-Key reused" and job_id in problem["detail"]
        assert problem["retryable"] is False
        # the structured-field form of the same key is the same key
        quoted = _json_post(c, "site-a", body, f'"{key}"')
        assert quoted.status_code == 200 and quoted.json()["id"] == job_id
        # without a key, the same request is a new job
        assert _json_post(c, "site-a", body, None).json()["id"] != job_id

        data, ukey = nifti_bytes(shape=(24, 24, 24), seed=11), _key()
        up = _upload(c, "site-a", data, ukey)
        assert up.status_code == 202, up.text
        replay = _upload(c, "site-a", data, ukey)
        assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
        assert replay.json()["id"] == up.json()["id"]
        for changed in (_upload(c, "site-a", nifti_bytes(shape=(24, 24, 24), seed=12), ukey),   # another file
                        _upload(c, "site-a", data, ukey, roi_subset="spleen"),                  # another option
                        _upload(c, "site-a", data, ukey, filename="scan.nii.gz")):              # another name
            assert changed.status_code == 422 and up.json()["id"] in changed.json()["detail"], changed.text
        # ?wait=true on a replay waits for the job, as on a first POST
        waited = c.post("/v1/segmentations/upload", params={**SMALL, "wait": "true"}, content=data,
                        headers={**auth("site-a"), **RAW, "Idempotency-Key": ukey})
        assert waited.status_code == 200 and waited.json()["status"] == "succeeded", waited.text
        assert waited.json()["id"] == up.json()["id"] and waited.headers["idempotent-replayed"] == "true"
    assert _journalled(serve_stack, "site-a", key) == [job_id]
    assert _journalled(serve_stack, "site-a", ukey) == [up.json()["id"]]


@pytest.mark.parametrize("key,why", [("", "is empty"), ("k" * 256, "is 256 characters long"),
                                     ("two words", "holds other characters"), ("a;b", "holds other characters")])
def test_a_key_of_the_wrong_form_is_a_400_that_says_what_a_key_may_be(serve_stack, key, why):
    with serve_stack.client() as c:
        for r in (_json_post(c, "site-a", {"input": f"s3://{BUCKET}/site-a/x.nii.gz"}, key),
                  _upload(c, "site-a", nifti_bytes(shape=(24, 24, 24)), key)):
            assert r.status_code == 400, r.text
            problem = r.json()
            assert problem["title"] == "Invalid Idempotency-Key" and why in problem["detail"]
            assert "1-255 characters" in problem["detail"]


def test_concurrent_duplicates_make_one_job(serve_stack):
    key, ukey = _key(), _key()
    body = {"input": f"s3://{BUCKET}/site-a/idem-{uuid.uuid4().hex[:8]}.nii.gz", "roi_subset": ["liver"],
            "outputs": ["multilabel"]}
    data = nifti_bytes(shape=(24, 24, 24), seed=13)

    def post(_n, upload: bool):
        with serve_stack.client() as c:
            return _upload(c, "site-a", data, ukey) if upload else _json_post(c, "site-a", body, key)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: post(n, False), range(8)))
        uploads = list(pool.map(lambda n: post(n, True), range(8)))
    assert sorted(r.status_code for r in answers) == [200] * 7 + [202], [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert _journalled(serve_stack, "site-a", key) == [answers[0].json()["id"]]
    # uploads hold a job slot while their bodies are read: any the site's limit refuses is a 429, never a job
    taken = [r for r in uploads if r.status_code != 429]
    assert taken and all(r.status_code in (200, 202) for r in taken), [r.text for r in uploads]
    assert [r.status_code for r in taken].count(202) == 1 and len({r.json()["id"] for r in taken}) == 1
    assert _journalled(serve_stack, "site-a", ukey) == [taken[0].json()["id"]]


def test_one_sites_key_never_finds_another_sites_job(serve_stack):
    key, data = _key(), nifti_bytes(shape=(24, 24, 24), seed=14)
    with serve_stack.client() as c:
        a = _upload(c, "site-a", data, key)
        b = _upload(c, "site-b", data, key)  # the same key, file and options
        assert a.status_code == 202 and b.status_code == 202, (a.text, b.text)
        assert a.json()["id"] != b.json()["id"] and b.json()["site"] == "site-b"
        again = _upload(c, "site-b", data, key)
        assert again.status_code == 200 and again.json()["id"] == b.json()["id"]
    assert _journalled(serve_stack, "site-a", key) == [a.json()["id"]]
    assert _journalled(serve_stack, "site-b", key) == [b.json()["id"]]


def test_the_api_client_retries_a_post_whose_answer_was_lost_without_making_a_second_job(serve_stack):
    """The answer is dropped after the router took the job (a proxy restarting): the client sends the POST
    again with its key and follows the one job to its end."""
    from serve.api.client import ApiClient
    from tests.helpers.faultproxy import S3FaultProxy

    key = _key()
    with S3FaultProxy(int(serve_stack.url.rsplit(":", 1)[1])) as proxy:
        proxy.drop_answers = 1
        client = ApiClient(proxy.endpoint_url, SITE_KEYS["site-a"], timeout_s=300, poll_s=0.2)
        job = client.segment_upload(nifti_bytes(shape=(24, 24, 24), seed=15), "scan.nii.gz", roi_subset=["liver"],
                                    outputs=("multilabel",), key=key)
        assert proxy.dropped == 1
    assert job["status"] == "succeeded"
    assert _journalled(serve_stack, "site-a", key) == [job["id"]]


def test_a_key_is_honoured_across_a_router_restart(serve_stack):
    """The key is in the job's journal record: the Router replica that Serve starts in place of a dead one
    answers the same request with the same job, and another request with a 422."""
    import ray

    key = _key()
    body = {"input": f"s3://{BUCKET}/site-a/idem-{uuid.uuid4().hex[:8]}.nii.gz", "roi_subset": ["liver"],
            "outputs": ["multilabel"]}
    with serve_stack.client() as c:
        job_id = _json_post(c, "site-a", body, key).json()["id"]
        _settle(c, "site-a", job_id)  # the input does not exist: it fails with S3's 404, and stays kept
        # Serve names replica actors SERVE_REPLICA::<app>#<deployment>#<id>
        router = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "#Router#" in a["name"])
        ray.kill(ray.get_actor(router["name"], namespace=router["namespace"]), no_restart=True)
        deadline, again = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            try:
                again = _json_post(c, "site-a", body, key)
                if again.status_code < 500:
                    break
            except Exception:  # noqa: BLE001 - the proxy may drop connections while the replica is replaced
                pass
            time.sleep(1)
        assert again is not None and again.status_code == 200, again.text if again is not None else "no answer"
        assert again.json()["id"] == job_id and again.headers["idempotent-replayed"] == "true"
        routers = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Router#" in a["name"]]
        assert routers and router["name"] not in routers  # a new replica answered
        other = _json_post(c, "site-a", {**body, "roi_subset": ["spleen"]}, key)
        assert other.status_code == 422 and job_id in other.json()["detail"]
