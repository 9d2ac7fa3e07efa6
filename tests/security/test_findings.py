"""Issue #34's findings, each tried again against ``mriseg up --sites a,b``.

The attacker holds site a's API key and S3 keys, which reach neither site b's
prefix nor the job records (``test_up_two_sites.py``). The records below are
planted with the server's own S3 identity, as a site with broader S3 rights
(or a restored backup) could: what the server did not sign is never acted on.
Each test makes the attack, checks it came to nothing, then shows a job of
site b succeeding.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

from serve.storage import staging
from serve.storage.s3client import S3Settings, make_client
from tests.helpers.stack import nifti_bytes
from tests.security.upstack import BUCKET, LEASE_S, job_json_uri, push, site_b_job_succeeds, upload, wait_job_json

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(600)]

SWEEPS = 3 * LEASE_S  # time for the intake to sweep its held pushes more than twice


def _keys(settings: dict, prefix: str) -> list[str]:
    pages = make_client(S3Settings.from_mapping(settings)).get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


def _plant(up, key: str, doc: dict) -> None:
    make_client(S3Settings.from_mapping(up.server_s3)).put_object(Bucket=BUCKET, Key=key,
                                                                  Body=json.dumps(doc).encode())


def _job_states(up) -> dict[str, str | None]:
    out = {}
    for k in _keys(up.server_s3, "_jobs/jobs/"):
        doc = json.loads(staging.download_bytes(f"s3://{BUCKET}/{k}", settings=up.server_s3))
        out[k] = (doc.get("body") or {}).get("state")
    return out


def test_a_forged_held_push_is_set_aside_and_never_run(up_two_sites):
    """A held push naming site a and site b's volume: unsigned, and with a MAC of the wrong key."""
    up = up_two_sites
    victim = "b/inbox/victim.nii.gz"
    upload(up, "b", victim, nifti_bytes(shape=(24, 20, 22), seed=7))
    spec = {"input_uri": f"s3://{BUCKET}/{victim}", "output_root": f"s3://{BUCKET}/a/outbox", "site": "a",
            "input_prefix": "b/inbox/"}
    body = {"spec": spec, "attempts": 0, "created": time.time(), "not_before": 0}
    planted = {"unsigned": {"v": 1, "site": "a", "body": body},
               "forged": {"v": 1, "site": "a", "body": body, "mac": secrets.token_hex(32)}}
    for name, doc in planted.items():
        _plant(up, f"_jobs/pushed/planted-{name}.json", doc)
    deadline = time.monotonic() + SWEEPS
    while time.monotonic() < deadline and any(k.startswith("_jobs/pushed/planted-") and k.endswith(".json")
                                              for k in _keys(up.server_s3, "_jobs/pushed/")):
        time.sleep(1)
    held = _keys(up.server_s3, "_jobs/pushed/")
    assert "_jobs/pushed/planted-unsigned.json.unsigned" in held and "_jobs/pushed/planted-forged.json.forged" in held, held
    assert not [k for k in held if k.startswith("_jobs/pushed/planted-") and k.endswith(".json")]
    assert not [k for k in _keys(up.server_s3, "a/") if "victim" in k]  # nothing of b's volume for a
    site_b_job_succeeds(up)


def test_a_forged_running_record_does_not_block_site_b(up_two_sites):
    up = up_two_sites
    b = up.site("b")
    key = "b/inbox/blocked.nii.gz"
    etag = upload(up, "b", key, nifti_bytes(shape=(24, 20, 22), seed=11))
    assert push(up, "b", key, etag).status_code == 202
    first = wait_job_json(job_json_uri(up, "b", key), b.s3, etag=etag)
    assert first["status"] == "succeeded" and first["job_key"]
    # the job's key is predictable (a hash of the input version, options and models): plant a "running"
    # claim on it with a lease of a day, and empty b's case folder, so that the job has to run again
    _plant(up, f"_jobs/jobs/{first['job_key']}.json",
           {"v": 1, "site": "b", "mac": secrets.token_hex(32),
            "body": {"key": first["job_key"], "state": "running", "lease_until": time.time() + 86400,
                     "attempts": 1, "owner": "attacker"}})
    case = job_json_uri(up, "b", key)[len(f"s3://{BUCKET}/"):].rsplit("/", 1)[0] + "/"
    client = make_client(S3Settings.from_mapping(b.s3))
    for k in _keys(b.s3, case):
        client.delete_object(Bucket=BUCKET, Key=k)
    assert push(up, "b", key, etag).status_code == 202
    again = wait_job_json(job_json_uri(up, "b", key), b.s3, etag=etag, timeout=150)
    assert again["status"] == "succeeded" and again["job_key"] == first["job_key"] and again["started"] > first["started"]


def test_n_made_up_etags_hold_one_job_that_reads_nothing(up_two_sites):
    up = up_two_sites
    key = "a/inbox/amplified.nii.gz"
    real = upload(up, "a", key, nifti_bytes(shape=(24, 20, 22), seed=3))
    claims_before = set(_keys(up.server_s3, "_jobs/jobs/"))
    fakes = [hashlib.md5(secrets.token_bytes(8)).hexdigest() for _ in range(20)]
    assert real not in fakes
    for fake in fakes:
        assert push(up, "a", key, fake).status_code == 202
    held = [k for k in _keys(up.server_s3, "_jobs/pushed/") if k.endswith(".json")]
    assert len(held) <= 1, held  # one held record for the object, however many pushes
    deadline = time.monotonic() + SWEEPS + 60  # the held job settles: the version it names is not there
    while time.monotonic() < deadline and [k for k in _keys(up.server_s3, "_jobs/pushed/") if k.endswith(".json")]:
        time.sleep(1)
    assert not [k for k in _keys(up.server_s3, "_jobs/pushed/") if k.endswith(".json")]
    # nothing was claimed for a made-up version, so nothing was downloaded for one (the claim comes first),
    # and nothing was published for one: the case folder is left to the object's real version
    assert set(_keys(up.server_s3, "_jobs/jobs/")) == claims_before
    assert not staging.object_exists(job_json_uri(up, "a", key), up.site("a").s3)
    site_b_job_succeeds(up)


def test_an_older_versions_result_never_replaces_a_newer_ones(up_two_sites):
    """Version 1 (a larger volume, so slower) is running when version 2 is uploaded and pushed."""
    up = up_two_sites
    b = up.site("b")
    key = "b/inbox/reuploaded.nii.gz"
    before = set(_job_states(up))
    v1 = upload(up, "b", key, nifti_bytes(shape=(80, 72, 64), seed=21))
    assert push(up, "b", key, v1).status_code == 202
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not set(_job_states(up)) - before:
        time.sleep(0.2)
    running = set(_job_states(up)) - before
    assert running, "version 1's job was not claimed within 60 s"
    v2 = upload(up, "b", key, nifti_bytes(shape=(24, 20, 22), seed=22))
    assert [_job_states(up)[k] for k in running] == ["running"], "version 1's job ended before the re-upload"
    assert push(up, "b", key, v2).status_code == 202
    doc = wait_job_json(job_json_uri(up, "b", key), b.s3, etag=v2, timeout=300)
    assert doc["status"] == "succeeded", doc
    deadline = time.monotonic() + 300  # version 1's job settles as well; then look at the case folder again
    while time.monotonic() < deadline and any(_job_states(up).get(k) in ("queued", "running") for k in running):
        time.sleep(1)
    assert not any(_job_states(up).get(k) in ("queued", "running") for k in running)
    final = json.loads(staging.download_bytes(job_json_uri(up, "b", key), settings=b.s3))
    assert final["input"]["etag"].strip('"') == v2 and final["status"] == "succeeded", final["input"]


def test_seaweedfs_http_and_grpc_ports_refuse_requests_without_credentials(up_two_sites):
    from serve.storage.embedded_s3 import HOST, SEAWEED_OPEN_PORTS
    from tests.helpers.seaweed_probes import GRPC_PORTS, file_ids, h2_answer, is_settings_frame

    up = up_two_sites
    secret = b"site b's scan, not for a local user " * 8
    upload(up, "b", "b/inbox/ports.nii.gz", secret)

    def url(flag: str, path: str) -> str:
        return f"http://{HOST}:{up.weed_ports[flag]}{path}"

    r = httpx.get(url("filer.port", f"/buckets/{BUCKET}/b/inbox/ports.nii.gz"))
    assert r.status_code != 200 and secret not in r.content
    r = httpx.get(url("master.port", "/dir/assign"))
    assert r.status_code != 200 and b"fid" not in r.content
    fids = file_ids(up.weed_dir / "data", BUCKET)
    assert fids
    for fid in fids:
        r = httpx.get(url("volume.port", f"/{fid}"))
        assert r.status_code == 401 and secret not in r.content, (fid, r.status_code)
    for flag in GRPC_PORTS:
        with socket.create_connection((HOST, up.weed_ports[flag]), timeout=5) as plain:
            assert not is_settings_frame(h2_answer(plain)), f"{flag} speaks gRPC without TLS"
        ctx = ssl.create_default_context(cafile=str(up.weed_dir / "tls" / "ca.crt"))
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection((HOST, up.weed_ports[flag]), timeout=5) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname=HOST) as s:
                    answer = h2_answer(s)
            except (ssl.SSLError, ConnectionError):
                answer = b""
        assert not is_settings_frame(answer), f"{flag} answers without a client certificate"
    assert len(up.stack.open_ports) == len(SEAWEED_OPEN_PORTS)  # what stays open is named in the banner
    site_b_job_succeeds(up)


def test_a_revoked_key_is_refused_within_30_s(up_two_sites):
    """Site a's key is replaced in the tenants file the stack runs with (and put back afterwards)."""
    from serve.cluster.sites import write_tenants

    up = up_two_sites
    hdr = {"Authorization": f"Bearer {up.site('a').api_key}"}
    assert httpx.get(f"{up.url}/v1/structures", headers=hdr, timeout=30).status_code == 200
    tenants = Path(up.stack.work_dir) / "tenants.yaml"
    original = tenants.read_bytes()
    try:
        write_tenants(tenants, {"a": "mrs_" + secrets.token_urlsafe(24), "b": up.site("b").api_key})
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30 and \
                httpx.get(f"{up.url}/v1/structures", headers=hdr, timeout=30).status_code != 401:
            time.sleep(0.5)
        assert httpx.get(f"{up.url}/v1/structures", headers=hdr, timeout=30).status_code == 401
        assert push(up, "a", "a/inbox/x.nii.gz", "0" * 32).status_code == 401
        site_b_job_succeeds(up)
    finally:  # the other tests of the package use site a's key: wait until it is taken again
        tenants.write_bytes(original)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30 and \
                httpx.get(f"{up.url}/v1/structures", headers=hdr, timeout=30).status_code != 200:
            time.sleep(0.5)
