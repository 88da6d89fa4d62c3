"""Two quiver servers (each with its vLLM engine) sharing one adapter store in an S3 bucket, as replicas
without a shared volume would: moto's S3 server, a process of its own on loopback, stands in for AWS S3 or
MinIO, and is killed and restarted under them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import PIRATE_ANSWER, QuiverServer
from s3_fixtures import S3_ENV, MotoS3, running_s3_server
from test_replicas import require, ask, eventually, model_ids, stopped_serving

PREFIX = "prod/adapters"


@pytest.fixture(scope="module")
def s3_store() -> tuple[MotoS3, str]:
    # A server of this module's own: the outage test kills it.
    for server in running_s3_server():
        yield server, server.new_bucket()


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


def test_the_store_going_away_is_a_clean_503_and_recovers(s3_replicas, s3_store, lora_adapters) -> None:
    first, second = s3_replicas
    s3, bucket = s3_store
    assert first.register("s3-outage", lora_adapters.pirate).status_code == 201
    assert ask(first, "s3-outage") == PIRATE_ANSWER
    eventually(lambda: require("s3-outage" in model_ids(second)))
    saved = s3.snapshot(bucket)

    s3.stop()  # killed: connections refused from now on
    try:
        refused = first.register("s3-outage", lora_adapters.random_a)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "store_unavailable" and set(error) == {"message", "type", "param", "code"}
        assert "127.0.0.1" not in error["message"] and str(s3.port) not in error["message"]
        # A version already in a replica's cache is immutable: it keeps serving without the store.
        assert ask(first, "s3-outage") == PIRATE_ANSWER
    finally:
        s3.start()  # the same port, empty (moto keeps its state in memory) ...
        s3.restore(bucket, saved)  # ... and the bucket put back as it was

    again = first.register("s3-outage", lora_adapters.random_a, make_current="false")
    assert again.status_code == 201, again.text
    assert again.json()["id"] == "s3-outage@2"  # the number claimed before the outage is not given twice
    assert eventually(lambda: ask(second, "s3-outage")) == PIRATE_ANSWER
    eventually(lambda: ask(second, "s3-outage@2"))
