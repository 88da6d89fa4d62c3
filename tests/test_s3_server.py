"""The S3 server process the store's tests run against, checked for what the store relies on (conditional
writes decided atomically, clean refusals), and the store across the server dying and coming back."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from s3_fixtures import MotoS3, running_s3_server
from quiver.adapters.s3_store import S3AdapterStore
from quiver.adapters.store import StoreUnavailable


@pytest.fixture(scope="module")
def s3() -> MotoS3:
    for server in running_s3_server():  # this module's own: one test kills it
        yield server


def status(exc: ClientError) -> tuple[int, str]:
    return exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"]["Code"]


def test_racing_if_none_match_puts_have_exactly_one_winner(s3: MotoS3) -> None:
    bucket = s3.new_bucket()

    def claim(i: int) -> int | tuple[int, str]:
        try:
            s3.client.put_object(Bucket=bucket, Key="name/1/.reserved", Body=str(i).encode(), IfNoneMatch="*")
            return 200
        except ClientError as exc:
            return status(exc)

    for _ in range(3):
        s3.client.delete_object(Bucket=bucket, Key="name/1/.reserved")
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(claim, range(8)))
        assert outcomes.count(200) == 1, outcomes
        assert all(o == (412, "PreconditionFailed") for o in outcomes if o != 200), outcomes


def test_a_stale_if_match_is_refused(s3: MotoS3) -> None:
    bucket = s3.new_bucket()
    first = s3.client.put_object(Bucket=bucket, Key="index.json", Body=b'{"current": 1}')["ETag"]
    s3.client.put_object(Bucket=bucket, Key="index.json", Body=b'{"current": 2}', IfMatch=first)
    with pytest.raises(ClientError) as lost:
        s3.client.put_object(Bucket=bucket, Key="index.json", Body=b'{"current": 3}', IfMatch=first)
    assert status(lost.value) == (412, "PreconditionFailed")
    assert s3.client.get_object(Bucket=bucket, Key="index.json")["Body"].read() == b'{"current": 2}'


def test_concurrent_index_updates_are_retried_not_lost(s3: MotoS3, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    replicas = [S3AdapterStore(f"s3://{bucket}/p", tmp_path / f"cache-{i}", endpoint_url=s3.endpoint_url)
                for i in range(4)]
    for replica in replicas:
        replica.prepare()
    # Every reservation bumps last_version in index.json by compare-and-swap: a lost race is retried, so
    # the index ends at the highest number handed out.
    with ThreadPoolExecutor(4) as pool:
        numbers = list(pool.map(lambda i: replicas[i % 4].reserve_version("a"), range(12)))
    assert sorted(numbers) == list(range(1, 13))
    index, _ = replicas[0]._read_index("a")
    assert index["last_version"] == 12


def test_the_store_across_the_server_dying_and_coming_back(s3: MotoS3, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    store = S3AdapterStore(f"s3://{bucket}/p", tmp_path / "cache", endpoint_url=s3.endpoint_url)
    store.prepare()
    assert store.reserve_version("a") == 1
    saved = s3.snapshot(bucket)
    s3.stop()
    try:
        for operation in (store.scan, lambda: store.reserve_version("a"), lambda: store.set_current("a", 1)):
            with pytest.raises(StoreUnavailable) as down:
                operation()
            assert down.value.status == 503 and down.value.code == "store_unavailable"
    finally:
        s3.start()
    # Back, but empty (moto keeps buckets in memory): the bucket is gone, still a clean 503.
    with pytest.raises(StoreUnavailable):
        store.scan()
    s3.restore(bucket, saved)
    assert store.scan() == {}  # reserved but never committed: nothing to serve
    assert store.reserve_version("a") == 2  # the claim made before the outage still counts
