"""Two quiver servers (each with its vLLM engine) sharing one adapter store in an S3 bucket, as replicas
without a shared volume would: moto's real S3 HTTP API on loopback stands in for AWS S3 or MinIO."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import PIRATE_ANSWER, QuiverServer
from s3_fixtures import S3_ENV, MotoS3, moto_s3  # noqa: F401
from test_replicas import require, ask, eventually, model_ids, stopped_serving

PREFIX = "prod/adapters"


@pytest.fixture(scope="module")
def s3_store(moto_s3: MotoS3) -> tuple[MotoS3, str]:  # noqa: F811
    return moto_s3, moto_s3.new_bucket()


@pytest.fixture(scope="module")
def s3_replicas(s3_store, model_dir, lora_adapters, tmp_path_factory):
    # lora_adapters first: the adapters are trained before any engine competes for the cores.
    s3, bucket = s3_store
    servers = []
    for name in ("s3-replica-a", "s3-replica-b"):
        root = tmp_path_factory.mktemp(name)
        servers.append(QuiverServer(model_dir=model_dir, store_dir=root / "unused-local-store",
                                    state_dir=root / "state",
                                    extra_env={**S3_ENV, "QUIVER_STORE_URL": f"s3://{bucket}/{PREFIX}",
                                               "QUIVER_S3_ENDPOINT_URL": s3.endpoint_url}))
    try:
        with ThreadPoolExecutor(2) as pool:  # both engines start at once: one start's wait, not two
            list(pool.map(QuiverServer.start, servers))
        yield servers
    finally:
        for server in servers:
            server.stop()


def cached(server: QuiverServer, name: str, version: int) -> Path:
    return server.state_dir / "adapter-cache" / name / str(version)


def test_register_on_one_serve_and_delete_on_the_other(s3_replicas, s3_store, lora_adapters) -> None:
    first, second = s3_replicas
    s3, bucket = s3_store

    registered = first.register("s3-pirate", lora_adapters.pirate)
    assert registered.status_code == 201, registered.text
    assert registered.json()["id"] == "s3-pirate@1"
    assert eventually(lambda: ask(second, "s3-pirate")) == PIRATE_ANSWER
    # The second replica had to download it (checked against the manifest) before its engine could load it.
    assert (cached(second, "s3-pirate", 1) / "adapter_model.safetensors").is_file()
    assert not first.store_dir.exists(), "an S3-backed server must not write a local store"

    # A version registered through the other replica gets the next number, not a second 1.
    again = second.register("s3-pirate", lora_adapters.random_a, make_current="false")
    assert again.status_code == 201, again.text
    assert again.json()["id"] == "s3-pirate@2"
    eventually(lambda: ask(first, "s3-pirate@2"))
    assert ask(first, "s3-pirate") == PIRATE_ANSWER  # still current
    eventually(lambda: require(model_ids(first) == model_ids(second)))

    with second.admin() as admin:
        assert admin.delete("/v1/adapters/s3-pirate").status_code == 200

    eventually(lambda: stopped_serving(first, "s3-pirate"))
    eventually(lambda: require(not cached(first, "s3-pirate", 1).exists() and not cached(first, "s3-pirate", 2).exists()))
    assert not cached(second, "s3-pirate", 1).exists()
    # Only the claims on the numbers (and the index) are left in the bucket.
    assert s3.keys(bucket, f"{PREFIX}/s3-pirate/") == [
        f"{PREFIX}/s3-pirate/1/.reserved", f"{PREFIX}/s3-pirate/2/.reserved", f"{PREFIX}/s3-pirate/index.json"]
