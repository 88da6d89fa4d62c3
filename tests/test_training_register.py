"""The upload request `register_adapter` sends, and how it reads the server's answers (HTTP layer only)."""

from __future__ import annotations

import json

import httpx
import pytest

from quiver.training.manifest import read_manifest, write_manifest
from quiver.training.register import RegistrationError, register_adapter


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    write_manifest(tmp_path, {"name": "pirate", "registered": None})
    return tmp_path


def test_uploads_name_and_both_files_with_the_admin_key(run_dir):
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"], seen["auth"] = str(request.url), request.headers["authorization"]
        seen["body"] = request.read()
        seen["type"] = request.headers["content-type"]
        return httpx.Response(201, json={"id": "pirate@3", "name": "pirate", "version": 3})

    record = register_adapter(run_dir, "http://quiver:8000/", "pirate", "sk-admin", transport=httpx.MockTransport(handler))
    assert record == {"id": "pirate@3", "name": "pirate", "version": 3}
    assert seen["url"] == "http://quiver:8000/v1/adapters" and seen["auth"] == "Bearer sk-admin"
    assert seen["type"].startswith("multipart/form-data")
    body = seen["body"]
    assert b'name="name"\r\n\r\npirate' in body
    assert body.count(b'name="files"') == 2
    assert b'filename="adapter_config.json"' in body and b'filename="adapter_model.safetensors"' in body
    assert b"weights" in body
    assert read_manifest(run_dir)["registered"] == {"url": "http://quiver:8000/", **record}


def test_server_errors_surface_message_status_and_code(run_dir):
    envelope = {"error": {"message": "rank 64 exceeds max_lora_rank 16", "type": "invalid_request_error", "param": "files", "code": "rank_too_large"}}
    transport = httpx.MockTransport(lambda request: httpx.Response(400, json=envelope))
    with pytest.raises(RegistrationError, match="rank 64 exceeds") as caught:
        register_adapter(run_dir, "http://quiver:8000", "pirate", "sk-admin", transport=transport)
    assert (caught.value.status, caught.value.code) == (400, "rank_too_large")
    assert read_manifest(run_dir)["registered"] is None


def test_missing_adapter_files_fail_before_any_request(run_dir):
    (run_dir / "adapter_model.safetensors").unlink()

    def handler(request):
        raise AssertionError("no request expected")

    with pytest.raises(RegistrationError, match="adapter_model.safetensors"):
        register_adapter(run_dir, "http://quiver:8000", "pirate", transport=httpx.MockTransport(handler))


def test_unreachable_server_is_a_registration_error(run_dir):
    def handler(request):
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(RegistrationError, match="could not reach"):
        register_adapter(run_dir, "http://quiver:8000", "pirate", transport=httpx.MockTransport(handler))
    assert json.loads((run_dir / "manifest.json").read_text())["registered"] is None
