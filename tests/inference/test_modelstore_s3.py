"""Model folders in an S3 bucket (real SeaweedFS): resolved, cached once, verified, loadable."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.storage import staging
from serve.catalogue import load_catalogue
from serve.errors import ModelFolderError, ModelSourceUnreachableError
from serve.inference.modelfolder import UNetSpec, write_model_folder
from serve.inference.modelload import load_model
from serve.inference.modelstore import ModelStore
from serve.inference.pins import pin_dataset, write_pins
from serve.storage.models import open_model_store
from serve.inference.pipeline import Segmenter
from serve.storage.s3client import make_client
from tests.helpers.volumes import body_volume

pytestmark = pytest.mark.s3

CAT = load_catalogue()
SPEC = UNetSpec(features=(4, 8), patch_size=(16, 16, 16))
TS_ORGANS = "Dataset850_TotalSegMRI_part1_organs_1088subj"
TS_MUSCLES = "Dataset851_TotalSegMRI_part2_muscles_1088subj"
ODD_TRAINER = "nnUNetTrainer_250epochs_NoMirroring_SiteRetrain"


def upload_tree(root: Path, prefix_uri: str, settings) -> int:
    n = 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            staging.upload_file(p, f"{prefix_uri}/{p.relative_to(root).as_posix()}", settings)
            n += 1
    return n


@pytest.fixture
def s3_models(seaweed, tmp_path, unique_prefix):
    """TotalSegmentator-shaped organs (standard trainer) and muscles (non-standard trainer) in S3."""
    results = tmp_path / "results"
    write_model_folder(results, CAT.submodel("organs"), SPEC, dataset_name=TS_ORGANS)
    write_model_folder(results, CAT.submodel("muscles"), SPEC, dataset_name=TS_MUSCLES, trainer=ODD_TRAINER,
                       extra_labels=["brain_aux"])
    uri = f"s3://models/{unique_prefix}/nnunet/results"
    assert upload_tree(results, uri, seaweed.settings) == 6
    return uri


@pytest.fixture
def s3_pins(s3_models, tmp_path) -> Path:
    """The operator's pinned manifest for ``s3_models``, as 'mriseg models import' writes it."""
    (tmp_path / "pins").mkdir()
    return write_pins(tmp_path / "pins", {d.name: pin_dataset(d) for d in (tmp_path / "results").iterdir()})


def _count_gets(store: ModelStore, uri: str) -> list[str]:
    """Record every GetObject the store's own S3 client sends (botocore's event hooks)."""
    calls: list[str] = []
    store._caches[uri].client.meta.events.register("before-call.s3.GetObject",
                                                   lambda params, **_: calls.append(params.get("Key")))
    return calls


def test_s3_models_resolve_cache_once_and_load(seaweed, s3_models, tmp_path, s3_pins):
    cache = tmp_path / "cache"
    store = open_model_store([s3_models], cache_dir=cache, s3=seaweed.settings, pins=s3_pins)
    gets = _count_gets(store, s3_models)
    organs = store.locate("organs")
    muscles = store.locate("muscles")
    assert organs.name == "nnUNetTrainer_2000epochs_NoMirroring__nnUNetPlans__3d_fullres"
    assert organs.parent.name == TS_ORGANS
    assert muscles.name == f"{ODD_TRAINER}__nnUNetPlans__3d_fullres"
    assert (organs / "fold_0" / "checkpoint_final.pth").is_file()
    assert len(gets) == 6  # every file downloaded once...
    states = {s.submodel: s.state for s in store.status()}
    assert states["organs"] == states["muscles"] == "present" and states["face"] == "missing"
    assert len(gets) == 6  # ...and not again when asked again

    # a fresh store on the same cache downloads nothing
    store2 = open_model_store([s3_models], cache_dir=cache, s3=seaweed.settings, pins=s3_pins)
    gets2 = _count_gets(store2, s3_models)
    assert store2.locate("organs") == organs and store2.locate("muscles") == muscles
    assert gets2 == []

    m = load_model(muscles, CAT.submodel("muscles"), device="cpu")
    assert m.trainer_name == ODD_TRAINER and "brain_aux" in m.dropped_labels
    o = load_model(organs, CAT.submodel("organs"), device="cpu")
    assert o.label_names[5] == "liver" and o.checksum != m.checksum


def test_locate_with_inspect_status_lists_the_source_once(seaweed, s3_models, tmp_path, s3_pins):
    """A replica inspects, then locates: the status it already has spares S3 a second listing."""
    store = open_model_store([s3_models], cache_dir=tmp_path / "cache", s3=seaweed.settings, pins=s3_pins)
    lists: list[str] = []
    store._caches[s3_models].client.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda params, **_: lists.append(params.get("Prefix")))
    st = store.inspect(CAT.submodel("organs"))
    assert st.state == "present" and len(lists) == 1
    assert store.locate("organs", st) == Path(st.path)
    assert len(lists) == 1
    store.locate("organs", store.inspect(CAT.submodel("muscles")))  # another model's status is not used
    assert len(lists) == 3


def test_changed_object_in_s3_is_refused_until_the_operator_pins_it(seaweed, s3_models, tmp_path, s3_pins):
    cache = tmp_path / "cache"
    store = open_model_store([s3_models], cache_dir=cache, s3=seaweed.settings, pins=s3_pins)
    old = store.load("organs", device="cpu").checksum
    # replace the organs weights in S3 with a differently seeded network
    fresh = tmp_path / "fresh"
    write_model_folder(fresh, CAT.submodel("organs"), SPEC, dataset_name=TS_ORGANS, seed=7)
    upload_tree(fresh, s3_models, seaweed.settings)
    store2 = open_model_store([s3_models], cache_dir=cache, s3=seaweed.settings, pins=s3_pins)
    gets = _count_gets(store2, s3_models)
    st = store2.inspect(CAT.submodel("organs"))
    assert len(gets) >= 1  # the change was seen and downloaded...
    assert st.state == "mismatched" and "organs" in st.detail and "checkpoint_final.pth" in st.detail
    assert "does not match the pinned model manifest" in st.detail and "discarded" in st.detail  # ...and refused
    with pytest.raises(ModelFolderError, match="pinned model manifest"):
        store2.load("organs", device="cpu")
    # pinned anew by the operator, the new weights load
    (tmp_path / "pins2").mkdir()
    pins2 = write_pins(tmp_path / "pins2", {TS_ORGANS: pin_dataset(fresh / TS_ORGANS)})
    store3 = open_model_store([s3_models], cache_dir=cache, s3=seaweed.settings, pins=pins2)
    assert store3.load("organs", device="cpu").checksum != old


def test_a_cached_copy_changed_on_disk_is_mismatched_and_never_loaded(seaweed, s3_models, tmp_path, s3_pins):
    """The cache's own manifest records sizes and ETags of what was downloaded: it proves nothing about the bytes."""
    cache = tmp_path / "cache"
    organs = open_model_store([s3_models], cache_dir=cache, s3=seaweed.settings, pins=s3_pins).locate("organs")
    ckpt = organs / "fold_0" / "checkpoint_final.pth"
    other = write_model_folder(tmp_path / "other", CAT.submodel("organs"), SPEC, dataset_name=TS_ORGANS, seed=9)
    swapped = (other / "fold_0" / "checkpoint_final.pth").read_bytes()
    assert len(swapped) == ckpt.stat().st_size  # same size: the cache's record still matches
    ckpt.write_bytes(swapped)
    store = open_model_store([s3_models], cache_dir=cache, s3=seaweed.settings, pins=s3_pins)
    gets = _count_gets(store, s3_models)
    st = store.inspect(CAT.submodel("organs"))
    assert gets == []
    assert st.state == "mismatched" and str(ckpt) in st.detail and "pinned model manifest" in st.detail
    with pytest.raises(ModelFolderError, match="pinned"):
        store.load("organs", device="cpu")
    assert store.inspect(CAT.submodel("muscles")).state == "present"


def test_an_s3_source_without_pins_is_refused_before_anything_is_downloaded(seaweed, s3_models, tmp_path,
                                                                          monkeypatch):
    from serve.cluster.deployments import SubModelRunner, SubModelSettings

    monkeypatch.delenv("MRISEG_MODEL_PINS", raising=False)
    store = open_model_store([s3_models], cache_dir=tmp_path / "cache", s3=seaweed.settings)
    gets = _count_gets(store, s3_models)
    states = {s.submodel: s for s in store.status()}
    assert {s.state for s in states.values()} == {"mismatched"}
    assert "has no pinned manifest" in states["organs"].detail and "--model-pins" in states["organs"].detail
    assert gets == [] and not (tmp_path / "cache").exists()
    with pytest.raises(ModelFolderError, match="no pinned manifest"):
        Segmenter(store, device="cpu").model("organs")
    runner = SubModelRunner(SubModelSettings(submodel="organs", model_sources=[s3_models],
                                             model_cache_dir=str(tmp_path / "cache"), s3=seaweed.settings.model_dump()))
    assert runner.state == "broken" and "no pinned manifest" in runner.detail
    # a pinned manifest that does not name the model: refused before the download too
    (tmp_path / "pins-other").mkdir()
    muscles_only = write_pins(tmp_path / "pins-other", {TS_MUSCLES: pin_dataset(tmp_path / "results" / TS_MUSCLES)})
    store = open_model_store([s3_models], cache_dir=tmp_path / "cache", s3=seaweed.settings, pins=muscles_only)
    gets = _count_gets(store, s3_models)
    st = store.inspect(CAT.submodel("organs"))
    assert st.state == "mismatched" and f"{TS_ORGANS} is not in the pinned model manifest" in st.detail
    assert gets == []
    assert store.inspect(CAT.submodel("muscles")).state == "present"


def test_a_key_that_climbs_out_of_the_source_is_refused_and_nothing_escapes(moto, tmp_path, unique_prefix):
    pins = write_pins(tmp_path, {})
    """SeaweedFS refuses such keys; AWS and moto store them literally, so the cache must refuse them."""
    client = make_client(moto.settings)
    client.create_bucket(Bucket=unique_prefix)
    base = f"w/{TS_ORGANS}/nnUNetTrainer__nnUNetPlans__3d_fullres"
    client.put_object(Bucket=unique_prefix, Key=f"{base}/plans.json", Body=b"{}")
    client.put_object(Bucket=unique_prefix, Key=f"{base}/../../../../../escaped.txt", Body=b"not yours")
    store = open_model_store([f"s3://{unique_prefix}/w"], cache_dir=tmp_path / "cache", s3=moto.settings, pins=pins)
    st = store.inspect(CAT.submodel("organs"))
    assert st.state == "mismatched" and "'..' segment" in st.detail
    assert not list(tmp_path.rglob("escaped.txt")) and not list(tmp_path.rglob("plans.json"))


def test_a_corrupted_download_is_discarded_by_the_sha256_metadata(seaweed, s3_models, tmp_path, s3_pins):
    """AWS gives multipart objects only a composite checksum; the sha256 metadata staging writes still applies."""
    store = open_model_store([s3_models], cache_dir=tmp_path / "cache", s3=seaweed.settings, pins=s3_pins)
    client = store._caches[s3_models].client
    head, download = client.head_object, client.download_file

    def composite_head(**kw):
        return {**head(**kw), "ChecksumSHA256": "AAAA-3", "ChecksumType": "COMPOSITE"}

    def corrupting(bucket, key, dest, **kw):
        download(bucket, key, dest, **kw)
        with open(dest, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))

    client.head_object, client.download_file = composite_head, corrupting
    st = store.inspect(CAT.submodel("organs"))
    assert st.state == "mismatched" and "sha256 metadata" in st.detail
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing half-verified is kept


def test_two_stores_filling_one_cache_at_once_both_get_the_model(seaweed, s3_models, tmp_path, s3_pins):
    import threading
    import time

    cache = tmp_path / "cache"
    stores = [open_model_store([s3_models], cache_dir=cache, s3=seaweed.settings, pins=s3_pins) for _ in range(2)]
    for store in stores:  # slow each download down, so that the two fills overlap
        client = store._caches[s3_models].client
        client.download_file = (lambda real: lambda *a, **kw: (real(*a, **kw), time.sleep(0.2)))(client.download_file)
    barrier, found, errors = threading.Barrier(2), [], []

    def go(store):
        barrier.wait()
        try:
            found.append(store.locate("organs"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(found)) == 1
    assert not [p for p in found[0].parent.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_loaded_models_keep_running_when_their_s3_source_cannot_be_read(seaweed, s3_models, tmp_path, s3_pins):
    store = open_model_store([s3_models], cache_dir=tmp_path / "cache", s3=seaweed.settings, pins=s3_pins)
    seg = Segmenter(store, device="cpu", threads=1)
    vol = body_volume("RAS", shape=(20, 18, 12), spacing=(1.5, 1.5, 1.5))
    first = seg.segment(vol)
    assert set(first.per_model) == {"organs", "muscles"} and "face" in first.unavailable
    # the source now refuses the store (a real SignatureDoesNotMatch from SeaweedFS), as in a credentials rotation
    bad = seaweed.settings.model_copy(update={"secret_access_key": "not-the-secret"})
    store._caches[s3_models]._client = make_client(bad)
    assert store.inspect(CAT.submodel("organs")).state == "unreachable"
    subset = ["liver", "gluteus_maximus_left"]  # one structure of each loaded model
    again = seg.segment(vol, roi_subset=subset)
    assert set(again.per_model) == {"organs", "muscles"}
    for name in subset:
        assert (again.mask(name) == first.mask(name)).all()
    # whether face & co. are in the bucket by now cannot be known: a full run refuses rather than guess, and
    # a segmenter that has loaded nothing yet refuses even a subset, rather than return a partial segmentation
    with pytest.raises(ModelSourceUnreachableError, match="SignatureDoesNotMatch.*Nothing was segmented") as ei:
        seg.segment(vol)
    assert ei.value.status == 503 and ei.value.retryable  # a bulk job is retried, not failed for good
    with pytest.raises(ModelSourceUnreachableError, match="cannot be read"):
        Segmenter(store, device="cpu", threads=1).segment(vol, roi_subset=["liver"])
    with pytest.raises(ModelSourceUnreachableError, match="cannot be read"):
        store.locate("organs")


def test_a_sub_model_replica_whose_s3_source_cannot_be_read_fails_its_health_check(seaweed, s3_models, tmp_path,
                                                                                    s3_pins):
    """Unhealthy, so Serve replaces it and the new replica reads the source again (not 409 for good)."""
    from serve.cluster.deployments import SubModelRunner, SubModelSettings

    bad = seaweed.settings.model_copy(update={"secret_access_key": "not-the-secret"}).model_dump()
    runner = SubModelRunner(SubModelSettings(submodel="organs", model_sources=[s3_models],
                                             model_cache_dir=str(tmp_path / "cache"), s3=bad, model_pins=str(s3_pins)))
    # "unreachable", not "broken": the router then answers 503 rather than skip organs in a full run
    assert runner.state == "unreachable" and "cannot be read (SignatureDoesNotMatch)" in runner.detail
    with pytest.raises(RuntimeError, match="unreachable"):
        runner.check_health()
    good = SubModelRunner(SubModelSettings(submodel="organs", model_sources=[s3_models],
                                           model_cache_dir=str(tmp_path / "cache"), s3=seaweed.settings.model_dump(),
                                           model_pins=str(s3_pins)))
    assert good.state == "ready"
