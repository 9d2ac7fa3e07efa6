"""scripts/render_k8s.py: the overlay mechanism, on a throw-away tree, and drift of the committed output."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.k8s.rendered import ROOT, render_k8s


FIXTURE_SERVE = {
    "http_options": {"host": "127.0.0.1", "port": 8123},
    "applications": [{
        "name": "mriseg", "route_prefix": "/", "import_path": "serve.cluster.app:build_app",
        "args": {"model_sources": ["demo"], "tenants_file": "/etc/mriseg/tenants.yaml"},
        "deployments": [{"name": "organs", "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}},
                        {"name": "Router", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
                        {"name": "EventIntake", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}],
    }],
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of k8s/ with a fixture serve config under every deployments/ name the overlays use."""
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s", ignore=shutil.ignore_patterns("rendered"))
    (tmp_path / "deployments").mkdir()
    for name in ("local.yaml", "one-gpu.yaml", "six-gpu.yaml"):
        (tmp_path / "deployments" / name).write_text(yaml.safe_dump(FIXTURE_SERVE))
    return tmp_path


def _rayservice(docs: list[dict]) -> dict:
    (rs,) = [d for d in docs if d["kind"] == "RayService"]
    return rs


def test_deep_merge_drops_nulls_replaces_lists_merges_named_items_keeps_base():
    base = {"a": {"b": 1, "c": 2}, "l": [1, 2],
            "groups": [{"groupName": "cpu", "n": 1}, {"groupName": "gpu", "n": 2}],
            "containers": [{"name": "x", "image": "i", "env": [{"name": "A", "value": "1"}]}]}
    patch = {"a": {"c": None, "d": 3}, "l": [9],
             "groups": [{"groupName": "gpu", "$drop": True}, {"groupName": "big", "n": 5}],
             "containers": [{"name": "x", "env": [{"name": "B", "value": "2"}]}]}
    out = render_k8s.deep_merge(base, patch)
    assert out["a"] == {"b": 1, "d": 3}
    assert out["l"] == [9]
    assert out["groups"] == [{"groupName": "cpu", "n": 1}, {"groupName": "big", "n": 5}]
    assert out["containers"] == [{"name": "x", "image": "i",
                                  "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}]
    assert base["a"] == {"b": 1, "c": 2}, "the base must not be mutated"


def test_substitute_keeps_types_and_names_missing_vars():
    out = render_k8s.substitute({"port": "${P}", "url": "http://x:${P}/"}, {"P": 8000}, "t")
    assert out == {"port": 8000, "url": "http://x:8000/"}
    with pytest.raises(render_k8s.RenderError, match=r"\$\{NOPE\}"):
        render_k8s.substitute({"x": "${NOPE}"}, {}, "t")


def test_render_embeds_serve_config_with_overrides_and_derived_ports(tree: Path):
    for overlay in render_k8s.OVERLAYS:
        docs = render_k8s.render(overlay, tree)
        rs = _rayservice(docs)
        embedded = yaml.safe_load(rs["spec"]["serveConfigV2"])
        assert embedded["http_options"] == {"host": "0.0.0.0", "port": 8123}
        got = {d["name"]: d for d in embedded["applications"][0]["deployments"]}
        want = {d["name"]: d for d in FIXTURE_SERVE["applications"][0]["deployments"]}
        assert list(got) == list(want), "the overrides must not add deployments"
        assert got["organs"] == want["organs"]
        for name in ("Router", "EventIntake"):
            # the k8s-only pinning is merged into the file's entry: Serve takes ray_actor_options whole,
            # so losing num_cpus here would silently change the deployment
            opts = got[name]["ray_actor_options"]
            assert opts["num_cpus"] == want[name]["ray_actor_options"]["num_cpus"], (overlay, name)
            assert opts["resources"]["mriseg_ingress"] > 0, (overlay, name)
        assert rs["spec"]["serveService"]["spec"]["ports"][0]["port"] == 8123
        rc = rs["spec"]["rayClusterConfig"]
        head_ports = {p["name"]: p["containerPort"] for p in rc["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
        assert head_ports["serve"] == 8123 and "app-metrics" not in head_ports
        (cpu,) = [g for g in rc["workerGroupSpecs"] if g["groupName"] == "cpu"]
        cpu_ports = {p["name"]: p["containerPort"] for p in cpu["template"]["spec"]["containers"][0]["ports"]}
        assert cpu_ports["serve"] == 8123 and "app-metrics" not in cpu_ports  # Ray's exporter carries its metrics
        (ns,) = [d for d in docs if d["kind"] == "Namespace"]
        want = render_k8s.load_overlay(overlay, tree / "k8s" / "overlays")["namespace"]
        assert ns["metadata"]["name"] == want and "namespace" not in ns["metadata"], "a Namespace has no namespace"
        assert all(d["metadata"]["namespace"] == want for d in docs if d is not ns)
        assert not render_k8s._VAR.search(yaml.safe_dump(docs)), "an overlay variable was left unset"


def test_overlays_differ_where_they_should(tree: Path):
    dev = _rayservice(render_k8s.render("dev", tree))["spec"]["rayClusterConfig"]
    prod = _rayservice(render_k8s.render("prod", tree))["spec"]["rayClusterConfig"]
    one = _rayservice(render_k8s.render("prod-one-gpu", tree))["spec"]["rayClusterConfig"]
    ha = _rayservice(render_k8s.render("prod-ha", tree))["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in dev["workerGroupSpecs"]] == ["cpu"]
    assert [g["groupName"] for g in prod["workerGroupSpecs"]] == ["cpu", "gpu"]
    assert [g["maxReplicas"] for g in one["workerGroupSpecs"] if g["groupName"] == "gpu"] == [1]
    assert "gcsFaultToleranceOptions" in ha and "gcsFaultToleranceOptions" not in prod
    prod_embedded = yaml.safe_load(_rayservice(render_k8s.render("prod", tree))["spec"]["serveConfigV2"])
    stage = [c for g in prod["workerGroupSpecs"] if g["groupName"] == "gpu"
             for c in g["template"]["spec"]["initContainers"]][0]
    # the init container stages exactly the source the replicas load from
    assert stage["command"][stage["command"].index("--models") + 1] in \
        prod_embedded["applications"][0]["args"]["model_sources"]
    assert "--require" in stage["command"]  # a pod whose weights could not be staged stops at its init container
    # the ingress passes what the router accepts, and no more (it used to pass 1 GiB the router then refused)
    ingress = next(d for d in render_k8s.render("prod", tree) if d["kind"] == "Ingress")
    body = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    real = yaml.safe_load((ROOT / "deployments" / "six-gpu.yaml").read_text())  # prod (the tree holds a fixture)
    limit = real["applications"][0]["args"]["router"]["max_upload_bytes"]
    assert body.endswith("m") and limit <= int(body[:-1]) << 20 <= limit + (1 << 20)
    assert stage["command"][stage["command"].index("--cache-dir") + 1] == \
        prod_embedded["applications"][0]["args"]["model_cache_dir"]


def test_serve_config_with_the_retired_metrics_port_is_refused(tree: Path):
    app = FIXTURE_SERVE["applications"][0]
    bad = {**FIXTURE_SERVE, "applications": [{**app, "args": {**app["args"], "metrics_port": 9555}}]}
    (tree / "deployments" / "local.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(render_k8s.RenderError, match="metrics_port: the Router no longer serves its own /metrics"):
        render_k8s.render("dev", tree)


def test_an_override_for_a_deployment_the_serve_file_does_not_list_is_refused(tree: Path):
    """deep_merge would append it as an entry of its own: Serve would refuse it, or replace the code's
    ray_actor_options with just the override's (dropping num_cpus)."""
    app = FIXTURE_SERVE["applications"][0]
    bad = {**FIXTURE_SERVE, "applications": [{**app, "deployments": [d for d in app["deployments"]
                                                                        if d["name"] != "EventIntake"]}]}
    (tree / "deployments" / "local.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(render_k8s.RenderError, match="'EventIntake'.*not listed in deployments/local.yaml"):
        render_k8s.render("dev", tree)


def test_ray_custom_resources_stay_out_of_the_serve_files():
    """The pinning to the `cpu` pod is k8s-only (overlays' serveConfigOverrides): the same files run with
    `mriseg up` and a plain ray.init, where no node declares the resource and a replica asking for it
    would never start."""
    for f in sorted((ROOT / "deployments").glob("*.yaml")):
        for app in yaml.safe_load(f.read_text())["applications"]:
            for d in app.get("deployments") or []:
                assert not (d.get("ray_actor_options") or {}).get("resources"), f"{f.name}: {d['name']}"


def test_drift_is_detected(tree: Path):
    render_k8s.write(["dev"], tree)
    assert render_k8s.drift(["dev"], tree) == []
    cfg = yaml.safe_load((tree / "deployments" / "local.yaml").read_text())
    cfg["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] = 7
    (tree / "deployments" / "local.yaml").write_text(yaml.safe_dump(cfg))
    problems = render_k8s.drift(["dev"], tree)
    assert len(problems) == 1 and "max_replicas: 7" in problems[0]


def test_committed_rendering_matches_sources():
    missing = [o for o in render_k8s.OVERLAYS
               if not (ROOT / render_k8s.load_overlay(o)["serveConfig"]).is_file()]
    if missing:
        pytest.skip(f"deployments/ files for overlays {missing} are not in the tree yet (serving engineer's)")
    problems = render_k8s.drift()
    assert not problems, "k8s/rendered is stale; run `python scripts/render_k8s.py`:\n" + "\n".join(problems)


# -- egress: only to the networks the overlay lists ----------------------------------------------

PROD_OVERLAYS = ("prod", "prod-one-gpu", "prod-ha")


def _set_vars(tree: Path, overlay: str, **values) -> None:
    path = tree / "k8s" / "overlays" / overlay / "overlay.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["vars"] = {**(spec.get("vars") or {}), **values}
    path.write_text(yaml.safe_dump(spec))


def test_substitute_splices_a_list_var_into_its_list():
    peers = [{"ipBlock": {"cidr": "198.51.100.0/24"}}]
    out = render_k8s.substitute({"to": [{"podSelector": {}}, "${P}", "${NONE}"], "src": ["${S}"]},
                                {"P": peers, "NONE": [], "S": "s3://b/"}, "t")
    assert out == {"to": [{"podSelector": {}}, *peers], "src": ["s3://b/"]}, "an empty list adds nothing"


def test_cidr_vars_become_peers_and_bad_ones_are_named():
    got = render_k8s.cidr_peers({"S3_CIDRS": ["198.51.100.0/24", "2001:db8::/32"], "S3_PORT": 443}, "t")
    assert got == {"S3_PEERS": [{"ipBlock": {"cidr": "198.51.100.0/24"}}, {"ipBlock": {"cidr": "2001:db8::/32"}}]}
    for bad, why in (("198.51.100.0/24", "must be a list"), (["s3.example.org"], "not a network"),
                     (["198.51.100.7/24"], "not a network")):  # host bits set: a typo for /32 or .0/24
        with pytest.raises(render_k8s.RenderError, match=f"vars.S3_CIDRS.*{why}|{why}.*vars.S3_CIDRS"):
            render_k8s.cidr_peers({"S3_CIDRS": bad}, "t")


@pytest.mark.parametrize("overlay", PROD_OVERLAYS)
@pytest.mark.parametrize("var,cidrs", [("S3_CIDRS", ["0.0.0.0/0"]), ("APISERVER_CIDRS", ["::/0"]),
                                       ("DNS_CIDRS", ["0.0.0.0/1", "128.0.0.0/1"]),
                                       ("CLOUD_API_CIDRS", ["198.51.100.0/24", "0.0.0.0/0"])])
def test_a_prod_overlay_that_opens_egress_to_every_address_does_not_render(tree: Path, overlay, var, cidrs):
    _set_vars(tree, overlay, **{var: cidrs})
    with pytest.raises(render_k8s.RenderError, match=r"every (address|IPv4 address)") as e:
        render_k8s.render(overlay, tree)
    policy = "mriseg-head-to-apiserver" if var == "APISERVER_CIDRS" else "mriseg-allow-egress"
    assert f"overlay {overlay}: " in str(e.value) and policy in str(e.value), "the message says where"
    assert "S3_CIDRS" in str(e.value) and "docs/kubernetes.md" in str(e.value), "and what to change"


def test_open_egress_is_refused_wherever_it_comes_from(tree: Path):
    """Not only the vars: a patch or an overlay's own manifest opening egress is refused too."""
    path = tree / "k8s" / "overlays" / "prod-ha" / "overlay.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["patches"].append({"kind": "NetworkPolicy", "name": "mriseg-head-to-apiserver",
                            "patch": {"spec": {"egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}}})
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(render_k8s.RenderError, match="mriseg-head-to-apiserver egress rule 1 allows 0.0.0.0/0"):
        render_k8s.render("prod-ha", tree)


def test_an_egress_rule_left_without_peers_is_refused(tree: Path):
    """Kubernetes reads an egress rule with no `to` as "every destination": empty lists must not open it."""
    _set_vars(tree, "prod", S3_CIDRS=[], CLOUD_API_CIDRS=[])
    with pytest.raises(render_k8s.RenderError, match="mriseg-allow-egress egress rule 2 has no `to`"):
        render_k8s.render("prod", tree)
    _set_vars(tree, "prod", S3_CIDRS=["198.51.100.0/24"], APISERVER_CIDRS=[])
    with pytest.raises(render_k8s.RenderError, match="mriseg-head-to-apiserver egress rule 1 has no `to`"):
        render_k8s.render("prod", tree)


def test_egress_goes_to_the_listed_networks_only(tree: Path):
    _set_vars(tree, "prod", S3_CIDRS=["198.51.100.0/25", "2001:db8:1::/48"], DNS_CIDRS=["169.254.20.10/32"],
              CLOUD_API_CIDRS=[], APISERVER_CIDRS=["192.0.2.16/28"])
    docs = {d["metadata"]["name"]: d for d in render_k8s.render("prod", tree) if d["kind"] == "NetworkPolicy"}
    dns, https = docs["mriseg-allow-egress"]["spec"]["egress"]
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert dns["to"][1:] == [{"ipBlock": {"cidr": "169.254.20.10/32"}}]
    assert https["to"] == [{"ipBlock": {"cidr": "198.51.100.0/25"}}, {"ipBlock": {"cidr": "2001:db8:1::/48"}}]
    assert docs["mriseg-head-to-apiserver"]["spec"]["egress"][0]["to"] == [{"ipBlock": {"cidr": "192.0.2.16/28"}}]


def test_documentation_placeholders_are_flagged_and_real_networks_are_not():
    flagged = render_k8s.placeholder_cidrs({"S3_CIDRS": ["198.51.100.0/24", "52.219.0.0/20"],
                                            "APISERVER_CIDRS": ["192.0.2.0/28"], "X_CIDRS": ["2001:db8:5::/48"],
                                            "DNS_CIDRS": [], "S3_PORT": 443})
    assert flagged == ["S3_CIDRS: 198.51.100.0/24", "APISERVER_CIDRS: 192.0.2.0/28", "X_CIDRS: 2001:db8:5::/48"]
    assert render_k8s.placeholder_cidrs({"S3_CIDRS": ["52.219.0.0/20", "10.0.0.0/8", "2600:1f00::/24"]}) == []


def test_the_namespace_file_is_applied_first(tree: Path):
    """`kubectl apply -f k8s/rendered/<overlay>/` applies files in name order: the Namespace must come first."""
    for overlay in render_k8s.OVERLAYS:
        files = sorted(render_k8s.rendered_files(overlay, tree))
        assert files[0] == f"00-namespace-{render_k8s.load_overlay(overlay, tree / 'k8s' / 'overlays')['namespace']}.yaml"
        assert sum(f.startswith("00-") for f in files) == 1
