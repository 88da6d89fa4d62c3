"""Upload a trained adapter to a running quiver server, which serves it from the next request on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from quiver.training.manifest import ADAPTER_FILES, MANIFEST_FILE, update_manifest

# The server answers once the name's suite (if it has one) has run on the new version: minutes on a busy CPU.
UPLOAD_TIMEOUT_S = 900.0
SUITE_REPORT_FILE = "suite_report.md"


class RegistrationError(RuntimeError):
    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def register_adapter(
    run_dir: Path,
    url: str,
    name: str,
    admin_key: str | None = None,
    transport: httpx.BaseTransport | None = None,
) -> dict[str, Any]:
    """POST the adapter files to `{url}/v1/adapters`; return the server's version record (`id`, `name`, `version`)."""
    run_dir = Path(run_dir)
    missing = [f for f in ADAPTER_FILES if not (run_dir / f).is_file()]
    if missing:
        raise RegistrationError(f"{run_dir} is missing {', '.join(missing)}")
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    handles = [open(run_dir / f, "rb") for f in ADAPTER_FILES]
    try:
        files = [("files", (f, handle, "application/octet-stream")) for f, handle in zip(ADAPTER_FILES, handles)]
        with httpx.Client(base_url=url.rstrip("/"), timeout=UPLOAD_TIMEOUT_S, transport=transport) as client:
            response = client.post("/v1/adapters", data={"name": name}, files=files, headers=headers)
    except httpx.HTTPError as exc:
        raise RegistrationError(f"could not reach {url}: {exc}") from exc
    finally:
        for handle in handles:
            handle.close()

    if response.is_error:
        message, code = _error_details(response)
        raise RegistrationError(f"{url} refused the adapter ({response.status_code}): {message}", response.status_code, code)
    record = response.json()
    if record.get("gate"):
        _save_gate_report(run_dir, url, record["gate"], headers, transport)
    if (run_dir / MANIFEST_FILE).is_file():
        update_manifest(run_dir, registered={"url": url, **record})
    return record


def describe_registration(record: dict[str, Any]) -> str:
    """One line: where the version went, and what its name's suite said (the gate)."""
    gate = record.get("gate")
    if not gate:
        return f"registered as {record.get('id')}" + (" (current)" if record.get("current") else " (staged)")
    if gate.get("passed"):
        return (f"registered as {record.get('id')}: suite passed {gate['passed_cases']}/{gate['total_cases']}"
                + (" (current)" if record.get("current") else " (staged)"))
    return f"gated: {gate['passed_cases']}/{gate['total_cases']} passed, staged as {record.get('id')}"


def _save_gate_report(run_dir: Path, url: str, gate: dict[str, Any], headers: dict[str, str],
                      transport: httpx.BaseTransport | None) -> None:
    """The gate's Markdown report, beside the run (best effort: the registration itself succeeded)."""
    try:
        with httpx.Client(base_url=url.rstrip("/"), timeout=60, transport=transport) as client:
            response = client.get(f"{gate['report']}.md", headers=headers)
        if response.is_success:
            (run_dir / SUITE_REPORT_FILE).write_text(response.text)
    except (httpx.HTTPError, KeyError, OSError):
        pass


def _error_details(response: httpx.Response) -> tuple[str, str | None]:
    try:
        error = response.json()["error"]
        return error["message"], error.get("code")
    except (ValueError, KeyError, TypeError):
        return response.text[:500] or response.reason_phrase, None
