"""Sites, API keys and S3 prefixes (no Ray)."""

import hashlib
import hmac
import json
import logging

import pytest

from serve.cluster import tenancy as tenancy_mod
from serve.cluster.tenancy import Tenancy
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


def test_loads_from_file_and_env(tmp_path, monkeypatch):
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
def test_site_prefixes(uri, ok):
    site = Tenancy.from_mapping(_cfg()).sites["site-a"]
    assert site.owns(uri) is ok


def test_whole_bucket_prefix():
    site = Tenancy.from_mapping(_cfg()).sites["site-b"]
    assert site.owns("s3://site-b-private/anything/here.nii.gz")
    assert not site.owns("s3://site-b-private-2/x.nii.gz")


def test_cross_site_access_is_403_and_logged_without_the_key(caplog):
    t = Tenancy.from_mapping(_cfg())
    key = "site-b/PatientSmith_1970-01-01.nii.gz"
    with caplog.at_level(logging.INFO, logger="serve.cluster.tenancy"):
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
