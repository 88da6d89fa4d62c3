"""A real S3 API on loopback for the S3 store's tests: moto's server, reached over HTTP by boto3 exactly as
a bucket on AWS or MinIO would be (signing, listing pages, conditional writes, multipart uploads)."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass
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


@dataclass
class MotoS3:
    endpoint_url: str
    client: Any  # a boto3 S3 client, for looking behind the store's back

    def new_bucket(self) -> str:
        bucket = f"quiver-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=bucket)
        return bucket

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))


class _OneRequestAtATime:
    """moto checks a conditional write's precondition and then writes, in two steps, so two concurrent
    `If-None-Match: *` puts of one key can both succeed; S3 (and MinIO) decide them atomically. Handling one
    request at a time gives moto S3's semantics, so racing clients are judged as S3 would judge them."""

    def __init__(self, app) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            return list(self.app(environ, start_response))  # the whole response, inside the lock


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    # moto's ThreadedMotoServer, with the app wrapped as above.
    import boto3
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    with pytest.MonkeyPatch.context() as patch:
        for name, value in S3_ENV.items():
            patch.setenv(name, value)
        app = _OneRequestAtATime(DomainDispatcherApplication(create_backend_app))
        server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            endpoint = f"http://127.0.0.1:{server.server_address[1]}"
            yield MotoS3(endpoint, boto3.session.Session().client("s3", endpoint_url=endpoint))
        finally:
            server.shutdown()
            thread.join()
