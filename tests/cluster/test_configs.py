"""deployments/*.yaml: valid Serve config files that fit the app and the hardware they name."""

from pathlib import Path

import pytest
import yaml

from serve.cluster.app import validate_args
from serve.errors import MrisegError

ROOT = Path(__file__).resolve().parents[2] / "deployments"
CONFIGS = ["local.yaml", "one-gpu.yaml", "six-gpu.yaml"]
SIX = ["organs", "muscles", "tissue_types", "thigh_shoulder_muscles", "appendicular_bones", "face"]


def load(name):
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / name).read_text())
    schema = ServeDeploySchema.parse_obj(raw)  # Ray's own validation; raises on any bad field
    assert len(schema.applications) == 1 and len(raw["applications"]) == 1
    return raw, _Obj(raw["applications"][0])


class _Obj(dict):
    """Attribute access to a config mapping, missing keys as None."""

    def __getattr__(self, k):
        v = self.get(k)
        if isinstance(v, list):
            return [_Obj(x) if isinstance(x, dict) else x for x in v]
        return v


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_a_valid_serve_config_for_the_app(name):
    raw, app = load(name)
    assert app.import_path == "serve.cluster.app:build_app"
    args = validate_args(app.args)
    deployments = {d.name: d for d in app.deployments}
    # names match what build_app binds: the router, one deployment per sub-model, the event intake
    assert set(deployments) == {"Router", *args["submodels"], *(["EventIntake"] if args.get("events") is not None else [])}
    assert set(SIX) <= set(args["submodels"])
    for d in deployments.values():
        assert d.ray_actor_options["num_cpus"] > 0, f"{d.name}: num_cpus must be explicit"
        assert d.max_ongoing_requests is not None
    assert deployments["Router"].num_replicas == 1  # job records live in the router's memory


def test_local_is_cpu_only_and_fits_two_cores():
    _, app = load("local.yaml")
    ds = app.deployments
    assert all(not d.ray_actor_options.get("num_gpus") for d in ds)
    assert sum(d.ray_actor_options["num_cpus"] for d in ds) <= 2
    assert app.args["model_sources"] == ["demo"]


def test_one_gpu_packs_every_submodel_onto_one_card_with_memory_caps():
    _, app = load("one-gpu.yaml")
    subs = [d for d in app.deployments if d.name in app.args["submodels"]]
    gpus = [d.ray_actor_options["num_gpus"] for d in subs]
    assert all(0 < g < 1 for g in gpus) and sum(gpus) <= 1
    for d in subs:
        assert 0 < d.user_config["gpu_memory_fraction"] <= d.ray_actor_options["num_gpus"]
    # the cap holds from the constructor on: user_config only reaches a replica after its model is loaded
    cap = app.args["submodel_settings"]["gpu_memory_fraction"]
    assert all(cap == d.user_config["gpu_memory_fraction"] for d in subs)


def test_six_gpu_gives_each_replica_a_gpu_and_scales_each_submodel():
    _, app = load("six-gpu.yaml")
    ds = {d.name: d for d in app.deployments}
    for n in SIX:
        assert ds[n].ray_actor_options["num_gpus"] == 1
        assert ds[n].autoscaling_config["max_replicas"] >= 2
    for n in ("face", "appendicular_bones"):
        assert ds[n].autoscaling_config["min_replicas"] == 0
    for n in ("organs", "muscles"):
        assert ds[n].autoscaling_config["min_replicas"] >= 1


def test_bad_args_are_clear_errors():
    with pytest.raises(MrisegError, match="unknown app arg"):
        validate_args({"modle_sources": []})
    with pytest.raises(MrisegError, match="unknown sub-model"):
        validate_args({"submodels": ["organs", "brain"]})


def test_up_folds_the_config_into_app_args_and_keeps_only_the_key_digest(tmp_path):
    from serve.router.tenancy import Tenancy
    from serve.cluster.sites import write_tenants
    from serve.cluster.up import DEFAULT_CONFIG, LocalStack, app_args_from_config, load_serve_config

    app, http = load_serve_config(DEFAULT_CONFIG)
    args = app_args_from_config(app)
    assert http["host"] == "127.0.0.1"
    assert set(args["deployment_options"]) == {"Router", "EventIntake", *args["submodels"]}
    assert args["deployment_options"]["organs"]["ray_actor_options"] == {"num_cpus": 0.2}
    validate_args(args)

    key = "mrs_0123456789abcdefghij"
    path = write_tenants(tmp_path / "t.yaml", key)
    assert key not in path.read_text()
    assert Tenancy.load(path).authenticate(key).name == "local"
    line = LocalStack("http://127.0.0.1:8000", key, "local", 1).curl_line("my scan.nii.gz")
    assert f"Bearer {key}" in line and "'my scan.nii.gz'" in line and "/v1/segmentations/upload?wait=true" in line


def test_a_405_keeps_its_allow_header_in_the_problem_answer():
    from fastapi.testclient import TestClient

    from serve.api.app import create_app

    r = TestClient(create_app()).put("/healthz")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert r.headers["content-type"] == "application/problem+json" and r.json()["status"] == 405


def test_an_event_intake_that_cannot_be_reached_is_a_503_to_retry_not_a_500():
    import asyncio

    import pytest

    from serve.cluster.app import _IntakeSink
    from serve.errors import NotFoundError, ServiceUnavailableError

    class Dead:
        class submit:  # noqa: N801 - a Serve handle's method, as the sink calls it
            @staticmethod
            async def remote(specs):
                raise RuntimeError("ActorDiedError: the replica died")

    class Refusing:
        class submit:  # noqa: N801
            @staticmethod
            async def remote(specs):
                raise NotFoundError("event intake is not configured")

    with pytest.raises(ServiceUnavailableError, match="push the events again"):
        asyncio.run(_IntakeSink(Dead(), None).submit([{}]))
    with pytest.raises(NotFoundError):  # the intake's own answers pass through
        asyncio.run(_IntakeSink(Refusing(), None).submit([{}]))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_args_reach_the_builder_through_serves_typed_app_builder(name, tmp_path):
    """``serve run``/``serve deploy`` hand the args to Ray, which validates them into the builder's model."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from serve.cluster.app import AppArgs, build_app

    _, app = load(name)
    seen = []

    def spy(args: AppArgs) -> Application:  # the same signature Ray inspects on build_app
        seen.append(args)
        return build_app(args)

    args = {**app.args, "model_sources": [str(tmp_path)]}  # no demo models are unpacked for this
    assert isinstance(call_user_app_builder_with_args_if_necessary(spy, args), Application)
    assert isinstance(seen[0], AppArgs) and seen[0].submodels == app.args["submodels"]


@pytest.mark.parametrize("args,says", [
    ({"router": {"slots": 0}}, "router: slots must be an integer >= 1, not 0"),
    ({"router": {"slot": 2}}, r"router: unknown setting\(s\) \['slot'\]"),
    ({"submodel_settings": {"thread": 2}}, r"submodel_settings: unknown setting\(s\) \['thread'\]"),
    ({"submodel_settings": {"precision": "fp16"}}, "submodel_settings: precision must be fp32 or bf16"),
    ({"sandbox": {"cpu_s": True}}, "sandbox: cpu_s must be an integer >= 1, not True"),
    ({"s3": {"read_timeout_s": ".inf"}}, "s3: read_timeout_s must be a finite number > 0"),
    ({"events": {"lease_s": 0}}, "events: lease_s must be a number >= 1, not 0"),
    # the retired metrics server's args: refused saying where the metrics are now
    ({"metrics_port": 9095}, r"app args: metrics_port: the Router no longer serves its own /metrics; .*"
                             r"Remove metrics_port from the config and scrape that port instead"),
    ({"metrics_host": "0.0.0.0", "metrics_port": 0}, r"app args: metrics_host, metrics_port: .*ray_mriseg_"),
    ({"modle_sources": []}, r"unknown app arg\(s\) \['modle_sources'\]"),
    ({"router": "/results"}, r"app args: router: expected a mapping of settings \(results_dir, slots"),
])
def test_a_bad_key_in_any_section_stops_the_build_and_names_itself(args, says):
    """Ray validates the args before the builder runs: a typo or a bad number never reaches a replica."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve.cluster.app import build_app

    with pytest.raises(MrisegError, match=says):
        call_user_app_builder_with_args_if_necessary(build_app, args)


def test_a_submodel_setting_with_a_typo_is_refused_not_ignored():
    from serve.cluster.deployments import SubModelSettings

    with pytest.raises(MrisegError, match=r"submodel_settings: unknown setting\(s\) \['tile_step'\]"):
        SubModelSettings.from_mapping("organs", {"model_sources": ["demo"], "tile_step": 0.5})
    s = SubModelSettings.from_mapping("organs", {"model_sources": ["demo"], "threads": 2.0, "warmup_shape": [8, 8, 8]})
    assert (s.threads, s.warmup_shape) == (2, (8, 8, 8)) and isinstance(s.threads, int)


def test_app_arg_sections_are_the_settings_models_and_travel_on_as_written(caplog):
    """Each section is its reader's model; the replicas get only the keys written, and fill the rest themselves."""
    from serve.cluster.app import AppArgs
    from serve.cluster.deployments import SubModelSettings
    from serve.jobs.intake_settings import EventsArg
    from serve.imaging.sandbox import SandboxPolicy
    from serve.router.service import RouterSettings
    from serve.storage.s3client import S3Settings

    written = {"router": {"slots": 2}, "sandbox": {"cpu_s": 5}, "s3": {"region": "eu-west-1"},
               "submodel_settings": {"threads": 2}, "events": {"lease_s": 60, "api_url": "http://x:8000"}}
    with caplog.at_level("WARNING", logger="serve.jobs.intake_settings"):
        args = AppArgs.model_validate(written)
    assert (type(args.router), type(args.sandbox), type(args.s3), type(args.submodel_settings), type(args.events)) \
        == (RouterSettings, SandboxPolicy, S3Settings, SubModelSettings, EventsArg)
    assert (args.router.slots, args.sandbox.cpu_s, args.submodel_settings.threads) == (2, 5, 2)
    # the sandbox's scratch folder, the intake's environment fallbacks: the replica's own, not the builder's
    assert args.as_written() == {"router": {"slots": 2}, "sandbox": {"cpu_s": 5}, "s3": {"region": "eu-west-1"},
                                 "submodel_settings": {"threads": 2}, "events": {"lease_s": 60.0}}
    assert "api_url are no longer used" in " ".join(r.getMessage() for r in caplog.records)
