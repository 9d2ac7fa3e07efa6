"""The embedded SeaweedFS is locked down: per-site S3 identities, no unauthenticated HTTP or gRPC.

One server for the module, with two site identities; the attacker holds
site-a's S3 keys (or none) and may connect to every port on 127.0.0.1.
"""

from __future__ import annotations

import socket
import ssl
import stat

import httpx
import pytest
from botocore.exceptions import ClientError

from serve.storage.embedded_s3 import HOST, SEAWEED_OPEN_PORTS, SeaweedServer
from serve.storage.s3client import make_client
from tests.helpers.seaweed_probes import GRPC_PORTS, file_ids, h2_answer, is_settings_frame

pytestmark = pytest.mark.s3

BUCKET = "mriseg"
SHARED = "shared"  # a bucket one identity has whole
SECRET = b"site-b's scan: not for site-a " * 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = SeaweedServer(tmp_path_factory.mktemp("weed-locked"), buckets=[BUCKET, SHARED],
                      identities={"site-a": [f"s3://{BUCKET}/site-a/"], "site-b": [f"s3://{BUCKET}/site-b/"],
                                  "whole": [f"s3://{SHARED}/"]})
    s.start()
    admin = s.client()
    admin.put_object(Bucket=BUCKET, Key="site-b/inbox/scan.nii.gz", Body=SECRET)
    admin.put_object(Bucket=BUCKET, Key="_jobs/jobs/job.json", Body=b"{}")
    admin.put_object(Bucket=BUCKET, Key="site-a/outbox/site-a/case/job.json", Body=b"{\"by\": \"server\"}")
    yield s
    s.cleanup()


def _code(call) -> str:
    """The S3 error code of ``call``, or "ok"."""
    try:
        call()
        return "ok"
    except ClientError as e:
        return e.response["Error"]["Code"]


def test_a_sites_keys_reach_its_own_prefix_and_nothing_else(server):
    a = make_client(server.identity_settings("site-a"))
    admin = server.client()
    # its own prefix: write, read, list, delete; and read what the server published there
    assert _code(lambda: a.put_object(Bucket=BUCKET, Key="site-a/inbox/mine.nii.gz", Body=b"mine")) == "ok"
    assert a.get_object(Bucket=BUCKET, Key="site-a/inbox/mine.nii.gz")["Body"].read() == b"mine"
    listed = [o["Key"] for o in a.list_objects_v2(Bucket=BUCKET, Prefix="site-a/").get("Contents", [])]
    assert "site-a/inbox/mine.nii.gz" in listed and "site-a/outbox/site-a/case/job.json" in listed
    assert a.get_object(Bucket=BUCKET, Key="site-a/outbox/site-a/case/job.json")["Body"].read() == b'{"by": "server"}'
    assert _code(lambda: a.delete_object(Bucket=BUCKET, Key="site-a/inbox/mine.nii.gz")) == "ok"

    # another site's prefix, the jobs prefix, a sibling that only starts alike, and the bucket root
    for prefix, existing in (("site-b/inbox/", "site-b/inbox/scan.nii.gz"), ("_jobs/jobs/", "_jobs/jobs/job.json"),
                             ("site-ab/", None), ("", None)):
        key = existing or prefix + "x.nii.gz"
        assert _code(lambda: a.get_object(Bucket=BUCKET, Key=key)) == "AccessDenied", key
        assert _code(lambda: a.put_object(Bucket=BUCKET, Key=prefix + "planted.json", Body=b"{}")) == "AccessDenied"
        assert _code(lambda: a.list_objects_v2(Bucket=BUCKET, Prefix=prefix)) == "AccessDenied", prefix
        assert _code(lambda: a.list_objects(Bucket=BUCKET, Prefix=prefix)) == "AccessDenied", prefix
        assert _code(lambda: a.delete_object(Bucket=BUCKET, Key=key)) == "AccessDenied", key
        assert _code(lambda: a.copy_object(Bucket=BUCKET, Key="site-a/stolen", CopySource={
            "Bucket": BUCKET, "Key": key})) == "AccessDenied", key
    batch = a.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": "site-b/inbox/scan.nii.gz"}]})
    assert [e["Code"] for e in batch.get("Errors", [])] == ["AccessDenied"] and not batch.get("Deleted")
    # a dot segment does not walk out of the prefix
    assert _code(lambda: a.get_object(Bucket=BUCKET, Key="site-a/../site-b/inbox/scan.nii.gz")) != "ok"
    assert _code(lambda: a.create_bucket(Bucket="site-a-own")) == "AccessDenied"

    assert admin.get_object(Bucket=BUCKET, Key="site-b/inbox/scan.nii.gz")["Body"].read() == SECRET
    assert admin.get_object(Bucket=BUCKET, Key="_jobs/jobs/job.json")["Body"].read() == b"{}"
    everything = [o["Key"] for o in admin.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert not [k for k in everything if "planted" in k or "stolen" in k], everything
    # and site-b's own keys do reach its object
    b = make_client(server.identity_settings("site-b"))
    assert b.get_object(Bucket=BUCKET, Key="site-b/inbox/scan.nii.gz")["Body"].read() == SECRET


def test_an_identity_may_have_a_whole_bucket_and_nothing_beyond_it(server):
    whole = make_client(server.identity_settings("whole"))
    whole.put_object(Bucket=SHARED, Key="top.json", Body=b"{}")
    assert [o["Key"] for o in whole.list_objects_v2(Bucket=SHARED)["Contents"]] == ["top.json"]
    assert _code(lambda: whole.get_object(Bucket=BUCKET, Key="site-b/inbox/scan.nii.gz")) == "AccessDenied"
    assert _code(lambda: whole.list_objects_v2(Bucket=BUCKET)) == "AccessDenied"


@pytest.mark.parametrize("prefix", ["s3://b/site-a/../site-b/", "s3://b/site-*/", "b/site-a/"])
def test_an_identity_prefix_that_would_grant_more_than_it_says_is_refused(tmp_path, prefix):
    from serve.errors import MrisegError

    with pytest.raises(MrisegError):
        SeaweedServer(tmp_path, identities={"x": [prefix]})
    with pytest.raises(MrisegError, match="known: \\['x'\\]"):
        SeaweedServer(tmp_path, identities={"x": ["s3://b/x/"]}).identity_settings("y")


def test_filer_master_and_volume_http_refuse_requests_without_credentials(server):
    def url(flag: str, path: str) -> str:
        return f"http://{HOST}:{server.ports[flag]}{path}"

    r = httpx.get(url("filer.port", f"/buckets/{BUCKET}/site-b/inbox/scan.nii.gz"))
    assert r.status_code != 200 and SECRET not in r.content, r.status_code
    r = httpx.get(url("filer.port", f"/buckets/{BUCKET}/site-b/inbox/"), headers={"Accept": "application/json"})
    assert r.status_code != 200 and b"scan.nii.gz" not in r.content
    r = httpx.put(url("filer.port", f"/buckets/{BUCKET}/_jobs/jobs/forged.json"), content=b"{}")
    assert r.status_code >= 400
    assert _code(lambda: server.client().head_object(Bucket=BUCKET, Key="_jobs/jobs/forged.json")) == "404"

    r = httpx.get(url("master.port", "/dir/assign"))  # would hand out a file id to write
    assert r.status_code != 200 and b"fid" not in r.content, r.text
    fids = file_ids(server.data_dir / "data", BUCKET)
    assert fids, "no volume of the bucket on disk?"
    r = httpx.get(url("master.port", f"/dir/lookup?volumeId={fids[0].split(',')[0]}"))
    assert r.status_code != 200 and b"locations" not in r.content, r.text
    for fid in fids:
        r = httpx.get(url("volume.port", f"/{fid}"))
        assert r.status_code == 401 and SECRET not in r.content, (fid, r.status_code)
        r = httpx.post(url("volume.port", f"/{fid}"), files={"file": ("x", b"overwritten")})
        assert r.status_code == 401, (fid, r.status_code)
    assert server.client().get_object(Bucket=BUCKET, Key="site-b/inbox/scan.nii.gz")["Body"].read() == SECRET

    # what stays open is what SEAWEED_OPEN_PORTS says (so the banner and the docs stay true)
    for path, flag in (("/cluster/status", "master.port"), ("/status", "volume.port"), ("/health", "admin.port")):
        assert flag in {p.flag for p in SEAWEED_OPEN_PORTS}
        assert httpx.get(url(flag, path)).status_code == 200, (flag, path)


def test_grpc_ports_want_a_client_certificate_the_server_issued(server):
    for flag in GRPC_PORTS:
        addr = (HOST, server.ports[flag])
        with socket.create_connection(addr, timeout=5) as plain:  # plaintext gRPC
            assert not is_settings_frame(h2_answer(plain)), f"{flag} speaks gRPC without TLS"

        def tls(cert: bool) -> bytes:
            ctx = ssl.create_default_context(cafile=str(server.tls_dir / "ca.crt"))
            ctx.set_alpn_protocols(["h2"])
            if cert:
                ctx.load_cert_chain(server.tls_dir / "client.crt", server.tls_dir / "client.key")
            with socket.create_connection(addr, timeout=5) as raw:
                try:
                    with ctx.wrap_socket(raw, server_hostname=HOST) as s:
                        return h2_answer(s)
                except (ssl.SSLError, ConnectionError):
                    return b""

        assert not is_settings_frame(tls(cert=False)), f"{flag} answers without a client certificate"
        # the refusal is for the missing certificate: with the issued one, the same port answers
        assert is_settings_frame(tls(cert=True)), flag


def test_keys_certificates_and_configs_are_the_owners_only(server):
    d = server.data_dir
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    secret_files = [d / "s3.json", d / "security.toml", *sorted(server.tls_dir.iterdir())]
    assert {p.name for p in secret_files} >= {"s3.json", "security.toml", "ca.crt", "client.key", "filer.key"}
    for p in secret_files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert not [p for p in server.tls_dir.iterdir() if p.name.startswith("ca") and p.suffix == ".key"]
    sec = (d / "security.toml").read_text()
    for section in ("[jwt.signing]", "[jwt.signing.read]", "[jwt.filer_signing]", "[jwt.filer_signing.read]"):
        assert section in sec
