"""`s3://bucket/prefix` URLs, on their own: the settings check them without importing the store (or boto3),
so `settings` -> `adapters.store` -> `adapters.s3_store` -> `settings` is no longer a cycle."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → ("bucket", "some/prefix")."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError("must look like s3://bucket or s3://bucket/prefix")
    if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
        raise ValueError("must be s3://bucket[/prefix] only; the endpoint and credentials are set elsewhere")
    if not _BUCKET.fullmatch(parts.netloc):
        raise ValueError(f"{parts.netloc!r} is not a valid S3 bucket name")
    prefix = parts.path.strip("/")
    if prefix and any(segment in ("", ".", "..") for segment in prefix.split("/")):
        raise ValueError(f"the prefix {prefix!r} has empty or dot segments")
    return parts.netloc, prefix
