"""Which adapter store the settings name. On its own so that arrows run one way: this module knows both
backends, `store` (the interface and the local backend) knows neither the S3 backend nor the settings."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from quiver.adapters.store import AdapterStore, LocalAdapterStore


class StoreSettings(Protocol):
    """What `open_store` reads of the settings (`quiver.settings.Settings` has it all)."""

    store_url: str | None
    store_dir: Path
    adapter_cache_dir: Path
    s3_endpoint_url: str | None
    s3_addressing_style: str | None


def open_store(settings: StoreSettings) -> AdapterStore:
    """The store the settings name: an S3-compatible bucket with `store_url`, else the folder `store_dir`."""
    if settings.store_url:
        from quiver.adapters.s3_store import S3AdapterStore  # boto3 only loads when S3 is used

        return S3AdapterStore(settings.store_url, settings.adapter_cache_dir,
                              endpoint_url=settings.s3_endpoint_url, addressing_style=settings.s3_addressing_style)
    return LocalAdapterStore(settings.store_dir)
