"""Numbers in settings files: every reader refuses what YAML hands over by mistake."""
from __future__ import annotations

import math
import re

import pytest
from pydantic import BaseModel

from serve.errors import MrisegError
from serve.jobs.consumer import LocalRunnerSettings, local_submit
from serve.settings_checks import STRICT, check, number, whole


class _Numbers(BaseModel):
    """A settings reader with the shared number types, as every reader in serve/ declares them."""

    model_config = STRICT
    count: whole(1) = 1
    share: number(0) = 0.0
    rate: number(0, above=True, maximum=20) = 1.0
    size: number(1) = 1.0


@pytest.mark.parametrize("value", [True, "5", None, math.inf, -math.inf, math.nan, [5], 0.5])
def test_a_whole_number_setting_refuses_what_is_not_a_whole_number_at_least_one(value):
    with pytest.raises(MrisegError, match=r"numbers: count must be an integer >= 1, not "):
        check(_Numbers, {"count": value}, "numbers")


def test_number_settings_convert_and_report_their_bounds():
    whole_five = check(_Numbers, {"count": 5.0}, "numbers").count
    assert whole_five == 5 and isinstance(whole_five, int)
    two = check(_Numbers, {"share": 2}, "numbers").share
    assert two == 2.0 and isinstance(two, float)
    assert check(_Numbers, {"rate": 0.1}, "numbers").rate == 0.1
    with pytest.raises(MrisegError, match=r"numbers: rate must be a number > 0"):
        check(_Numbers, {"rate": 0}, "numbers")
    with pytest.raises(MrisegError, match=r"must be a number > 0 and <= 20, not 21"):
        check(_Numbers, {"rate": 21}, "numbers")
    with pytest.raises(MrisegError, match=r"not 'xxxx") as caught:  # long values are cut, never echoed whole
        check(_Numbers, {"size": "x" * 1000}, "numbers")
    assert "x" * 200 not in str(caught.value)


@pytest.mark.parametrize("change,says", [
    ({"slots": 0}, "router: slots must be an integer >= 1, not 0"),  # jobs accepted, never run
    ({"slots": "4"}, "router: slots must be an integer"),
    ({"slots": True}, "router: slots must be an integer"),
    ({"submodel_timeout_s": ".inf"}, "router: submodel_timeout_s must be a number"),
    ({"submodel_timeout_s": math.inf}, "router: submodel_timeout_s must be a number >= 1"),
    ({"submodel_retries": -1}, "router: submodel_retries must be an integer >= 0"),
    ({"max_upload_bytes": 1.5}, "router: max_upload_bytes must be an integer"),
    ({"max_voxels": 0}, "router: max_voxels must be an integer >= 1"),
    ({"max_jobs_kept": 0}, "router: max_jobs_kept"),
    ({"max_resumes": "2"}, "router: max_resumes"),
    ({"results_dir": 5}, "router: results_dir must be a folder path"),
    ({"journal_dir": ""}, "router: journal_dir must be a folder path"),
    ({"journal_dir": 5}, "router: journal_dir must be a folder path"),
    # the start-up clean-up of the spool would delete the journal's records
    ({"results_dir": "/r", "journal_dir": "/r/.incoming/jobs"}, "router: journal_dir .* lies in the upload spool"),
    ({"journal_max_bytes": 4096}, "router: journal_max_bytes must be an integer >= 1048576 \\(1 MiB\\), not 4096"),
    ({"journal_max_bytes": "64Mi"}, "router: journal_max_bytes must be an integer"),
    ({"s3": "http://s3"}, "s3: expected a mapping"),
    ({"slot": 2}, "router: unknown setting"),
])
def test_router_settings_are_checked_when_loaded(change, says):
    from serve.router.service import RouterSettings

    with pytest.raises(MrisegError, match=says):
        RouterSettings.from_mapping(change)


def test_router_settings_in_range_are_taken_as_numbers():
    from serve.router.service import RouterSettings

    s = RouterSettings.from_mapping({"slots": 8.0, "submodel_timeout_s": 60, "max_voxels": None, "max_resumes": 0})
    assert (s.slots, s.submodel_timeout_s, s.max_voxels, s.max_resumes) == (8, 60.0, None, 0)
    assert isinstance(s.slots, int) and RouterSettings.from_mapping(None) == RouterSettings()
    s = RouterSettings.from_mapping({"results_dir": "/r", "journal_dir": "/journal", "journal_max_bytes": 2**20})
    assert (str(s.journal_path()), s.journal_max_bytes) == ("/journal", 2**20)
    assert str(RouterSettings.from_mapping({"results_dir": "/r"}).journal_path()) == "/r/.jobs"  # as before


@pytest.mark.parametrize("change,says", [
    ({"max_messages": 11}, "max_messages must be an integer >= 1 and <= 10"),  # SQS refuses more than 10
    ({"max_messages": 1.5}, "max_messages must be an integer"),
    ({"wait_time_s": 21}, "wait_time_s must be an integer >= 0 and <= 20"),
    ({"visibility_timeout_s": 50_000}, "visibility_timeout_s must be an integer >= 1 and <= 43200"),
    ({"heartbeat_s": math.nan}, "heartbeat_s must be a number"),
    ({"heartbeat_s": 120, "visibility_timeout_s": 120}, "heartbeat_s .* must be shorter than visibility_timeout_s"),
])
def test_sqs_settings_stay_within_what_sqs_takes(change, says):
    from serve.jobs.consumer import ConsumerConfig

    with pytest.raises(MrisegError, match=says):
        ConsumerConfig.from_mapping({"queue_url": "http://q", "rules": [], **change})
    ok = ConsumerConfig.from_mapping({"queue_url": "http://q", "rules": [], "max_messages": 10.0, "wait_time_s": 0})
    assert (ok.max_messages, ok.wait_time_s) == (10, 0) and isinstance(ok.max_messages, int)


@pytest.mark.parametrize("key,value", [("lease_s", math.inf), ("concurrency", 1.5), ("max_bytes", True)])
def test_event_numbers_are_finite_and_whole_where_they_count(key, value, monkeypatch):
    from serve.jobs.intake_settings import ENV, IntakeSettings

    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    rule = {"bucket": "in", "prefix": "a/", "site": "a", "output_root": "s3://out/a/"}
    with pytest.raises(MrisegError, match=f"events: {key} must be"):
        IntakeSettings.from_mapping({"jobs": "s3://j/p", "rules": [rule], key: value})


@pytest.mark.parametrize("value", [math.inf, math.nan, 0, True])
def test_s3_timeouts_are_finite_and_positive(value):
    from serve.storage.s3client import S3Settings

    with pytest.raises(MrisegError, match="read_timeout_s must be a finite number > 0"):
        S3Settings.from_mapping({"read_timeout_s": value})


def test_tenant_rates_are_finite():
    from serve.router.tenancy import Tenancy

    with pytest.raises(MrisegError, match=r"tenants: site s: requests_per_second must be a number >= 0, not inf"):
        Tenancy.from_mapping({"sites": {"s": {"prefixes": ["s3://b/s/"], "requests_per_second": math.inf}}})


@pytest.mark.parametrize("change,says", [
    ({"threads": "4"}, "runner: threads must be an integer >= 1, not '4'"),
    ({"lease_s": math.inf}, "runner: lease_s must be a number >= 1"),
    ({"max_bytes": True}, "runner: max_bytes must be an integer >= 1, not True"),
    ({"models": []}, "runner: models"),
    ({"model_pin": "pins.json"}, "runner: unknown setting"),
    ({"s3": {"max_attempts": 0}}, "s3: max_attempts must be an integer >= 1"),
])
def test_the_standalone_consumers_runner_section_is_checked_before_anything_loads(change, says):
    """The ``runner`` section of ``python -m serve.jobs.consumer``: a slip is one line naming the key, before
    any record key is read or model loaded (a typo once silently fell back to a default)."""
    with pytest.raises(MrisegError, match=re.escape(says)):
        local_submit({"models": ["/models"], "jobs": "s3://bucket/jobs/", **change})


def test_the_standalone_consumers_runner_section_takes_its_documented_defaults():
    runner = LocalRunnerSettings.from_mapping({"models": ["/models"], "jobs": "s3://bucket/jobs/"})
    assert (runner.threads, runner.lease_s, runner.max_bytes, runner.device) == (1, 300.0, 1 << 30, "auto")
