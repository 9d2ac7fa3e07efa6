"""The router's side of event jobs: the intake names a site (by Ray handle, holding no key) and the router runs
the job as that site's, refusing what the tenants file does not grant (asyncio, no Ray)."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from serve.router.state import JobOptions
from serve.router.service import JobService, RouterSettings
from serve.router.tenancy import Tenancy
from tests.helpers.stack import BUCKET, nifti_bytes, write_tenants

VOLUME = nifti_bytes(shape=(16, 16, 16))
IN = f"s3://{BUCKET}/site-a/inbox/case.nii.gz"
OUT = f"s3://{BUCKET}/site-a/outbox/site-a/case/"


async def _described(name):
    return {"state": "ready", "checksum": f"sha-{name}",
            "model": SimpleNamespace(checksum=f"sha-{name}", dataset_json={"description": "DEMO MODEL"})}


async def _labels(name, refs, spacing):
    return {"labels": np.zeros(refs[0].shape, np.uint8), "started": 0.0, "finished": 0.0}


def _service(tmp_path, call=_labels, reserved=(), describe=_described, deployed=("organs",),
             **settings) -> JobService:
    tenancy = Tenancy.load(write_tenants(tmp_path / "tenants.yaml"), reload_interval_s=0.05)
    return JobService(tenancy, call, describe, list(deployed), RouterSettings(results_dir=str(tmp_path / "r"),
                                                                              **settings),
                      put=lambda array: array, reserved_prefixes=reserved,
                      # the stand-in sub-model's labels carry no label map: merge to an empty segmentation on the
                      # input grid
                      merge=lambda volume, *rest: (np.zeros(volume.shape, np.uint8), {}, {}))


def _run(svc: JobService, site: str = "site-a", data: bytes = VOLUME, input_uri: str = IN, output_prefix: str = OUT,
         outputs=("multilabel", "statistics"), filename: str = "input.nii.gz") -> dict:
    return asyncio.run(svc.run_event_job(site, data, filename, ["spleen"], False, list(outputs), input_uri,
                                         output_prefix))


def test_an_event_job_runs_as_its_sites_job_and_hands_back_its_files(tmp_path, caplog):
    svc = _service(tmp_path)
    with caplog.at_level("INFO", logger="mriseg.audit"):
        reply = _run(svc)
    assert "error" not in reply, reply
    assert set(reply["files"]) == {"segmentations.nii.gz", "statistics.json"}
    assert reply["files"]["segmentations.nii.gz"][:2] == b"\x1f\x8b"  # the gzipped NIfTI itself
    assert reply["models"] == {"organs": "sha-organs"} and reply["demo"] is True
    job = svc.jobs[reply["id"]]
    # the router's job of site-a; the intake, not the router, publishes its outputs
    assert job.site == "site-a" and job.status == "succeeded" and job.options.output_prefix is None
    accepted = [json.loads(r.getMessage()) for r in caplog.records if '"job.accepted"' in r.getMessage()]
    assert [(a["site"], a["source"]) for a in accepted] == [("site-a", "event")]


def test_the_sub_model_checksums_are_asked_for_as_the_jobs_site(tmp_path):
    async def main(svc):
        assert await svc.event_checksums("site-b", ["spleen"], False) == {"checksums": {"organs": "sha-organs"}}
        refused = await svc.event_checksums("site-z", ["spleen"], False)
        assert refused["error"]["status"] == 403 and "site-z" in refused["error"]["detail"]
        unknown = await svc.event_checksums("site-b", ["no_such_structure"], False)
        assert unknown["error"]["status"] == 400 and not unknown["error"]["retryable"]

    asyncio.run(main(_service(tmp_path)))


def test_an_unreachable_sub_model_is_retried_not_skipped(tmp_path):
    """A full run skips a sub-model that is not deployed, but not one that cannot be reached right now: that would
    pass off a partial segmentation as whole. A run that names a missing model's structures cannot go on."""
    states = {"muscles": "unreachable"}

    async def described(name):
        if name in states:
            return {"state": states[name], "detail": "", "model": None}
        return await _described(name)

    async def main():
        svc = _service(tmp_path, describe=described)
        svc.deployed = [sm.name for sm in svc.catalogue.submodels]
        down = await svc.event_checksums("site-a", None, False)
        assert down["error"]["status"] == 503 and down["error"]["retryable"] and "muscles" in down["error"]["detail"]
        states["muscles"] = "unavailable"
        svc.submodels.descriptions.clear()
        assert "muscles" not in (await svc.event_checksums("site-a", None, False))["checksums"]
        named = await svc.event_checksums("site-a", ["autochthon_left"], False)
        assert named["error"]["status"] == 409 and "muscles" in named["error"]["detail"]

    asyncio.run(main())


@pytest.mark.parametrize("change,status,says", [
    ({"site": "site-z"}, 403, "not in the tenants file"),                       # a site the tenants do not name
    ({"input_uri": f"s3://{BUCKET}/site-b/inbox/case.nii.gz"}, 403, "may not read"),  # another site's object
    ({"output_prefix": f"s3://{BUCKET}/site-b/out/"}, 403, "may not write"),    # into another site's prefix
    ({"input_uri": f"s3://{BUCKET}/site-a/../site-b/x.nii.gz"}, 403, "may not read"),
    ({"outputs": ("multilabel", "per_structure")}, 400, "per_structure"),
    ({"filename": "input.mhd"}, 415, "unsupported upload type"),
    ({"data": b"\0" * 4096}, 413, "router.max_upload_bytes"),
])
def test_an_event_job_outside_what_the_tenants_grant_its_site_is_refused_before_it_is_queued(tmp_path, change,
                                                                                            status, says):
    svc = _service(tmp_path, max_upload_bytes=1024 if "data" in change else 256 << 20)
    reply = _run(svc, **change)
    assert reply["error"]["status"] == status and says in reply["error"]["detail"], reply
    assert not reply["error"]["retryable"] and svc.jobs == {} and not list(svc.spool.root.iterdir())


def test_a_site_removed_from_the_tenants_file_has_its_event_jobs_refused(tmp_path):
    svc = _service(tmp_path)
    assert "error" not in _run(svc, site="site-b", input_uri=f"s3://{BUCKET}/site-b/in/c.nii.gz",
                               output_prefix=f"s3://{BUCKET}/site-b/out/site-b/c/")
    path = tmp_path / "tenants.yaml"
    doc = yaml.safe_load(path.read_text())
    del doc["sites"]["site-b"]
    path.write_text(yaml.safe_dump(doc))
    time.sleep(0.1)  # past the reload interval
    reply = _run(svc, site="site-b", input_uri=f"s3://{BUCKET}/site-b/in/c.nii.gz",
                 output_prefix=f"s3://{BUCKET}/site-b/out/site-b/c/")
    assert reply["error"]["status"] == 403 and "'site-b' is not in the tenants file" in reply["error"]["detail"]
    assert "site-b" not in svc.site_limits() and svc.site_limits()["site-c"] == 1


def test_event_jobs_stop_while_a_site_holds_the_job_record_prefix(tmp_path):
    """A tenants file edited to give a site the intake's record prefix: that site could forge records, so the
    router runs no event job (retryable: the operators fix the file) until the file no longer does."""
    svc = _service(tmp_path, reserved=[f"s3://{BUCKET}/site-a/_jobs/"])
    reply = _run(svc)
    assert reply["error"]["status"] == 503 and reply["error"]["retryable"], reply
    svc.reserved_prefixes = (f"s3://{BUCKET}-jobs/records/",)
    assert "error" not in _run(svc)


def test_an_event_job_counts_against_its_sites_job_limit_and_its_wait_cancelled_frees_the_slot(tmp_path):
    """site-c may run one job: an event job beside its running upload is 429 (retried by the intake), and an
    event job whose caller stops waiting is cancelled rather than left to run for no one."""
    gate: list[asyncio.Event] = []

    async def held(name, refs, spacing):
        await gate[0].wait()
        return await _labels(name, refs, spacing)

    svc = _service(tmp_path, held)
    site = svc.tenancy.sites["site-c"]
    inbox, out = f"s3://{BUCKET}/site-c/in/x.nii.gz", f"s3://{BUCKET}/site-c/out/site-c/x/"

    async def main():
        gate.append(asyncio.Event())
        upload = svc.submit(site, JobOptions(["spleen"], False, ("statistics",)), upload=VOLUME)
        busy = await svc.run_event_job("site-c", VOLUME, "x.nii.gz", None, False, ["multilabel"], inbox, out)
        assert busy["error"]["status"] == 429 and busy["error"]["retryable"], busy
        svc.cancel(site, upload.id)
        while svc.scheduler.active("site-c"):
            gate[0].set()  # its thread-less stages end at once; the cancel lands
            await asyncio.sleep(0.01)
        gate[0] = asyncio.Event()
        waiting = asyncio.ensure_future(svc.run_event_job("site-c", VOLUME, "x.nii.gz", None, False,
                                                          ["multilabel"], inbox, out))
        while not svc.scheduler.active("site-c"):
            await asyncio.sleep(0.01)
        waiting.cancel()  # the intake's timeout, or its replica gone
        with pytest.raises(asyncio.CancelledError):
            await waiting
        [event_job] = [j for j in svc.jobs.values() if j.id != upload.id]
        assert event_job.status == "cancelled"
        deadline = time.monotonic() + 10
        while svc.scheduler.active("site-c") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert svc.scheduler.active("site-c") == 0

    asyncio.run(main())
