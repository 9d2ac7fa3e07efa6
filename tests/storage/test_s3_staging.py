"""S3 staging against a real SeaweedFS on loopback: checksums, limits, 4xx errors, outages."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import threading
import time

import pytest

from serve.storage import staging
from serve.storage.embedded_s3 import SeaweedServer
from serve.errors import MrisegError, StorageError, VolumeTooLargeError

pytestmark = pytest.mark.s3


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket the process holds, from /proc (IPv4 and IPv6)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                hexaddr, hexport = local.split(":")
                if len(hexaddr) == 8:
                    addr = ".".join(str(b) for b in reversed(bytes.fromhex(hexaddr)))
                else:
                    addr = "ipv6:" + hexaddr
                found.add((addr, int(hexport, 16)))
    return found


def test_seaweed_listens_on_loopback_only(seaweed):
    socks = listening_sockets(seaweed.proc.pid)
    assert socks, "weed listens on nothing?"
    assert {addr for addr, _ in socks} == {"127.0.0.1"}, socks
    ports = {port for _, port in socks}
    assert seaweed.ports["s3.port"] in ports and seaweed.ports["master.port"] in ports
    assert ports <= set(seaweed.ports.values()), ports - set(seaweed.ports.values())
    defaults = {9333, 19333, 9340, 19340, 8888, 18888, 8333, 18333, 23646, 7333, 8181, 9101, 6060}
    assert not ports & defaults


def test_a_small_file_round_trips_verified_by_its_sha256(seaweed, tmp_path, unique_prefix):
    src = tmp_path / "vol.nii.gz"
    src.write_bytes(os.urandom(300_000))
    uri = f"s3://inbox/{unique_prefix}/vol.nii.gz"
    up = staging.upload_file(src, uri, seaweed.settings)
    head = seaweed.client().head_object(Bucket="inbox", Key=f"{unique_prefix}/vol.nii.gz", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(src.read_bytes()).digest()).decode()
    got = staging.download_file(uri, tmp_path / "back.nii.gz", settings=seaweed.settings)
    assert (tmp_path / "back.nii.gz").read_bytes() == src.read_bytes()
    assert got.verified == "sha256" and got.sha256 == up.sha256
    assert staging.download_bytes(uri, settings=seaweed.settings) == src.read_bytes()


def test_multipart_round_trip_verified_by_metadata(seaweed, tmp_path, unique_prefix):
    src = tmp_path / "big.nii"
    src.write_bytes(os.urandom(staging.MULTIPART_THRESHOLD + 3 * 1024 * 1024))
    uri = f"s3://inbox/{unique_prefix}/big.nii"
    up = staging.upload_file(src, uri, seaweed.settings)
    head = seaweed.client().head_object(Bucket="inbox", Key=f"{unique_prefix}/big.nii", ChecksumMode="ENABLED")
    # a multipart ETag is not an MD5 of the object
    assert head["ETag"].strip('"') != hashlib.md5(src.read_bytes()).hexdigest()
    got = staging.download_file(uri, tmp_path / "back.nii", settings=seaweed.settings)
    assert got.sha256 == up.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert got.verified in ("sha256", "sha256-metadata")


def test_corrupted_object_fails_verification(seaweed, tmp_path, unique_prefix):
    key = f"{unique_prefix}/tampered.nii"
    # an object whose sha256 metadata disagrees with its bytes (no whole-object checksum)
    seaweed.client().put_object(Bucket="inbox", Key=key, Body=b"actual bytes",
                                Metadata={"sha256": hashlib.sha256(b"other bytes").hexdigest()})
    with pytest.raises(staging.IntegrityError):
        staging.download_bytes(f"s3://inbox/{key}", settings=seaweed.settings)


def test_size_limit_aborts_download(seaweed, tmp_path, unique_prefix):
    uri = f"s3://inbox/{unique_prefix}/large.nii"
    staging.put_bytes(b"x" * 50_000, uri, seaweed.settings)
    with pytest.raises(VolumeTooLargeError, match="limit"):
        staging.download_file(uri, tmp_path / "x.nii", max_bytes=10_000, settings=seaweed.settings)
    assert not (tmp_path / "x.nii").exists() and not (tmp_path / "x.nii.part").exists()


def test_wrong_credentials_is_clear_4xx_job_error(seaweed, tmp_path, unique_prefix):
    bad = seaweed.settings.model_copy(update={"secret_access_key": "not-the-secret"})
    key = f"{unique_prefix}/secret-patient-name.nii.gz"
    with pytest.raises(staging.S3RequestError) as ei:
        staging.download_bytes(f"s3://inbox/{key}", settings=bad)
    err = ei.value
    assert isinstance(err, StorageError) and 400 <= err.status < 500 and not err.retryable
    assert "inbox" in err.message and "secret-patient-name" not in err.message
    src = tmp_path / "f.json"
    src.write_text("{}")
    with pytest.raises(staging.S3RequestError) as ei:
        staging.upload_file(src, f"s3://outbox/{key}", settings=bad)
    assert ei.value.status == 403 and "key" in ei.value.message


def test_missing_object_and_bucket_are_404(seaweed, unique_prefix):
    with pytest.raises(staging.S3RequestError) as ei:
        staging.download_bytes(f"s3://inbox/{unique_prefix}/nope.nii", settings=seaweed.settings)
    assert ei.value.status == 404
    with pytest.raises(staging.S3RequestError) as ei:
        staging.put_bytes(b"x", "s3://no-such-bucket/x", seaweed.settings)
    assert ei.value.status == 404


def test_a_reupload_that_fails_halfway_leaves_no_done_marker(seaweed, tmp_path, unique_prefix, monkeypatch):
    """The old set's job.json must not vouch for a mix of old and new files."""
    from serve.cli.bulk import already_done

    prefix = f"s3://outbox/{unique_prefix}/site-a/case1/"

    def output_set(run: str):
        d = tmp_path / run
        d.mkdir()
        (d / "segmentations.nii.gz").write_bytes(run.encode())
        (d / "statistics.json").write_text(run)
        (d / "job.json").write_text('{"status": "done"}')
        return d

    staging.upload_dir(output_set("run1"), prefix, seaweed.settings)
    assert already_done(prefix, seaweed.settings)
    real, calls = staging.upload_file, []

    def second_fails(path, uri, settings=None, **kw):
        calls.append(uri)
        if len(calls) == 2:
            raise staging.S3UnavailableError("simulated outage")
        return real(path, uri, settings, **kw)

    monkeypatch.setattr(staging, "upload_file", second_fails)
    with pytest.raises(staging.S3UnavailableError):
        staging.upload_dir(output_set("run2"), prefix, seaweed.settings)
    assert staging.download_bytes(prefix + "segmentation.nii.gz", settings=seaweed.settings) == b"run2"
    assert staging.object_exists(prefix + "job.json", seaweed.settings) is None
    assert not already_done(prefix, seaweed.settings)  # a resumed bulk run computes it again


def test_upload_dir_layout_job_json_last(seaweed, tmp_path, unique_prefix):
    out = tmp_path / "out"
    (out / "segmentations").mkdir(parents=True)
    (out / "segmentations.nii.gz").write_bytes(b"seg")
    (out / "segmentations" / "liver.nii.gz").write_bytes(b"liver")
    (out / "statistics.json").write_text("{}")
    (out / "preview.png").write_bytes(b"png")
    (out / "mriseg.json").write_text("{}")
    (out / "job.json").write_text('{"status": "done"}')
    order = []
    got = staging.upload_dir(out, f"s3://outbox/{unique_prefix}/site-a/case1/", seaweed.settings,
                             on_uploaded=order.append)
    assert order[-1] == "job.json"
    assert set(got) == {"segmentation.nii.gz", "structures/liver.nii.gz", "statistics.json", "preview.png",
                        "job.json"}
    keys = {o["Key"] for o in seaweed.client().list_objects_v2(Bucket="outbox", Prefix=unique_prefix)["Contents"]}
    assert f"{unique_prefix}/site-a/case1/structures/liver.nii.gz" in keys


def test_outage_during_upload_is_retried_to_success(tmp_path):
    """Stop SeaweedFS after the first output file, restart it (same ports, same data) 3 s later."""
    server = SeaweedServer(tmp_path / "weed", buckets=["outbox"])
    server.start()
    try:
        out = tmp_path / "out"
        out.mkdir()
        for name in ("a.json", "b.json", "c.json", "job.json"):
            (out / name).write_text(name)
        restarted = threading.Event()
        threads: list[threading.Thread] = []

        def restart_later() -> None:
            time.sleep(3)
            server.start()
            restarted.set()

        def after(name: str) -> None:
            if name == "a.json" and not restarted.is_set() and server.running:
                server.stop()
                threads.append(threading.Thread(target=restart_later, daemon=True))
                threads[0].start()

        got = staging.upload_dir(out, "s3://outbox/site/case/", server.settings, on_uploaded=after)
        assert threads, "the server was never stopped"
        threads[0].join(timeout=120)
        assert restarted.is_set()
        assert set(got) == {"a.json", "b.json", "c.json", "job.json"}
        for name in got:
            assert staging.download_bytes(got[name], settings=server.settings) == name.encode()
    finally:
        server.cleanup()


def test_outage_longer_than_deadline_is_clear_502(tmp_path):
    server = SeaweedServer(tmp_path / "weed2", buckets=["outbox"])
    server.start()
    server.stop()
    try:
        with pytest.raises(staging.S3UnavailableError) as ei:
            staging.put_bytes(b"x", "s3://outbox/k", server.settings, deadline_s=1.0)
        assert ei.value.status == 502 and ei.value.retryable
    finally:
        server.cleanup()


def test_uploaded_results_end_with_a_succeeded_job_json_when_caller_wrote_none(seaweed, tmp_path, unique_prefix):
    """The API's outputs (writers' folder, no job.json) still get the completion marker, last."""
    import json

    out = tmp_path / "apiout"
    out.mkdir()
    (out / "segmentations.nii.gz").write_bytes(b"seg")
    (out / "mriseg.json").write_text(json.dumps({"structures": {"5": "liver"}, "models": {"organs": "c1"},
                                                 "fast": False, "files": {"multilabel": "segmentations.nii.gz"}}))
    from serve.jobs.results import upload_results

    order = []
    got = upload_results(out, f"s3://outbox/{unique_prefix}/api/", seaweed.settings, on_uploaded=order.append)
    assert order == ["segmentation.nii.gz", "job.json"]
    doc = json.loads(staging.download_bytes(got["job.json"], settings=seaweed.settings))
    assert doc["status"] == "succeeded" and doc["models"] == {"organs": "c1"} and doc["files"] == ["segmentation.nii.gz"]


@pytest.mark.parametrize("uri", ["s3://inbox", "s3://inbox/", "s3://inbox/site-a/"])
def test_a_bucket_or_folder_is_not_an_object_400_not_an_outage(uri):
    """It used to reach botocore's parameter validation and read as '502 S3 unavailable, try again'."""
    with pytest.raises(MrisegError) as ei:
        staging.download_bytes(uri)
    assert ei.value.status == 400 and "not an object" in ei.value.message and not ei.value.retryable


@pytest.mark.parametrize("setting,says", [
    ({"path_style": "false"}, "path_style must be true or false"),  # a string would have been truthy
    ({"max_attempts": "5"}, "max_attempts must be an integer"),
    ({"connect_timeout_s": 0}, "connect_timeout_s must be a finite number > 0"),
    ({"endpoint_url": "minio:9000"}, "endpoint_url must be an http"),
    ({"secret_access_key": 12345}, "(hidden)"),
])
def test_s3_settings_are_type_checked(setting, says):
    from serve.storage.s3client import S3Settings

    with pytest.raises(MrisegError, match=re.escape(says)):
        S3Settings.from_mapping(setting)


def test_embedded_servers_die_with_the_process_that_started_them(tmp_path):
    """They run in their own session; a starter killed outright must not leave them holding ports and keys."""
    import subprocess
    import sys

    code = ("from serve.storage.embedded_s3 import MotoServer, SeaweedServer\n"
            f"s = SeaweedServer({str(tmp_path / 'weed')!r}).start()\n"
            f"m = MotoServer(log_dir={str(tmp_path / 'moto')!r}).start()\n"
            "print(s.proc.pid, m.proc.pid, flush=True)\n"
            "import time; time.sleep(120)\n")
    starter = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    pids = [int(p) for p in starter.stdout.readline().split()]
    assert len(pids) == 2
    starter.kill()
    starter.wait()

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 20
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids), pids


def test_an_object_replaced_between_head_and_get_is_read_again(seaweed, unique_prefix):
    """A site re-uploading a scan while a job reads it: the job reads the new version, never a mix of two."""
    key = f"{unique_prefix}/replaced.nii"
    uri = f"s3://inbox/{key}"
    staging.put_bytes(b"first version", uri, seaweed.settings)
    reader, writer = staging.client_for(seaweed.settings), seaweed.client()
    landed = []

    def another_writer_lands_first(**_):  # runs between our HEAD and our GET, on the real server
        if len(landed) < limit:
            landed.append(os.urandom(24))
            writer.put_object(Bucket="inbox", Key=key, Body=landed[-1])

    reader.meta.events.register("before-call.s3.GetObject", another_writer_lands_first)
    try:
        limit = 1
        assert staging.download_bytes(uri, settings=seaweed.settings) == landed[-1]  # was a 412 job failure
        landed.clear()
        limit = 100  # rewritten faster than it can be read: a clear, final 412, not a loop
        with pytest.raises(staging.S3RequestError, match="412"):
            staging.download_bytes(uri, settings=seaweed.settings)
        assert len(landed) == staging.REPLACED_RETRIES + 1
    finally:
        reader.meta.events.unregister("before-call.s3.GetObject", another_writer_lands_first)


def test_a_pinned_version_is_read_not_the_current_one(moto, tmp_path, unique_prefix):
    """An event names the version it announces; a newer one landing first must not be read in its place."""
    c = moto.client()
    c.create_bucket(Bucket="versioned")
    c.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
    uri = f"s3://versioned/{unique_prefix}/scan.nii"
    v1 = staging.put_bytes(b"first version", uri, moto.settings)["VersionId"]
    staging.put_bytes(b"second version", uri, moto.settings)
    info = staging.download_file(uri, tmp_path / "v1", settings=moto.settings, version_id=v1)
    assert (tmp_path / "v1").read_bytes() == b"first version" and info.version_id == v1
    staging.download_file(uri, tmp_path / "now", settings=moto.settings)
    assert (tmp_path / "now").read_bytes() == b"second version"
    # a bucket without versioning reports "null": the current object is read
    staging.download_file(uri, tmp_path / "null", settings=moto.settings, version_id="null")
    assert (tmp_path / "null").read_bytes() == b"second version"
