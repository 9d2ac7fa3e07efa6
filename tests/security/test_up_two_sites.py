"""`mriseg up --sites a,b` as users start it: Ray's token, and each site's own key, inbox and S3 identity."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.s3]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


def _pids(match) -> list[int]:
    """Processes whose command line (NULs as spaces) ``match`` accepts; ones that vanish meanwhile are skipped."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if d.name.isdigit() and match(cmd, int(d.name)):
                pids.append(int(d.name))
        except OSError:  # gone since it was listed
            continue
    return pids


def _gcs_pids(ray_tmp: str) -> list[int]:
    return _pids(lambda cmd, _: "gcs_server" in cmd and ray_tmp in cmd)


def _replica_pids(deployment: str, home: Path) -> list[int]:
    """Processes of ``deployment``'s Serve replicas (Ray names them ``ray::ServeReplica:<app>:<deployment>``)
    in the stack whose HOME is ``home`` (other tests' clusters may run beside it)."""
    return _pids(lambda cmd, pid: cmd.startswith(f"ray::ServeReplica:mriseg:{deployment}")
                 and _environ(pid).get("HOME") == str(home))


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads Ray's environment from /proc")
def test_up_as_users_start_it_leaves_ray_token_auth_on(up_two_sites):
    """`mriseg up` with RAY_AUTH_MODE unset: Ray's ports (all interfaces) want Ray's token; the stack serves."""
    from serve.cli.stack import run_demo_through_stack

    stack, state_file, log = up_two_sites.stack, up_two_sites.state_file, up_two_sites.log
    gcs = _gcs_pids(stack.ray_tmp)
    assert len(gcs) == 1, gcs
    assert _environ(gcs[0]).get("RAY_AUTH_MODE") == "token"
    token_file = up_two_sites.home / ".ray" / "auth_token"  # Ray's own place for it
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600  # Ray writes it world-readable under umask 022
    assert len(token) >= 32
    assert token not in state_file.read_text() and token not in log.read_text(errors="replace")
    out = run_demo_through_stack(stack, up_two_sites.tmp / "demo", quiet=True)
    assert out["job"]["status"] == "succeeded"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads Ray's environment from /proc")
def test_up_gives_each_site_its_own_key_inbox_and_s3_identity(up_two_sites):
    """`mriseg up --sites a,b`: a's S3 keys reach a's prefix only; b's pushed volume is segmented into b's
    outbox; the job records lie outside both prefixes, signed with a key only the stack's workers hold; the
    banner shows each site's keys and the open ports, never the server identity's secret."""
    import json

    import httpx
    from botocore.exceptions import ClientError

    from serve.router.tenancy import Tenancy
    from serve.cluster.sites import JOBS_PREFIX
    from serve.demo import demo_volume
    from serve.storage.embedded_s3 import SEAWEED_OPEN_PORTS
    from serve.storage.s3client import S3Settings, make_client
    from serve.imaging.nifti import write_nifti

    stack, log = up_two_sites.stack, up_two_sites.log.read_text(errors="replace")
    state = up_two_sites.state_file.read_text()
    work = Path(stack.work_dir)
    sites = {s.name: s for s in stack.sites}
    assert list(sites) == ["a", "b"] and (stack.site, stack.api_key) == ("a", sites["a"].api_key)
    assert sites["a"].prefix == "s3://mriseg/a/" and sites["b"].inbox == "s3://mriseg/b/inbox/"
    assert len({s.api_key for s in sites.values()}) == 2
    assert len({s.s3["access_key_id"] for s in sites.values()}) == 2

    # the tenants file: each site with its prefix, only key digests
    tenants = Tenancy.load(work / "tenants.yaml")
    for name, site in sites.items():
        assert site.api_key not in (work / "tenants.yaml").read_text()
        assert tenants.authenticate(site.api_key).name == name
        assert tenants.sites[name].prefixes == (site.prefix,)
        assert not tenants.sites[name].owns(JOBS_PREFIX + "jobs/x.json")

    # the banner: every site's API key and S3 keys, the open ports; the server identity's secret nowhere
    server = next(i for i in json.loads((work / "s3" / "s3.json").read_text())["identities"]
                  if "Admin" in i["actions"])["credentials"][0]
    for site in sites.values():
        assert site.api_key in log and site.s3["access_key_id"] in log and site.s3["secret_access_key"] in log
    assert server["secretKey"] not in log and server["secretKey"] not in state
    assert len(stack.open_ports) == len(SEAWEED_OPEN_PORTS) and all(p.split(" ")[0] in log for p in stack.open_ports)

    # the record key: generated into the private work dir, and what the event intake's workers read
    key_file = Path(stack.record_key_file)
    assert key_file.parent == work and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    intake = _replica_pids("EventIntake", up_two_sites.home)
    assert intake and all(_environ(p).get("MRISEG_RECORD_KEY_FILE") == str(key_file) for p in intake)

    a = make_client(S3Settings.from_mapping(sites["a"].s3))
    b = make_client(S3Settings.from_mapping(sites["b"].s3))
    vol = demo_volume()
    scan = write_nifti(up_two_sites.tmp / "b-scan.nii.gz", vol.data, vol.affine).read_bytes()
    etag = b.put_object(Bucket="mriseg", Key="b/inbox/case1.nii.gz", Body=scan)["ETag"].strip('"')

    def denied(call) -> bool:
        try:
            call()
        except ClientError as e:
            return e.response["Error"]["Code"] == "AccessDenied"
        return False

    # site a's S3 keys on b's prefix and on the job records: Get, Put, List, Delete all denied
    for prefix in ("b/inbox/", "_jobs/"):
        assert denied(lambda: a.get_object(Bucket="mriseg", Key="b/inbox/case1.nii.gz"))
        assert denied(lambda: a.put_object(Bucket="mriseg", Key=prefix + "planted.json", Body=b"{}"))
        assert denied(lambda: a.list_objects_v2(Bucket="mriseg", Prefix=prefix))
        assert denied(lambda: a.delete_object(Bucket="mriseg", Key="b/inbox/case1.nii.gz"))
    a.put_object(Bucket="mriseg", Key="a/inbox/mine.nii.gz", Body=b"x")  # and allowed on its own
    own = [o["Key"] for o in a.list_objects_v2(Bucket="mriseg", Prefix="a/")["Contents"]]
    assert "a/inbox/mine.nii.gz" in own and all(k.startswith("a/") for k in own)

    # b's pushed volume is segmented into b's outbox
    obj = {"key": "b/inbox/case1.nii.gz", "eTag": etag}
    body = {"Records": [{"eventName": "ObjectCreated:Put", "eventSource": "minio:s3",
                         "s3": {"bucket": {"name": "mriseg"}, "object": obj}}]}
    r = httpx.post(f"{stack.url}/v1/events", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {sites['b'].api_key}"})
    assert r.status_code == 202 and r.json()["jobs"][0]["output_prefix"] == "s3://mriseg/b/outbox/b/case1/", r.text
    deadline, doc = time.monotonic() + 300, {}
    while time.monotonic() < deadline and doc.get("status") not in ("succeeded", "failed"):
        try:
            doc = json.loads(b.get_object(Bucket="mriseg", Key="b/outbox/b/case1/job.json")["Body"].read())
        except ClientError:
            time.sleep(1)
    assert doc.get("status") == "succeeded", doc


