"""The rendered Kubernetes manifests (k8s/rendered/**) validate and keep the locked-down defaults.

Offline: Kubernetes' OpenAPI schemas from kubernetes-validate, KubeRay's CRD
schemas from ../shared/k8s-schemas, Ray's own ServeDeploySchema.
"""

from __future__ import annotations

import base64
import copy
import importlib
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.k8s.rendered import ALL_DOCS, OVERLAY_DOCS, ROOT, pod_specs, rayservices, render_k8s

K8S_VERSION = "1.32.0"  # oldest Kubernetes we support; kubernetes-validate ships its schemas
SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
SUBMODELS = ("organs", "muscles", "tissue_types", "thigh_shoulder_muscles", "appendicular_bones", "face")
MAY_SCALE_TO_ZERO = {"face", "appendicular_bones"}
# Prometheus Operator kinds: no schema ships offline; checked structurally below.
OPERATOR_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}


EXAMPLES = [d for f in sorted((ROOT / "k8s" / "examples").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def _id(item) -> str:
    o, d = item
    return f"{o}/{d['kind']}/{d['metadata']['name']}"


def test_every_overlay_is_rendered():
    assert sorted(OVERLAY_DOCS) == sorted(render_k8s.OVERLAYS), "run `python scripts/render_k8s.py`"


# -- schemas -------------------------------------------------------------------------------

def _builtin(item) -> bool:
    """Kinds Kubernetes itself defines; ray.io and Prometheus Operator kinds are checked separately below."""
    return not (item[1]["apiVersion"].startswith("ray.io/") or item[1]["kind"] in OPERATOR_KINDS)


@pytest.mark.parametrize("item", [i for i in ALL_DOCS + [("examples", d) for d in EXAMPLES] if _builtin(i)], ids=_id)
def test_builtin_kinds_validate_against_kubernetes_openapi(item):
    kubernetes_validate.validate(item[1], K8S_VERSION, strict=True)


def _crd_schema(filename: str) -> dict:
    if not (SCHEMAS / filename).is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS} (expected beside the checkout: ../shared/k8s-schemas)")
    crd = yaml.safe_load((SCHEMAS / filename).read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_rayservice_validates_against_kuberay_crds(item):
    _, rs = item
    jsonschema.validate(rs, _crd_schema("ray.io_rayservices.yaml"))
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "mriseg"},
               "spec": rs["spec"]["rayClusterConfig"]}
    jsonschema.validate(cluster, _crd_schema("ray.io_rayclusters.yaml"))


def test_crd_validation_can_fail():
    """The schema check is not vacuous: a misspelt field in a typed place is rejected."""
    schema = _crd_schema("ray.io_rayservices.yaml")
    _, rs = rayservices()[0]
    bad = json.loads(json.dumps(rs))
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "lots"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize("item", [i for i in ALL_DOCS if i[1]["kind"] in OPERATOR_KINDS], ids=_id)
def test_prometheus_operator_resources_are_well_formed(item):
    _, doc = item
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    if doc["kind"] == "PodMonitor":
        ports = {e["port"] for e in doc["spec"]["podMetricsEndpoints"]}
        assert ports == {"metrics"}  # Ray's exporter: every replica's ray.util.metrics, the Router's too
    if doc["kind"] == "PrometheusRule":
        for group in doc["spec"]["groups"]:
            for rule in group["rules"]:
                assert rule["alert"] and rule["expr"].strip() and rule["labels"]["severity"]


# -- the Serve application -------------------------------------------------------------------

def _serve_config(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_embedded_serve_config_is_a_valid_importable_serve_app(item):
    from ray.serve.schema import ServeDeploySchema

    _, rs = item
    config = _serve_config(rs)
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        module, _, attr = app["import_path"].replace(":", ".").rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), app["import_path"]


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_every_submodel_autoscales_with_every_knob_and_a_kept_replica(item):
    overlay, rs = item
    deployments = {d["name"]: d for app in _serve_config(rs)["applications"] for d in app.get("deployments", [])}
    if overlay in ("dev", "prod-one-gpu"):
        pytest.skip("fixed replica counts: demo models on CPU (dev), all six sharing one GPU (prod-one-gpu)")
    for name in SUBMODELS:
        assert name in deployments, f"{overlay}: no deployment {name}"
        ac = deployments[name].get("autoscaling_config")
        assert ac, f"{overlay}: {name} has no autoscaling_config"
        for knob in ("min_replicas", "max_replicas", "target_ongoing_requests", "downscale_delay_s"):
            assert knob in ac, f"{overlay}: {name} autoscaling_config lacks {knob}"
        assert ac["max_replicas"] >= max(1, ac["min_replicas"])
        if name in MAY_SCALE_TO_ZERO:
            assert ac["min_replicas"] >= 0
        else:
            assert ac["min_replicas"] >= 1, f"{overlay}: {name} must keep a replica"


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_gpu_worker_group_bounds_follow_the_serve_config(item):
    """minReplicas holds every warm GPU replica; maxReplicas every GPU replica at the deployments' maximum."""
    overlay, rs = item
    gpu_groups = [g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                  if "nvidia.com/gpu" in json.dumps(g["template"]["spec"]["containers"])]
    if not gpu_groups:
        pytest.skip(f"{overlay} has no GPU workers")
    (g,) = gpu_groups
    per_pod = float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    need_min = need_max = 0.0
    for app in _serve_config(rs)["applications"]:
        for d in app.get("deployments", []):
            gpus = float((d.get("ray_actor_options") or {}).get("num_gpus", 0))
            ac = d.get("autoscaling_config") or {}
            need_min += gpus * ac.get("min_replicas", d.get("num_replicas", 1))
            need_max += gpus * ac.get("max_replicas", d.get("num_replicas", 1))
    assert need_min <= g["minReplicas"] * per_pod + 1e-9, f"{overlay}: warm replicas need {need_min} GPUs"
    assert need_max <= g["maxReplicas"] * per_pod + 1e-9, f"{overlay}: the maximum needs {need_max} GPUs"
    assert g["minReplicas"] * per_pod < need_min + per_pod, f"{overlay}: more idle GPU pods than warm replicas"


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_tenants_file_is_the_mounted_secret(item):
    overlay, rs = item
    for app in _serve_config(rs)["applications"]:
        assert app["args"].get("tenants_file") == "/etc/mriseg/tenants.yaml", overlay
    for group, spec in pod_specs(rs):
        if group in _gpu_groups(rs):
            continue  # the sub-models read no tenants file: test_gpu_pods_hold_only_the_model_read_identity
        (vol,) = [v for v in spec["volumes"] if v["name"] == "tenants"]
        assert vol["secret"]["secretName"] == "mriseg-tenants", group


# Names of the event intake's old per-site API key file: its setting, env variable, file and Secret.
SITE_KEY_NAMES = re.compile(r"site_keys|SITE_KEYS|site-keys|mriseg-event-keys", re.IGNORECASE)


def _strings_in(obj) -> list[str]:
    """Every string in a manifest, a Secret's base64 ``data`` decoded and the embedded serve config included."""
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in [str(k), *_strings_in(v)]]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings_in(v)]
    return [str(obj)]


def _secret_texts(doc: dict) -> dict[str, str]:
    if doc["kind"] != "Secret":
        return {}
    out = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
    return {**out, **(doc.get("stringData") or {})}


@pytest.mark.parametrize("item", ALL_DOCS + [("examples", d) for d in EXAMPLES], ids=_id)
def test_no_object_holds_or_names_a_site_api_key(item):
    """One site's key in every pod let that site's attacker act as every site (issue #34): no setting, env
    variable, mount or Secret for the intake's site keys, and a tenants file holds key digests only."""
    where, doc = item
    named = sorted({m.group(0) for s in _strings_in(doc) for m in SITE_KEY_NAMES.finditer(s)})
    assert not named, f"{_id(item)} names the event intake's site API keys: {named}"
    for key, text in _secret_texts(doc).items():
        if key != "tenants.yaml":
            continue
        for site, cfg in (yaml.safe_load(text).get("sites") or {}).items():
            assert "keys" not in cfg, (f"{_id(item)}: site {site} has a clear API key; store its SHA-256 "
                                       "digest as key_sha256")


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_an_s3_model_source_comes_with_the_mounted_pinned_manifest(item):
    """serve.inference.modelstore refuses an s3:// model source without the operator's pinned manifest: the serve config's
    model_pins and the stage-models gate name the file that ConfigMap mriseg-model-pins mounts in every pod."""
    overlay, rs = item
    args = _serve_config(rs)["applications"][0]["args"]
    if not any(str(s).startswith("s3://") for s in args.get("model_sources") or []):
        assert overlay == "dev", f"{overlay}: expected an S3 model source"
        return
    pins = Path(args["model_pins"])
    for group, spec in pod_specs(rs):
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"] + spec.get("initContainers", []):
            (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == pins.parent]
            cm = volumes[mount["name"]]["configMap"]
            assert cm["name"] == "mriseg-model-pins" and {"key": "model-pins.json", "path": pins.name} in cm["items"], \
                f"{overlay}/{group}/{c['name']}"
    (stage,) = [c for _, spec in pod_specs(rs) for c in spec.get("initContainers", []) if c["name"] == "stage-models"]
    assert stage["command"][stage["command"].index("--model-pins") + 1] == str(pins), overlay


# -- pod templates (checkov does not look inside RayService) -----------------------------------


def _quantity(q) -> float:
    """CPU cores or bytes from a Kubernetes quantity."""
    s = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            return float(s[: -len(u)]) * units[u]
    return float(s)


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_every_container_is_locked_down(item):
    _, rs = item
    rc = rs["spec"]["rayClusterConfig"]
    sidecar = rc["autoscalerOptions"]
    containers = [("autoscaler", sidecar)]
    for group, spec in pod_specs(rs):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is (group == "head"), \
            f"{group}: only the head (autoscaler) gets an API token"
        containers += [(f"{group}/{c['name']}", c) for c in spec["containers"] + spec.get("initContainers", [])]
        for c in spec["containers"]:
            assert c.get("livenessProbe") and c.get("readinessProbe"), f"{group}/{c['name']}: probes"
        mounts = {m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{group}: read-only root needs a writable /tmp"
    for where, c in containers:
        res = c["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[kind]), f"{where}: {kind} must set cpu and memory"
        assert _quantity(res["limits"]["memory"]) >= _quantity(res["requests"]["memory"])
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["capabilities"]["drop"] == ["ALL"], where
        assert not sc.get("privileged"), where


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_gpu_groups_request_gpus_on_gpu_nodes(item):
    overlay, rs = item
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["autoscalerOptions"]["idleTimeoutSeconds"] >= 60
    assert "GPU" not in json.dumps(rc["headGroupSpec"].get("rayStartParams", {}))
    assert "nvidia.com/gpu" not in json.dumps(rc["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"])
    gpu_groups = [g for g in rc["workerGroupSpecs"] if "nvidia.com/gpu" in json.dumps(g["template"]["spec"]["containers"])]
    assert (overlay == "dev") == (not gpu_groups)
    for g in gpu_groups:
        spec = g["template"]["spec"]
        (c,) = spec["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
        assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert 0 <= g["minReplicas"] <= g["maxReplicas"]


def test_pinned_ray_ports_match_the_network_policy():
    for overlay, docs in OVERLAY_DOCS.items():
        (rs,) = [d for d in docs if d["kind"] == "RayService"]
        (pol,) = [d for d in docs if d["metadata"]["name"] == "mriseg-ray-internal"]
        allowed = [(p["port"], p.get("endPort", p["port"])) for p in pol["spec"]["ingress"][0]["ports"]]
        rc = rs["spec"]["rayClusterConfig"]
        for params in [rc["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in rc["workerGroupSpecs"]]:
            ports = [int(v) for k, v in params.items() if k.endswith("port")]
            ports += range(int(params["min-worker-port"]), int(params["max-worker-port"]) + 1)
            for port in ports:
                assert any(lo <= port <= hi for lo, hi in allowed), f"{overlay}: port {port} not allowed between Ray pods"


def test_operator_and_prometheus_can_reach_what_they_need():
    for overlay, docs in OVERLAY_DOCS.items():
        policies = [d for d in docs if d["kind"] == "NetworkPolicy"]

        def admitted(namespace: str, port: int) -> bool:
            for pol in policies:
                for rule in pol["spec"].get("ingress", []):
                    from_ns = {p.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                               for p in rule.get("from", [])}
                    if namespace in from_ns and any(p["port"] <= port <= p.get("endPort", p["port"])
                                                    for p in rule.get("ports", [])):
                        return True
            return False

        (rs,) = [d for d in docs if d["kind"] == "RayService"]
        serve_port = rs["spec"]["serveService"]["spec"]["ports"][0]["port"]
        assert admitted("kuberay-system", 8265) and admitted("kuberay-system", serve_port), overlay
        assert admitted("monitoring", 8080), overlay
        assert not admitted("monitoring", 6379), f"{overlay}: GCS must stay internal"


def test_egress_goes_only_to_the_networks_the_overlay_lists():
    """Every egress rule names its peers (no `to` = every destination); in-cluster peers by selector, the rest
    by a CIDR from the overlay's *_CIDRS vars, none of them all of IPv4 or IPv6."""
    import ipaddress

    for overlay, docs in OVERLAY_DOCS.items():
        listed = {c for k, v in render_k8s.load_overlay(overlay)["vars"].items() if k.endswith("_CIDRS") for c in v}
        seen = set()
        for pol in (d for d in docs if d["kind"] == "NetworkPolicy"):
            for i, rule in enumerate(pol["spec"].get("egress", [])):
                where = f"{overlay}/{pol['metadata']['name']} egress rule {i + 1}"
                assert rule.get("to"), f"{where}: no `to` allows every destination"
                for peer in rule["to"]:
                    if "ipBlock" not in peer:
                        assert peer.get("podSelector") is not None, f"{where}: {peer} is not an in-cluster pod"
                        continue
                    cidr = peer["ipBlock"]["cidr"]
                    assert ipaddress.ip_network(cidr).prefixlen > 0, f"{where}: {cidr} is every address"
                    assert cidr in listed, f"{where}: {cidr} is not in the overlay's *_CIDRS vars"
                    seen.add(cidr)
        assert seen, f"{overlay}: no egress CIDRs at all (the S3 endpoint and the API server are outside the cluster)"


# -- Pod Security: the namespace enforces "restricted", and every pod meets it ---------------------
# The controls of the Pod Security Standards (kubernetes.io/docs/concepts/security/pod-security-standards),
# Baseline and Restricted, for Linux pods. Checked here because no PodSecurity admission runs offline, and
# checkov does not look inside RayService pod templates.

PSS_LABELS = {"enforce": "restricted", "audit": "restricted", "warn": "restricted"}
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_CAPABILITIES = {"NET_BIND_SERVICE"}  # the only one Restricted lets a container add back
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_TYPES = {"RuntimeDefault", "Localhost"}
APPARMOR_TYPES = {"RuntimeDefault", "Localhost"}


def restricted_violations(spec: dict, annotations: dict | None = None) -> list[str]:
    """Every way the pod ``spec`` (with its template's ``annotations``) breaks the Restricted profile.

    Args:
        spec: a pod spec (a template's ``spec``).
        annotations: the pod template's metadata.annotations (AppArmor's older form lives there).

    Returns:
        One line per violation, naming the field; empty if the pod would be admitted.
    """
    bad: list[str] = []
    pod = spec.get("securityContext") or {}
    containers = [(f"{kind}/{c['name']}", c) for kind in ("initContainers", "containers", "ephemeralContainers")
                  for c in spec.get(kind) or []]

    def security_options(where: str, sc: dict) -> None:  # fields the pod and its containers share
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad.append(f"{where}: windowsOptions.hostProcess")
        se = sc.get("seLinuxOptions") or {}
        if se.get("type", "") not in SELINUX_TYPES or se.get("user") or se.get("role"):
            bad.append(f"{where}: seLinuxOptions {se}")
        if sc.get("appArmorProfile") and sc["appArmorProfile"].get("type") not in APPARMOR_TYPES:
            bad.append(f"{where}: appArmorProfile {sc['appArmorProfile']}")
        if sc.get("seccompProfile") and sc["seccompProfile"].get("type") not in SECCOMP_TYPES:
            bad.append(f"{where}: seccompProfile {sc['seccompProfile']}")
        if sc.get("runAsUser") == 0:
            bad.append(f"{where}: runAsUser 0")

    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            bad.append(f"pod: {field}")
    security_options("pod", pod)
    if pod.get("runAsNonRoot") is False:
        bad.append("pod: runAsNonRoot false")
    for sysctl in pod.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            bad.append(f"pod: sysctl {sysctl['name']}")
    for key, value in (annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and \
                value != "runtime/default" and not value.startswith("localhost/"):
            bad.append(f"pod: annotation {key}: {value}")
    for v in spec.get("volumes") or []:
        types = set(v) - {"name"}
        if len(types) != 1 or not types <= RESTRICTED_VOLUME_TYPES:  # hostPath, nfs, ... and no type at all
            bad.append(f"volume {v['name']}: {sorted(types)}, not one of {sorted(RESTRICTED_VOLUME_TYPES)}")

    for where, c in containers:
        sc = c.get("securityContext") or {}
        security_options(where, sc)
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation must be false")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{where}: procMount {sc['procMount']}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{where}: capabilities.drop lacks ALL")
        for cap in caps.get("add") or []:
            if cap not in RESTRICTED_CAPABILITIES:
                kind = "Baseline" if cap not in BASELINE_CAPABILITIES else "Restricted"
                bad.append(f"{where}: capabilities.add {cap} (not allowed by {kind})")
        if sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            bad.append(f"{where}: runAsNonRoot must be true (container or pod)")
        if "seccompProfile" not in sc and (pod.get("seccompProfile") or {}).get("type") not in SECCOMP_TYPES:
            bad.append(f"{where}: no seccompProfile RuntimeDefault/Localhost (container or pod)")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                bad.append(f"{where}: hostPort {p['hostPort']}")
        handlers = [c.get(k) for k in ("livenessProbe", "readinessProbe", "startupProbe")]
        handlers += list((c.get("lifecycle") or {}).values())
        for h in filter(None, handlers):
            for action in ("httpGet", "tcpSocket"):
                if (h.get(action) or {}).get("host"):
                    bad.append(f"{where}: {action}.host {h[action]['host']}")
    return bad


def _admitted_pods(doc: dict) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, annotations) of each pod ``doc`` makes, as the API server will see it.

    For a RayService that is KubeRay's pods: the head with the autoscaler sidecar KubeRay adds (its
    securityContext from autoscalerOptions), each worker group with the wait-gcs-ready init container
    KubeRay injects (a copy of the Ray container's securityContext).
    """
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind == "RayService":
        rc = doc["spec"]["rayClusterConfig"]
        out = []
        head = copy.deepcopy(rc["headGroupSpec"]["template"])
        if rc.get("enableInTreeAutoscaling"):
            head["spec"]["containers"].append({"name": "autoscaler", **copy.deepcopy(rc.get("autoscalerOptions") or {})})
        out.append((f"RayService/{name}/head", head["spec"], (head.get("metadata") or {}).get("annotations")))
        for g in rc["workerGroupSpecs"]:
            t = copy.deepcopy(g["template"])
            ray = t["spec"]["containers"][0]
            wait = {"name": "wait-gcs-ready", "securityContext": copy.deepcopy(ray.get("securityContext"))}
            t["spec"]["initContainers"] = [wait] + (t["spec"].get("initContainers") or [])
            out.append((f"RayService/{name}/{g['groupName']}", t["spec"], (t.get("metadata") or {}).get("annotations")))
        return out
    template = {"Deployment": lambda s: s["template"], "StatefulSet": lambda s: s["template"],
                "DaemonSet": lambda s: s["template"], "ReplicaSet": lambda s: s["template"],
                "Job": lambda s: s["template"], "CronJob": lambda s: s["jobTemplate"]["spec"]["template"],
                "Pod": lambda s: {"spec": s, "metadata": doc["metadata"]}}.get(kind)
    if template is None:
        return []
    t = template(doc["spec"])
    return [(f"{kind}/{name}", t["spec"], (t.get("metadata") or {}).get("annotations"))]


def test_every_overlay_renders_its_namespace_enforcing_restricted_pod_security():
    for overlay, docs in OVERLAY_DOCS.items():
        (ns,) = [d for d in docs if d["kind"] == "Namespace"]
        assert ns["metadata"]["name"] == render_k8s.load_overlay(overlay)["namespace"], overlay
        labels = ns["metadata"]["labels"]
        for mode, level in PSS_LABELS.items():
            assert labels.get(f"pod-security.kubernetes.io/{mode}") == level, f"{overlay}: {mode}"
            assert re.fullmatch(r"latest|v1\.\d+", labels.get(f"pod-security.kubernetes.io/{mode}-version", "")), \
                f"{overlay}: {mode}-version"
        # enforced as of the oldest Kubernetes we support: a cluster upgrade cannot start refusing the pods
        assert labels["pod-security.kubernetes.io/enforce-version"] == "v" + K8S_VERSION.rsplit(".", 1)[0], overlay
        others = [d for d in docs if d is not ns]
        assert {d["metadata"]["namespace"] for d in others} == {ns["metadata"]["name"]}, overlay


@pytest.mark.parametrize("overlay", sorted(OVERLAY_DOCS))
def test_every_pod_meets_the_restricted_pod_security_standard(overlay):
    pods = [p for d in OVERLAY_DOCS[overlay] for p in _admitted_pods(d)]
    groups = len(pod_specs(next(d for d in OVERLAY_DOCS[overlay] if d["kind"] == "RayService")))
    assert len(pods) >= groups, f"{overlay}: found {len(pods)} pod templates"
    problems = [f"{where}: {v}" for where, spec, annotations in pods for v in restricted_violations(spec, annotations)]
    assert not problems, f"{overlay}: the namespace enforces Restricted; these pods would be refused:\n" + \
        "\n".join(problems)


def _gpu_pod() -> dict:
    """A compliant pod with init containers, volumes and probes: prod's GPU worker as admitted."""
    (rs,) = [d for d in OVERLAY_DOCS["prod"] if d["kind"] == "RayService"]
    (pod,) = [p for w, p, _ in _admitted_pods(rs) if w.endswith("/gpu")]
    return copy.deepcopy(pod)


def _stage(pod: dict) -> dict:
    return next(c for c in pod["initContainers"] if c["name"] == "stage-models")


def _allow_root(pod: dict) -> None:
    """runAsNonRoot neither on the pod nor on its containers (the init containers keep theirs)."""
    pod["securityContext"].pop("runAsNonRoot")
    for c in pod["containers"]:
        c["securityContext"].pop("runAsNonRoot")


BREAKS = {  # each mutation breaks exactly the control named by the expected substring
    "hostNetwork": (lambda p: p.update(hostNetwork=True), "hostNetwork"),
    "hostPID": (lambda p: p.update(hostPID=True), "hostPID"),
    "hostIPC": (lambda p: p.update(hostIPC=True), "hostIPC"),
    "privileged init": (lambda p: _stage(p)["securityContext"].update(privileged=True), "privileged"),
    "baseline cap": (lambda p: _stage(p)["securityContext"]["capabilities"].update(add=["NET_RAW"]), "NET_RAW"),
    "restricted cap": (lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["CHOWN"]),
                       "CHOWN (not allowed by Restricted)"),
    "drop not ALL": (lambda p: p["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
                     "lacks ALL"),
    "hostPath": (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    "nfs": (lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}), "'nfs'"),
    "hostPort": (lambda p: p["containers"][0]["ports"][0].update(hostPort=8000), "hostPort"),
    "probe host": (lambda p: p["containers"][0].update(startupProbe={"tcpSocket": {"port": 1, "host": "10.0.0.1"}}),
                   "tcpSocket.host"),
    "apparmor": (lambda p: p["securityContext"].update(appArmorProfile={"type": "Unconfined"}), "appArmorProfile"),
    "selinux": (lambda p: _stage(p)["securityContext"].update(seLinuxOptions={"type": "spc_t"}), "seLinuxOptions"),
    "procMount": (lambda p: p["containers"][0]["securityContext"].update(procMount="Unmasked"), "procMount"),
    "seccomp unconfined": (lambda p: _stage(p)["securityContext"].update(seccompProfile={"type": "Unconfined"}),
                           "seccompProfile"),
    "seccomp absent": (lambda p: p["securityContext"].pop("seccompProfile"), "no seccompProfile"),
    "sysctl": (lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]), "sysctl"),
    "escalation unset": (lambda p: p["initContainers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
                         "allowPrivilegeEscalation"),
    "root allowed": (_allow_root, "containers/ray-worker: runAsNonRoot"),
    "root container": (lambda p: p["containers"][0]["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
    "uid 0": (lambda p: _stage(p)["securityContext"].update(runAsUser=0), "runAsUser 0"),
    "hostProcess": (lambda p: p["securityContext"].update(windowsOptions={"hostProcess": True}), "hostProcess"),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_the_restricted_check_catches_each_control(name):
    """The checker is not vacuous: each control of the profile, broken once in a compliant pod, is reported."""
    pod = _gpu_pod()
    assert restricted_violations(pod) == []
    mutate, expected = BREAKS[name]
    mutate(pod)
    found = restricted_violations(pod)
    assert any(expected in v for v in found), found


def test_the_restricted_check_passes_what_the_profile_allows():
    pod = _gpu_pod()
    pod["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    _stage(pod)["securityContext"]["seccompProfile"] = {"type": "Localhost", "localhostProfile": "p.json"}
    pod["securityContext"]["sysctls"] = [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    pod["securityContext"]["appArmorProfile"] = {"type": "RuntimeDefault"}
    pod["volumes"].append({"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}})
    assert restricted_violations(pod, {"container.apparmor.security.beta.kubernetes.io/x": "localhost/p"}) == []
    pod["securityContext"].pop("seccompProfile")  # the pod-level profile may go when every container sets one
    for c in pod["containers"] + pod["initContainers"]:
        c["securityContext"]["seccompProfile"] = {"type": "RuntimeDefault"}
    assert restricted_violations(pod) == []


def test_kuberays_injected_containers_are_checked_too():
    """The autoscaler sidecar takes its securityContext from autoscalerOptions, the workers' wait-gcs-ready init
    container from the Ray container: a gap in either must show up as that container's violation."""
    (rs,) = [copy.deepcopy(d) for d in OVERLAY_DOCS["prod"] if d["kind"] == "RayService"]
    rs["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"].pop("allowPrivilegeEscalation")
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["securityContext"][
        "capabilities"] = {"drop": ["NET_RAW"]}
    found = [f"{w}: {v}" for w, spec, ann in _admitted_pods(rs) for v in restricted_violations(spec, ann)]
    assert any("head: containers/autoscaler: allowPrivilegeEscalation" in v for v in found), found
    assert any("cpu: initContainers/wait-gcs-ready: capabilities.drop lacks ALL" in v for v in found), found


# -- where the Router runs: the pod it is pinned to ------------------------------------------------

PINNED_TO_INGRESS = ("Router", "EventIntake")  # the deployments the `cpu` pod is there for
DEPRECATED_RAYSERVICE_FIELDS = {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}
# What Ray's KubeRay provider calls (ray/autoscaler/_private/kuberay/node_provider.py and
# v2/instance_manager/cloud_providers/kuberay/cloud_provider.py in Ray 2.60): GET pods/<head>,
# GET pods?labelSelector= (list), GET and PATCH rayclusters/<name>. Pod patches (in-place resize,
# annotation ray.io/ippr) and RayCluster delete (idleTerminationOptions) are opt-in features not used here.
AUTOSCALER_NEEDS = {("", "pods"): {"get", "list"}, ("ray.io", "rayclusters"): {"get", "patch"}}


def _deployments(rs: dict) -> dict[str, dict]:
    return {d["name"]: d for app in _serve_config(rs)["applications"] for d in app.get("deployments", [])}


def _ray_node_types(rs: dict) -> dict[str, dict[str, float]]:
    """Each group's Ray resources as KubeRay's in-tree autoscaler reads them (Ray's own parser, so the
    custom-resource quoting in rayStartParams is checked too); keys as in pod_specs ("head", groupName)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _generate_available_node_types_from_ray_cr_spec

    types = _generate_available_node_types_from_ray_cr_spec(rs["spec"]["rayClusterConfig"])
    return {("head" if name == "headgroup" else name): t["resources"] for name, t in types.items()}


def _demand(d: dict) -> dict[str, float]:
    """What one replica asks Ray for (Serve's default is 1 CPU)."""
    opts = d.get("ray_actor_options") or {}
    need = {"CPU": float(opts.get("num_cpus", 1)), "GPU": float(opts.get("num_gpus", 0))}
    need.update({k: float(v) for k, v in (opts.get("resources") or {}).items()})
    return {k: v for k, v in need.items() if v > 0}


def _groups_that_fit(node_types: dict, demand: dict) -> list[str]:
    return sorted(g for g, res in node_types.items() if all(res.get(k, 0) >= v for k, v in demand.items()))


def _declares_port(spec: dict, name: str) -> bool:
    return any(p.get("name") == name for c in spec["containers"] for p in c.get("ports", []))


def _ingress_group(rs: dict) -> str:
    """The one group the Router (and EventIntake) can be placed on; fails if there is not exactly one."""
    deployments, node_types = _deployments(rs), _ray_node_types(rs)
    hosts = {name: _groups_that_fit(node_types, _demand(deployments[name]))
             for name in PINNED_TO_INGRESS if name in deployments}
    assert "Router" in hosts
    for name, groups in hosts.items():
        assert len(groups) == 1, (f"{name} can be placed on {groups}: pin it with a Ray resource that only one "
                                  "group declares (rayStartParams resources) and it requests (serveConfigOverrides)")
    (group,) = {g for gs in hosts.values() for g in gs}
    return group


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_the_router_runs_on_one_cpu_pod_and_no_pod_serves_a_second_metrics_port(item):
    """The Router has one possible group, not the head, of exactly one pod; its metrics go out through Ray's
    exporter (port `metrics`, on every pod), so no pod declares a port of its own for them."""
    overlay, rs = item
    group = _ingress_group(rs)
    assert group != "head", f"{overlay}: the head must not host the Router"
    declaring = [g for g, spec in pod_specs(rs) if _declares_port(spec, "app-metrics")]
    assert declaring == [], f"{overlay}: app-metrics is declared by {declaring}; the Router has no such port"
    (spec,) = [g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == group]
    assert spec["minReplicas"] == spec["maxReplicas"] == 1, \
        f"{overlay}: {group} must be exactly one pod: a second would stay empty (the Router has one replica)"
    assert _deployments(rs)["Router"]["num_replicas"] == 1


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_what_can_only_run_on_the_ingress_pod_fits_it_together(item):
    """Everything whose only possible group is the ingress pod's (prod: Router + EventIntake; dev: the
    whole CPU app), at its most replicas, fits that one pod's Ray resources -- CPUs from its limit."""
    overlay, rs = item
    group = _ingress_group(rs)
    node_types = _ray_node_types(rs)
    total: dict[str, float] = {}
    for name, d in _deployments(rs).items():
        demand = _demand(d)
        if _groups_that_fit(node_types, demand) != [group]:
            continue
        n = (d.get("autoscaling_config") or {}).get("max_replicas", d.get("num_replicas", 1))
        for k, v in demand.items():
            total[k] = total.get(k, 0.0) + n * v
    assert total.get("CPU", 0) > 0
    for k, v in total.items():
        assert v <= node_types[group].get(k, 0) + 1e-9, \
            f"{overlay}: what must run on {group} needs {v} {k}, its pod gives {node_types[group].get(k, 0)}"


def _gpu_groups(rs: dict) -> set[str]:
    """Groups whose pods get a GPU, from Kubernetes (nvidia.com/gpu) or from Ray (a GPU resource)."""
    by_k8s = {g for g, spec in pod_specs(rs) if "nvidia.com/gpu" in json.dumps(spec["containers"])}
    return by_k8s | {g for g, res in _ray_node_types(rs).items() if res.get("GPU", 0) > 0}


def _check_ingress_pinned_away_from_gpus(rs: dict) -> str:
    """The Router and EventIntake (the S3 record writers) can be placed on one group only, with no GPU."""
    missing = set(PINNED_TO_INGRESS) - set(_deployments(rs))
    assert not missing, f"the serve config lacks {sorted(missing)}"
    group = _ingress_group(rs)
    assert group != "head" and group not in _gpu_groups(rs), \
        f"the Router and EventIntake run on {group!r}; pin them to the CPU group (serveConfigOverrides resources)"
    return group


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_router_and_intake_are_pinned_to_a_pod_without_gpus(item):
    """They hold the record key; pinned to the CPU pod, the key need not be on any GPU pod."""
    _check_ingress_pinned_away_from_gpus(item[1])


def test_an_intake_that_could_land_on_a_gpu_pod_is_caught():
    """Without its Ray resource EventIntake fits the GPU pods' CPUs too: the pin check must say so."""
    (rs,) = [copy.deepcopy(d) for d in OVERLAY_DOCS["prod"] if d["kind"] == "RayService"]
    config = _serve_config(rs)
    for d in config["applications"][0]["deployments"]:
        if d["name"] == "EventIntake":
            d["ray_actor_options"].pop("resources")
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    with pytest.raises(AssertionError, match="EventIntake can be placed on"):
        _check_ingress_pinned_away_from_gpus(rs)


RECORD_KEY_SECRET, RECORD_KEY_FILE = "mriseg-record-key", Path("/etc/mriseg/record-key/record.key")
RECORD_KEY_ENV = {"name": "MRISEG_RECORD_KEY_FILE", "value": str(RECORD_KEY_FILE)}


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_the_record_key_is_only_where_the_router_and_intake_run(item):
    """Secret mriseg-record-key (the S3 records' MAC key) and MRISEG_RECORD_KEY_FILE: in the Router/EventIntake
    pod, mounted read-only at the shared path; in no other pod (no GPU pod, not the head or its sidecar)."""
    overlay, rs = item
    group = _check_ingress_pinned_away_from_gpus(rs)
    pods = dict(pod_specs(rs))
    pods["head"] = {**pods["head"], "autoscaler": rs["spec"]["rayClusterConfig"]["autoscalerOptions"]}
    holders = {g for g, spec in pods.items() if RECORD_KEY_SECRET in json.dumps(spec)
               or RECORD_KEY_ENV["name"] in json.dumps(spec)}
    assert holders == {group}, f"{overlay}: the record key is in {sorted(holders)}, the Router runs on {group!r}"
    assert not holders & _gpu_groups(rs), overlay
    spec = pods[group]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"]:
        assert RECORD_KEY_ENV in c["env"], f"{overlay}/{group}/{c['name']}: env"
        mounts = [m for m in c["volumeMounts"] if Path(m["mountPath"]) in (RECORD_KEY_FILE, *RECORD_KEY_FILE.parents)]
        mount = max(mounts, key=lambda m: len(Path(m["mountPath"]).parts))
        secret = volumes[mount["name"]].get("secret") or {}
        assert mount.get("readOnly") is True and secret.get("secretName") == RECORD_KEY_SECRET, \
            f"{overlay}/{group}/{c['name']}: {RECORD_KEY_FILE} is not the read-only Secret {RECORD_KEY_SECRET}"
        assert {"key": "record.key", "path": str(RECORD_KEY_FILE.relative_to(mount["mountPath"]))} in secret["items"]
        # the pod's env is every pod's (the head's) plus the key's path: nothing else may drift apart
        head_env = pods["head"]["containers"][0]["env"]
        assert [e for e in c["env"] if e != RECORD_KEY_ENV] == head_env, f"{overlay}/{group}: env drifted"
    committed = [d for d in OVERLAY_DOCS[overlay] + EXAMPLES
                 if d["kind"] == "Secret" and d["metadata"]["name"] == RECORD_KEY_SECRET]
    assert all(set(_secret_texts(d).values()) <= {"<placeholder>"} for d in committed), \
        f"a value for {RECORD_KEY_SECRET} is committed: create it out of band (docs/kubernetes.md, section 4)"


# -- what a GPU pod holds (threat model: a compromised GPU worker, issue #34) ------------------------------
# The sub-model replicas read only the weights (model_sources, boto3's default chain) and the pinned manifest;
# the Router hands them arrays by Ray handle. Their pods get the model bucket's read-only identity and nothing
# of the server's: not its S3 identity, the sites' key digests, the record key or the intake's settings.

MODELS_S3_SECRET = "mriseg-models-s3"
MODEL_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SERVER_ONLY = re.compile(r"mriseg-s3|tenants|mriseg-record-key|record[._-]key|RECORD_KEY|mriseg-events|"
                         r"MRISEG_EVENTS_|" + SITE_KEY_NAMES.pattern, re.IGNORECASE)
SERVER_CONFIG_DIR = Path("/etc/mriseg")  # the tenants file and the record key


def _secrets_named(obj) -> set[str]:
    """The Secrets a pod spec uses: secret and projected volumes, env ``secretKeyRef``, ``envFrom`` ``secretRef``."""
    if isinstance(obj, list):
        return {n for v in obj for n in _secrets_named(v)}
    if not isinstance(obj, dict):
        return set()
    found = {v.get("secretName") or v.get("name") for k, v in obj.items()
             if k in ("secret", "secretKeyRef", "secretRef") and isinstance(v, dict)}
    return found | _secrets_named(list(obj.values()))


def _gpu_pod_problems(rs: dict, group: str) -> list[str]:
    """Everything the GPU group's pods hold beyond the model-read identity; empty if nothing."""
    spec = dict(pod_specs(rs))[group]
    bad = [f"uses Secret {n!r}" for n in sorted(_secrets_named(spec) - {MODELS_S3_SECRET})]
    bad += sorted({f"names {m.group(0)!r}" for s in _strings_in(spec) for m in SERVER_ONLY.finditer(s)})
    head_env = dict(pod_specs(rs))["head"]["containers"][0]["env"]
    common = [e for e in head_env if "valueFrom" not in e and not e["name"].startswith("MRISEG_EVENTS_")]
    for c in spec["containers"] + spec.get("initContainers", []):
        env = {e["name"]: e for e in c.get("env") or []}
        for name in MODEL_CREDENTIAL_ENV:
            ref = (env.get(name, {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if ref.get("name") != MODELS_S3_SECRET or ref.get("optional") is not True:
                bad.append(f"{c['name']}: {name} is not the optional Secret {MODELS_S3_SECRET}")
        if [e for e in c.get("env") or [] if "valueFrom" not in e] != common:
            bad.append(f"{c['name']}: its plain env drifted from the head's")
        bad += [f"{c['name']}: mounts {m['mountPath']}" for m in c.get("volumeMounts") or []
                if SERVER_CONFIG_DIR in (Path(m["mountPath"]), *Path(m["mountPath"]).parents)]
        bad += [f"{c['name']}: envFrom {e}" for e in c.get("envFrom") or []]
    # the app args reach every sub-model replica (SubModelSettings.s3): keys there would bypass the pod's identity
    for app in _serve_config(rs)["applications"]:
        keys = sorted(k for k in (app["args"].get("s3") or {}) if k in ("access_key_id", "secret_access_key"))
        bad += [f"the serve config's s3.{k} reaches the sub-models; use the pods' Secrets" for k in keys]
    return bad


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_gpu_pods_hold_only_the_model_read_identity(item):
    """A GPU pod's only Secret is mriseg-models-s3 (both AWS_* keys, optional): no mriseg-s3, no tenants file,
    no record key, no event-intake settings or rules, no site key; its other variables are the head's."""
    overlay, rs = item
    groups = _gpu_groups(rs)
    assert groups or overlay == "dev", f"{overlay}: no GPU group"
    for group in sorted(groups):
        problems = _gpu_pod_problems(rs, group)
        assert not problems, f"{overlay}/{group} holds more than the model weights need:\n" + "\n".join(problems)


IRSA_ROLE = "eks.amazonaws.com/role-arn"


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_gpu_pods_have_a_service_account_and_cloud_role_of_their_own(item):
    """With IRSA a pod's S3 identity is its ServiceAccount's role: the GPU groups' account is theirs alone
    (no head or cpu pod runs as it), holds no API token, and names a role other than the server's."""
    overlay, rs = item
    accounts = {d["metadata"]["name"]: d for d in OVERLAY_DOCS[overlay] if d["kind"] == "ServiceAccount"}
    used = {g: spec["serviceAccountName"] for g, spec in pod_specs(rs)}
    assert set(used.values()) <= set(accounts), f"{overlay}: pods run as accounts the rendering lacks"
    gpu = _gpu_groups(rs)
    assert gpu or overlay == "dev", f"{overlay}: no GPU group"
    gpu_accounts = {used[g] for g in gpu}
    assert not gpu_accounts & {a for g, a in used.items() if g not in gpu}, \
        f"{overlay}: a GPU group shares its ServiceAccount (and IRSA role) with the head or the cpu pod"
    server_roles = {(accounts[used[g]]["metadata"].get("annotations") or {}).get(IRSA_ROLE) for g in used
                    if g not in gpu}
    for name in gpu_accounts:
        sa = accounts[name]
        assert sa.get("automountServiceAccountToken") is False, f"{overlay}/{name}"
        role = (sa["metadata"].get("annotations") or {}).get(IRSA_ROLE)
        assert role and role not in server_roles, f"{overlay}/{name}: IRSA role {role!r} is the server's or none"


@pytest.mark.parametrize("leak", ["envFrom", "projected", "tenants-mount", "serve-config-keys"])
def test_what_a_gpu_pod_must_not_hold_is_caught(leak):
    """The check sees a Secret however it comes in, a mount of the server's config folder and keys in the args."""
    (rs,) = [copy.deepcopy(d) for d in OVERLAY_DOCS["prod"] if d["kind"] == "RayService"]
    assert not _gpu_pod_problems(rs, "gpu")
    (group,) = [g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    spec, worker = group["template"]["spec"], group["template"]["spec"]["containers"][0]
    if leak == "envFrom":
        worker["envFrom"] = [{"secretRef": {"name": "some-secret"}}]
    elif leak == "projected":
        spec["volumes"].append({"name": "x", "projected": {"sources": [{"secret": {"name": "some-secret"}}]}})
    elif leak == "tenants-mount":
        worker["volumeMounts"].append({"name": "model-cache", "mountPath": "/etc/mriseg"})
    else:
        config = _serve_config(rs)
        config["applications"][0]["args"]["s3"] = {"access_key_id": "a", "secret_access_key": "b"}
        rs["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    assert _gpu_pod_problems(rs, "gpu")


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_the_router_journal_is_on_a_volume_of_its_own(item):
    """Spooled uploads and results fill ray-tmp (/tmp); the Router's journal must not share that disk: its
    journal_dir is a tmpfs of its own on the Router's pod, with room for the journal's byte bound."""
    from serve.router.service import RouterSettings

    overlay, rs = item
    settings = RouterSettings.from_mapping(_serve_config(rs)["applications"][0]["args"]["router"])
    spec = dict(pod_specs(rs))[_ingress_group(rs)]
    (container,) = [c for c in spec["containers"] if c["name"] == "ray-worker"]

    def volume_holding(path: Path) -> str:  # the deepest mount at or above path
        mounts = [m for m in container["volumeMounts"] if Path(m["mountPath"]) in (path, *path.parents)]
        return max(mounts, key=lambda m: len(Path(m["mountPath"]).parts))["name"]

    journal = volume_holding(settings.journal_path())
    assert journal != volume_holding(Path(settings.results_dir)) == volume_holding(Path("/tmp")), overlay
    (vol,) = [v for v in spec["volumes"] if v["name"] == journal]
    assert vol["emptyDir"]["medium"] == "Memory", f"{overlay}: {journal} must be a filesystem of its own"
    assert _quantity(vol["emptyDir"]["sizeLimit"]) >= 2 * settings.journal_max_bytes, \
        f"{overlay}: {journal} needs room for journal_max_bytes of settled records plus the unsettled ones"


def test_custom_resources_reach_ray_start_as_json():
    """KubeRay puts rayStartParams into `ray start --key=value` under bash; `--resources` must come out as
    JSON (the quoting KubeRay documents: '"{\"name\": 1}"'), the same that Ray's autoscaler parses."""
    seen = 0
    for _, rs in rayservices():
        node_types = _ray_node_types(rs)
        for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
            value = g["rayStartParams"].get("resources")
            if value is None:
                continue
            out = subprocess.run(["bash", "-c", f"printf '%s' --resources={value}"], capture_output=True,
                                 text=True, check=True).stdout
            parsed = json.loads(out.removeprefix("--resources="))
            assert parsed and all(node_types[g["groupName"]][k] == v for k, v in parsed.items()), (g["groupName"], out)
            seen += 1
    assert seen >= len(rayservices())


def test_no_serve_config_sets_the_retired_metrics_args():
    """The Router's metrics leave through Ray's exporter; the app refuses metrics_port and metrics_host."""
    for overlay, docs in OVERLAY_DOCS.items():
        (rs,) = [d for d in docs if d["kind"] == "RayService"]
        args = _serve_config(rs)["applications"][0]["args"]
        assert not {"metrics_port", "metrics_host"} & set(args), overlay


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_no_rayservice_fields_that_kuberay_ignores(item):
    """KubeRay has not read these since 1.1 (ray-project/kuberay#1685, PRs #1656/#1664/#1665): setting them
    suggests a protection that does not exist."""
    overlay, rs = item
    assert not DEPRECATED_RAYSERVICE_FIELDS & set(rs["spec"]), overlay


def test_autoscaler_role_grants_only_what_the_ray_autoscaler_calls():
    for overlay, docs in OVERLAY_DOCS.items():
        (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "mriseg-ray-autoscaler"]
        granted: dict[tuple[str, str], set[str]] = {}
        for rule in role["rules"]:
            assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), overlay
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
        assert granted == AUTOSCALER_NEEDS, f"{overlay}: {granted}"


# -- the dev overlay fits one small node --------------------------------------------------------

NODE_CPU, NODE_MEMORY, HEADROOM = 4.0, 16 * 2**30, 0.85


def test_dev_overlay_fits_a_4_cpu_16gb_node_without_gpu():
    (rs,) = [d for d in OVERLAY_DOCS["dev"] if d["kind"] == "RayService"]
    rc = rs["spec"]["rayClusterConfig"]
    pods = [(1, rc["headGroupSpec"]["template"]["spec"]["containers"] + [rc["autoscalerOptions"]])]
    pods += [(g["minReplicas"], g["template"]["spec"]["containers"]) for g in rc["workerGroupSpecs"]]
    cpu = sum(n * _quantity(c["resources"]["requests"]["cpu"]) for n, cs in pods for c in cs)
    mem = sum(n * _quantity(c["resources"]["requests"]["memory"]) for n, cs in pods for c in cs)
    assert "nvidia.com/gpu" not in json.dumps(rc)
    assert cpu <= NODE_CPU * HEADROOM, f"dev requests {cpu} CPUs"
    assert mem <= NODE_MEMORY * HEADROOM, f"dev requests {mem / 2**30:.1f} GiB"
    # and Ray can place the serve app's minimum replicas on the CPUs those pods give it
    ray_cpus = float(rc["headGroupSpec"]["rayStartParams"].get("num-cpus", 0))
    ray_cpus += sum(g["minReplicas"] * _quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                    for g in rc["workerGroupSpecs"])
    need = 0.0
    for app in _serve_config(rs)["applications"]:
        for d in app.get("deployments", []):
            n = (d.get("autoscaling_config") or {}).get("min_replicas", d.get("num_replicas", 1))
            need += n * float((d.get("ray_actor_options") or {}).get("num_cpus", 1))
    assert need <= ray_cpus, f"the dev serve app needs {need} Ray CPUs at minimum, the pods give {ray_cpus}"


# -- observability ---------------------------------------------------------------------------

def _defined_mriseg_metrics() -> set[str]:
    names = set()
    for f in (ROOT / "serve").rglob("*.py"):
        names |= set(re.findall(r"[\"'](mriseg_[a-z0-9_]+)[\"']", f.read_text()))
    return names


def test_dashboard_and_alerts_use_metrics_that_exist():
    dashboard = json.loads((ROOT / "k8s" / "observability" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((ROOT / "k8s" / "base" / "prometheusrule.yaml").read_text())
    exprs += [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:ray_)?mriseg_[a-z0-9_]+?)(?:_bucket|_count|_sum)?\b", e)}
    # Every replica's ray.util.metrics (the Router's, the sub-models', EventIntake's) reach Prometheus through
    # Ray's agent, which prefixes each name with ray_: an unprefixed mriseg_ name matches no series.
    unprefixed = sorted(m for m in used if not m.startswith("ray_"))
    assert not unprefixed, f"queried without Ray's ray_ prefix, so matching nothing: {unprefixed}"
    from serve.cluster.metrics import INGRESS_METRIC_NAMES

    assert {m for m in used if m in INGRESS_METRIC_NAMES}, "the Router's metrics are queried under Ray's names"
    defined = _defined_mriseg_metrics()
    missing = sorted(m for m in used
                     if m.removeprefix("ray_") not in defined and m.removeprefix("ray_") + "_total" not in defined)
    assert not missing, f"dashboard/alerts use ray_ metrics that no ray.util.metrics defines: {missing}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "latency", "replicas", "gpu utilisation", "queue depth", "errors by site"):
        assert topic in titles


@pytest.mark.parametrize("item", rayservices(), ids=_id)
def test_every_overlay_requires_every_sandbox_layer(item):
    """The pods' kernels have Landlock: a router whose decoder lacks any layer must not become ready."""
    from serve.imaging.sandbox import LAYERS, SandboxPolicy

    overlay, rs = item
    policy = SandboxPolicy.from_mapping(_serve_config(rs)["applications"][0]["args"].get("sandbox"))
    assert set(policy.require) == set(LAYERS), overlay
    assert Path(policy.scratch_dir).is_relative_to("/tmp"), f"{overlay}: scratch belongs on ray-tmp, not the journal"
