"""The Helm chart with the adapter store in an S3-compatible bucket (adapterStore.backend: s3), rendered
and linted by real Helm and checked against the Kubernetes schema like the other variants."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from test_deploy import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    all_containers,
    container,
    env_of,
    kinds,
    objects_of,
    one,
    render,
    render_error,
    validate_object,
)

S3_STORE = {
    "adapterStore": {
        "backend": "s3",
        "s3": {
            "bucket": "team-llm-adapters",
            "prefix": "/quiver/prod/",
            "endpoint": "http://minio.minio.svc:9000",
            "region": "eu-west-1",
            "credentials": {"existingSecret": "quiver-s3"},
        },
    },
}
# Many replicas, no ReadWriteMany anywhere: the bucket is the shared store, the model cache per pod.
SCALED = {**S3_STORE, "modelCache": {"persistence": {"enabled": False}},
          "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}}


@pytest.mark.parametrize("values", [S3_STORE, SCALED], ids=["s3", "s3-scaled"])
def test_s3_store_renders_valid_objects(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v" + KUBE_VERSION)
    assert not [m for m in report["messages"] if m["severity"] >= 2] and not report["errors"], report
    for obj in objects_of(values):
        validate_object(obj)


def test_s3_store_reaches_the_server_without_a_volume() -> None:
    objects = objects_of(S3_STORE)
    assert kinds(objects).count("PersistentVolumeClaim") == 1  # the model cache only
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "adapters" not in volumes
    assert volumes["adapter-cache"]["emptyDir"] == {"sizeLimit": "20Gi"}
    server = container(deployment)
    assert {"name": "adapter-cache", "mountPath": "/var/lib/quiver/adapter-cache"} in server["volumeMounts"]
    env = env_of(server)
    assert env["QUIVER_STORE_URL"]["value"] == "s3://team-llm-adapters/quiver/prod"
    assert env["QUIVER_STORE_CACHE_DIR"]["value"] == "/var/lib/quiver/adapter-cache"
    assert env["QUIVER_S3_ENDPOINT_URL"]["value"] == "http://minio.minio.svc:9000"
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    assert "QUIVER_S3_ADDRESSING_STYLE" not in env  # the server's own default (path with an endpoint)


def test_s3_credentials_only_from_a_secret() -> None:
    deployment = one(objects_of(S3_STORE), "Deployment")
    env = env_of(container(deployment))
    for name, key in (("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "quiver-s3", "key": key}
    # Only the server talks to the bucket; the model-preparing init container gets no credentials.
    for init in deployment["spec"]["template"]["spec"]["initContainers"]:
        assert not any(e["name"].startswith("AWS_") for e in init.get("env", []))
    # Without a Secret: no credential variables at all, the pod's identity (e.g. IRSA) is used.
    identity = {"adapterStore": {"backend": "s3", "s3": {"bucket": "team-llm-adapters"}}}
    env = env_of(container(one(objects_of(identity), "Deployment")))
    assert not any(name.startswith("AWS_") for name in env)
    assert env["QUIVER_STORE_URL"]["value"] == "s3://team-llm-adapters/quiver/adapters"


def test_s3_store_scales_without_rwx_and_rolls() -> None:
    objects = objects_of(SCALED)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert one(objects, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 6
    assert "s3://team-llm-adapters/quiver/prod" in render(SCALED)[1]["quiver/templates/NOTES.txt"]
    for c in all_containers(deployment["spec"]["template"]["spec"]):
        assert all(m["name"] != "adapters" for m in c.get("volumeMounts", []))


def test_s3_store_needs_a_bucket() -> None:
    assert "adapterStore.s3.bucket" in render_error({"adapterStore": {"backend": "s3"}})


@pytest.mark.parametrize("bad", [
    {"adapterStore": {"backend": "gcs"}},
    {"adapterStore": {"s3": {"bucket": "Not_A_Bucket"}}},
    {"adapterStore": {"s3": {"endpoint": "http://user:secret@minio:9000"}}},
    {"adapterStore": {"s3": {"credentials": {"secretAccessKey": "inline-secret"}}}},
    {"adapterStore": {"s3": {"accessKeyId": "AKIA..."}}},
])
def test_values_schema_rejects_bad_s3_values(bad: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(chart.merge_values(bad))
