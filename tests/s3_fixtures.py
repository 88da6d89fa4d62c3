"""A real S3 API on loopback for the S3 store's tests: moto's server as a process of its own
(tests/s3_server.py), reached over HTTP by boto3 exactly as a bucket on AWS or MinIO would be (signing,
listing pages, conditional writes, multipart uploads), and killed and restarted like a real server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

# Fake credentials for the fake endpoint, found by boto3's standard chain like real ones. The shared
# config files are pointed away so a developer's own AWS profile can never be picked up or used.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "quiver-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "quiver-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_SERVER = Path(__file__).with_name("s3_server.py")
_START_TIMEOUT_S = 60


@dataclass
class MotoS3:
    """One S3 server process. `stop()` kills it (its buckets with it: moto keeps them in memory);
    `start()` brings it back on the same port."""

    port: int = 0
    process: subprocess.Popen | None = None
    client: Any = None  # a boto3 S3 client, for looking behind the store's back
    buckets: list[str] = field(default_factory=list)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.process is None, "already running"
        self.process = subprocess.Popen([sys.executable, str(_SERVER), "--port", str(self.port)],
                                        env={**os.environ, **S3_ENV}, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + _START_TIMEOUT_S
        line = self.process.stdout.readline()  # "listening on <port>", printed once it accepts connections
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the S3 server did not start: {line!r}")
        self.port = int(line.split()[-1])
        if self.client is None:
            import boto3

            session = boto3.session.Session(aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                                             aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                                             region_name=S3_ENV["AWS_DEFAULT_REGION"])
            self.client = session.client("s3", endpoint_url=self.endpoint_url)
        while time.monotonic() < deadline:  # listening: the first request proves it answers S3
            try:
                self.client.list_buckets()
                return
            except Exception:  # noqa: BLE001 - still starting
                time.sleep(0.1)
        raise RuntimeError("the S3 server does not answer")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # no goodbye: as a crashed server or a lost network would
            self.process.wait(timeout=30)
            self.process.stdout.close()
            self.process = None

    def new_bucket(self) -> str:
        bucket = f"quiver-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=bucket)
        self.buckets.append(bucket)
        return bucket

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))

    def snapshot(self, bucket: str) -> dict[str, bytes]:
        return {key: self.client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in self.keys(bucket)}

    def restore(self, bucket: str, objects: dict[str, bytes]) -> None:
        """Put a bucket back as it was (as an operator restores one from a backup): the same bytes give
        the same ETags, so replicas see the same objects they saw before."""
        self.client.create_bucket(Bucket=bucket)
        for key, data in objects.items():
            self.client.put_object(Bucket=bucket, Key=key, Body=data)


def running_s3_server() -> Iterator[MotoS3]:
    """A server for as long as the generator runs, with the credentials in the environment for the stores
    the tests open in-process (the boto3 chain finds them as it would on a real deployment)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in S3_ENV.items():
            patch.setenv(name, value)
        server = MotoS3()
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    yield from running_s3_server()
