"""Sites, API keys and S3 prefixes (no Ray)."""

import hashlib
import hmac
import json
import logging

import pytest

from serve.router import tenancy as tenancy_mod
from serve.router.tenancy import Tenancy
from serve.errors import AuthenticationError, ForbiddenError, MrisegError

KEY_A = "alpha-key-0123456789abcdef"
KEY_B = "bravo-key-0123456789abcdef"


def _cfg():
    return {"sites": {
        "site-a": {"keys": [KEY_A], "prefixes": ["s3://consortium/site-a/"], "max_concurrent_jobs": 3},
        "site-b": {"key_sha256": [hashlib.sha256(KEY_B.encode()).hexdigest()],
                   "prefixes": ["s3://consortium/site-b/", "s3://site-b-private"]},
    }}


def _contains(obj, needle, seen=None) -> bool:
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, (str, bytes)):
        return needle in (obj if isinstance(obj, str) else obj.decode("latin1"))
    if isinstance(obj, dict):
        return any(_contains(k, needle, seen) or _contains(v, needle, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return any(_contains(v, needle, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return _contains(vars(obj), needle, seen)
    return False


def test_keys_map_to_sites_and_only_digests_are_kept():
    t = Tenancy.from_mapping(_cfg())
    assert t.authenticate(KEY_A).name == "site-a"
    assert t.authenticate(KEY_B).name == "site-b"
    assert t.sites["site-a"].max_concurrent_jobs == 3
    assert not _contains(t, KEY_A) and not _contains(t, KEY_B)


@pytest.mark.parametrize("key", [None, "", "wrong-key-0123456789abcdef", KEY_A + " "])
def test_bad_keys_are_401(key):
    with pytest.raises(AuthenticationError) as e:
        Tenancy.from_mapping(_cfg()).authenticate(key)
    assert e.value.status == 401


def test_every_digest_is_compared_without_early_exit(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(tenancy_mod.hmac, "compare_digest", counting)
    t = Tenancy.from_mapping(_cfg())
    t.authenticate(KEY_A)  # the first digest matches; the others are still compared
    assert len(calls) == 2


def test_tenants_load_from_a_file_or_env_and_refuse_none_or_unreadable(tmp_path, monkeypatch):
    f = tmp_path / "tenants.json"
    f.write_text(json.dumps(_cfg()))
    assert Tenancy.load(f).authenticate(KEY_A).name == "site-a"
    monkeypatch.setenv(tenancy_mod.TENANTS_FILE_ENV, str(f))
    assert Tenancy.load().authenticate(KEY_B).name == "site-b"
    monkeypatch.delenv(tenancy_mod.TENANTS_FILE_ENV)
    monkeypatch.setenv(tenancy_mod.TENANTS_JSON_ENV, json.dumps(_cfg()))
    assert Tenancy.load().authenticate(KEY_A).name == "site-a"
    monkeypatch.delenv(tenancy_mod.TENANTS_JSON_ENV)
    with pytest.raises(MrisegError, match="no tenants configured"):
        Tenancy.load()
    with pytest.raises(MrisegError, match="cannot be read"):
        Tenancy.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize("bad,says", [
    ({"sites": {"s": {"keys": ["short"]}}}, "at least 16"),
    ({"sites": {"s": {"key_sha256": ["abc"]}}}, "64 hex"),
    ({"sites": {"s": {"prefixes": ["/local/dir"]}}}, "s3://"),
    ({"nosites": {}}, "'sites' mapping"),
    ({"sites": {"s": ["s3://b/s/"]}}, "expected a mapping"),
    ({"sites": {"s": {"prefix": ["s3://b/s/"]}}}, "unknown setting"),         # a typo must not pass silently
    ({"sites": {"s": {"prefixes": "s3://b/s/"}}}, "list of strings"),
    ({"sites": {"s": {"keys": KEY_A}}}, "list of strings"),
    ({"sites": {"s": {"max_concurrent_jobs": "many"}}}, "max_concurrent_jobs must be an integer"),
    ({"sites": {"s": {"max_concurrent_jobs": 0}}}, "max_concurrent_jobs must be an integer >= 1"),
    ({"sites": {"s": {"requests_per_second": float("nan")}}}, "requests_per_second"),
    ({"sites": {"s": {"burst": 0}}}, "burst must be an integer >= 1"),  # 0 would lock the site out for good
    ({"sites": {"a": {"keys": [KEY_A]}, "b": {"keys": [KEY_A]}}}, "share an API key"),
])
def test_bad_tenant_files_are_clear_errors(bad, says):
    with pytest.raises(MrisegError, match=says):
        Tenancy.from_mapping(bad)


def test_a_key_named_in_clear_and_as_digest_for_two_sites_is_refused():
    digest = hashlib.sha256(KEY_A.encode()).hexdigest()
    with pytest.raises(MrisegError, match="sites a and b share an API key"):
        Tenancy.from_mapping({"sites": {"a": {"keys": [KEY_A]}, "b": {"key_sha256": [digest]}}})
    assert Tenancy.from_mapping({"sites": {"a": {"keys": [KEY_A], "key_sha256": [digest]}}}).authenticate(KEY_A)


def test_unparseable_tenants_are_clear_errors_without_content(tmp_path, monkeypatch):
    (tmp_path / "t.yaml").write_text("sites:\n  a: {keys: [" + KEY_A + "\n")
    with pytest.raises(MrisegError, match="not valid YAML") as e:
        Tenancy.from_file(tmp_path / "t.yaml")
    (tmp_path / "b.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(MrisegError, match="not UTF-8"):
        Tenancy.from_file(tmp_path / "b.yaml")
    monkeypatch.delenv("MRISEG_TENANTS_FILE", raising=False)
    monkeypatch.setenv("MRISEG_TENANTS_JSON", '{"sites": {"a": {"keys": ["' + KEY_A + '"]')
    with pytest.raises(MrisegError, match="not valid JSON") as e2:
        Tenancy.load()
    assert KEY_A not in str(e2.value) and KEY_A not in str(e.value)


@pytest.mark.parametrize("uri,ok", [
    ("s3://consortium/site-a/in/case1.nii.gz", True),
    ("s3://consortium/site-a/", True),
    ("s3://consortium/site-ab/case1.nii.gz", False),    # a longer sibling prefix
    ("s3://consortium/site-b/case1.nii.gz", False),
    ("s3://consortium/site-a/../site-b/case1.nii.gz", False),
    ("s3://other-bucket/site-a/case1.nii.gz", False),
])
def test_a_site_owns_only_uris_under_its_own_prefixes(uri, ok):
    site = Tenancy.from_mapping(_cfg()).sites["site-a"]
    assert site.owns(uri) is ok


def test_a_whole_bucket_prefix_owns_that_bucket_not_a_longer_named_one():
    site = Tenancy.from_mapping(_cfg()).sites["site-b"]
    assert site.owns("s3://site-b-private/anything/here.nii.gz")
    assert not site.owns("s3://site-b-private-2/x.nii.gz")


def test_cross_site_access_is_403_and_logged_without_the_key(caplog):
    t = Tenancy.from_mapping(_cfg())
    key = "site-b/PatientSmith_1970-01-01.nii.gz"
    with caplog.at_level(logging.INFO, logger="serve.router.tenancy"):
        with pytest.raises(ForbiddenError) as e:
            t.check_access(t.sites["site-a"], f"s3://consortium/{key}", "read")
    assert e.value.status == 403
    assert "Smith" not in e.value.message
    assert caplog.records and all("Smith" not in r.getMessage() for r in caplog.records)
    assert "site-a" in caplog.text


def _sites(**prefixes):
    return {"sites": {name.replace("_", "-"): {"prefixes": list(p)} for name, p in prefixes.items()}}


@pytest.mark.parametrize("a,b", [
    (["s3://b/x/"], ["s3://b/x/y/"]),            # one inside the other
    (["s3://b/x/y/"], ["s3://b/x/"]),            # either order
    (["s3://b/x/"], ["s3://b/x/"]),              # the same prefix twice
    (["s3://b/x"], ["s3://b/x/"]),               # the same prefix, written without its slash
    (["s3://b"], ["s3://b/x/"]),                 # a whole bucket beside a prefix in it
    (["s3://c/own/", "s3://b/x/"], ["s3://b/x/deep/er/"]),  # any pair of the sites' prefixes
])
def test_overlapping_prefixes_of_two_sites_are_refused_naming_both(a, b):
    with pytest.raises(MrisegError, match="overlap") as e:
        Tenancy.from_mapping(_sites(site_a=a, site_b=b))
    assert "site-a" in e.value.message and "site-b" in e.value.message


@pytest.mark.parametrize("a,b", [
    (["s3://b/x/"], ["s3://b/xy/"]),             # a longer sibling is not inside
    (["s3://b/x"], ["s3://b/xy"]),
    (["s3://b/x/"], ["s3://c/x/"]),              # another bucket
    (["s3://b"], ["s3://bb/x/"]),
])
def test_disjoint_prefixes_are_accepted(a, b):
    t = Tenancy.from_mapping(_sites(site_a=a, site_b=b))
    assert set(t.sites) == {"site-a", "site-b"}


def test_one_sites_own_prefixes_may_nest():
    t = Tenancy.from_mapping(_sites(site_a=["s3://b/x/", "s3://b/x/y/", "s3://b/x/"]))
    assert t.sites["site-a"].owns("s3://b/x/y/z.nii.gz")


def test_a_prefix_with_dot_segments_is_refused():
    with pytest.raises(MrisegError, match="'.' or '..'"):
        Tenancy.from_mapping(_sites(site_a=["s3://b/site-b/../site-a/"]))


# -- the tenants file is re-read when it changes ----------------------------------------------------------
KEY_A2 = "alpha-key-2-0123456789abcdef"
KEY_C = "charlie-key-0123456789abcdef"


def _write(path, cfg) -> None:
    """As an operator or a Kubernetes Secret update does: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg))
    tmp.replace(path)


def _without_key_a():
    cfg = _cfg()
    cfg["sites"]["site-a"]["keys"] = [KEY_A2]
    return cfg


def test_a_key_removed_from_the_file_is_refused_once_the_interval_has_passed(tmp_path, caplog):
    import time

    f = tmp_path / "tenants.json"
    f.write_text(json.dumps(_cfg()))
    t = Tenancy.load(f, reload_interval_s=1.0)
    assert t.authenticate(KEY_A).name == "site-a"
    f.write_text(json.dumps(_without_key_a()))  # rewritten in place: the same inode
    caplog.set_level(logging.INFO, logger="mriseg.audit")
    assert t.authenticate(KEY_A).name == "site-a"  # looked at no more often than the interval
    time.sleep(1.05)
    with pytest.raises(AuthenticationError):
        t.authenticate(KEY_A)
    assert t.authenticate(KEY_A2).name == "site-a" and t.authenticate(KEY_B).name == "site-b"
    record = json.loads(next(r.getMessage() for r in caplog.records if "tenants.reloaded" in r.getMessage()))
    assert record["keys_removed"] == 1 and record["keys_added"] == 1 and record["removed"] == []
    assert KEY_A not in caplog.text and hashlib.sha256(KEY_A.encode()).hexdigest() not in caplog.text


def test_the_default_interval_refuses_a_removed_key_within_30_seconds(tmp_path):
    assert tenancy_mod.RELOAD_INTERVAL_S <= 10
    f = tmp_path / "tenants.json"
    f.write_text(json.dumps(_cfg()))
    assert Tenancy.load(f).reload_interval_s == tenancy_mod.RELOAD_INTERVAL_S


def test_a_removed_site_is_refused_and_a_narrowed_prefix_applies(tmp_path):
    import time

    f = tmp_path / "tenants.json"
    f.write_text(json.dumps(_cfg()))
    t = Tenancy.load(f, reload_interval_s=0.05)
    cfg = _cfg()
    del cfg["sites"]["site-b"]
    cfg["sites"]["site-a"]["prefixes"] = ["s3://consortium/site-a/in/"]
    _write(f, cfg)
    time.sleep(0.1)
    a = t.authenticate(KEY_A)
    with pytest.raises(AuthenticationError):
        t.authenticate(KEY_B)
    assert set(t.sites) == {"site-a"}
    t.check_access(a, "s3://consortium/site-a/in/x.nii.gz", "read")
    with pytest.raises(ForbiddenError):
        t.check_access(a, "s3://consortium/site-a/out/x.nii.gz", "write")


@pytest.mark.parametrize("bad", [
    "sites:\n  a: {keys: [" + KEY_C,                                                   # does not parse
    "",                                                                                # empty
    json.dumps({"sites": {**_without_key_a()["sites"], "site-c": {"keys": [KEY_C], "prefix": ["s3://c/"]}}}),
    json.dumps({"sites": {**_without_key_a()["sites"],                                 # overlapping prefixes
                          "site-c": {"keys": [KEY_C], "prefixes": ["s3://consortium/site-a/x/"]}}}),
    None,                                                                              # the file removed
])
def test_a_file_that_turns_bad_keeps_the_last_good_tenants_and_logs_once(tmp_path, caplog, bad):
    import time

    f = tmp_path / "tenants.json"
    f.write_text(json.dumps(_cfg()))
    t = Tenancy.load(f, reload_interval_s=0.05)
    if bad is None:
        f.unlink()
    else:
        f.write_text(bad)
    caplog.set_level(logging.ERROR, logger="serve.router.tenancy")
    for _ in range(3):
        time.sleep(0.06)
        assert t.authenticate(KEY_A).name == "site-a"  # neither a new key nor lost access: nothing changed
        with pytest.raises(AuthenticationError):
            t.authenticate(KEY_C)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "stay in force" in errors[0].getMessage(), caplog.text
    assert KEY_C not in caplog.text
    _write(f, _without_key_a())  # fixed: the new content applies
    time.sleep(0.06)
    with pytest.raises(AuthenticationError):
        t.authenticate(KEY_A)
    assert t.authenticate(KEY_A2).name == "site-a"


def test_tenants_from_the_environment_are_not_reloaded(monkeypatch):
    monkeypatch.delenv(tenancy_mod.TENANTS_FILE_ENV, raising=False)
    monkeypatch.setenv(tenancy_mod.TENANTS_JSON_ENV, json.dumps(_cfg()))
    t = Tenancy.load(reload_interval_s=0)
    assert t.refresh() is False and t.authenticate(KEY_A).name == "site-a"


def test_the_api_refuses_a_revoked_key_without_a_restart(tmp_path):
    """Through the API's own authentication (FastAPI's TestClient, no Ray): 404 for an unknown job, then 401."""
    import time

    from fastapi.testclient import TestClient

    from serve.api import app as api
    from serve.router.service import JobService, RouterSettings

    f = tmp_path / "tenants.json"
    f.write_text(json.dumps(_cfg()))

    async def never(*_a, **_k):  # no sub-model is reached
        raise AssertionError("no sub-model call expected")

    async def ready() -> dict:
        return {"ready": True}

    svc = JobService(Tenancy.load(f, reload_interval_s=0.1), never, never, [],
                     RouterSettings(results_dir=str(tmp_path / "results")))
    client = TestClient(api.create_app(svc, ready))
    headers = {"Authorization": f"Bearer {KEY_A}"}
    assert client.get("/v1/segmentations/no-such-job", headers=headers).status_code == 404
    _write(f, _without_key_a())
    time.sleep(0.15)
    r = client.get("/v1/segmentations/no-such-job", headers=headers)
    assert r.status_code == 401 and r.json()["status"] == 401, r.text
    assert client.get("/v1/segmentations/no-such-job",
                      headers={"X-API-Key": KEY_A2}).status_code == 404


def test_each_api_app_serves_its_own_job_service(tmp_path):
    """The app is built per replica over that replica's service: two apps in one process share nothing."""
    from fastapi.testclient import TestClient

    from serve.api.app import create_app
    from serve.router.service import JobService, RouterSettings

    async def never(*_a, **_k):  # no sub-model is reached
        raise AssertionError("no sub-model call expected")

    def app_for(sites: dict, name: str):
        svc = JobService(Tenancy.from_mapping({"sites": sites}), never, never, [],
                         RouterSettings(results_dir=str(tmp_path / name)))
        return TestClient(create_app(svc))

    only_a = app_for({"site-a": {"keys": [KEY_A], "prefixes": ["s3://consortium/site-a/"]}}, "a")
    only_b = app_for({"site-b": {"keys": [KEY_B], "prefixes": ["s3://consortium/site-b/"]}}, "b")
    job = "/v1/segmentations/no-such-job"
    assert only_a.get(job, headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 404
    assert only_a.get(job, headers={"Authorization": f"Bearer {KEY_B}"}).status_code == 401
    assert only_b.get(job, headers={"Authorization": f"Bearer {KEY_B}"}).status_code == 404
    assert only_b.get(job, headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 401
    # an app without a service (a replica still starting) answers its health check and 503 elsewhere
    starting = TestClient(create_app())
    assert starting.get("/healthz").status_code == 200 and starting.get("/readyz").status_code == 503
    assert starting.get(job, headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 503
