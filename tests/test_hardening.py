"""Hostile-caller checks where the engine plays no role, run in-process (tests/gateway_inprocess.py):
no input is a 500, nothing a caller sends stalls the gateway, budgets count everything, keys."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from gateway_inprocess import client, inprocess_app
from test_admission import lora_config, lora_tensors, write_adapter

ADMIN, API, BOTH, OTHER = "admin-key", "api-key", "admin-and-api-key", "other-api-key"
KEYS = {"admin_keys": [ADMIN, BOTH], "api_keys": [API, BOTH, OTHER]}
BASE = "SmolLM2-135M-Instruct"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def run(coro):
    return asyncio.run(coro)


def envelope(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- 2. no input is a 500 --------------------------------------------------------------------------------

BAD_IDS = ["name@²", "name@١", "name@01", "name@0", "name@", "name@2147483648", "name@1@2", "Name", "@1", "a" * 65,
           "na me", "name@-1", "name@1.0"]


@pytest.mark.parametrize("model", BAD_IDS)
def test_malformed_model_ids_are_400_on_every_route(tmp_path: Path, model_dir: Path, model: str) -> None:
    app, engine = inprocess_app(tmp_path, model_dir, **KEYS)

    async def go():
        async with client(app, ADMIN) as http:
            answers = {
                "chat": await http.post("/v1/chat/completions", json={"model": model, **CHAT}),
                "completion": await http.post("/v1/completions", json={"model": model, "prompt": "hi"}),
                "retrieve": await http.get(f"/v1/models/{model}"),
                "adapter": await http.get(f"/v1/adapters/{model}"),
                "delete": await http.delete(f"/v1/adapters/{model}"),
                "promote": await http.post(f"/v1/adapters/{model}/promote", json={"version": 1}),
            }
        return answers

    for route, answer in run(go()).items():
        assert answer.status_code == 400, (route, answer.status_code, answer.text)
        assert envelope(answer)["code"] == "invalid_model_id", (route, answer.text)
    assert engine.posts == 0


@pytest.mark.parametrize("field,value", [
    ("n", 100.0), ("n", "100"), ("n", True), ("n", 2.0), ("max_tokens", 100.0), ("max_tokens", "100"),
    ("max_completion_tokens", "7"), ("top_logprobs", 1.0), ("logprobs", "true"), ("max_tokens", [1]),
])
def test_numbers_must_be_json_integers(tmp_path: Path, model_dir: Path, field: str, value: object) -> None:
    app, engine = inprocess_app(tmp_path, model_dir)

    async def go():
        async with client(app) as http:
            return await http.post("/v1/chat/completions", json={"model": BASE, **CHAT, field: value})

    answer = run(go())
    assert answer.status_code == 400, answer.text
    assert envelope(answer)["param"] == field
    assert engine.posts == 0, "refused before the engine"


def test_completion_logprobs_is_an_integer_and_caps_hold(tmp_path: Path, model_dir: Path) -> None:
    app, engine = inprocess_app(tmp_path, model_dir, max_n=2, max_completion_tokens=64)

    async def go():
        async with client(app) as http:
            return [
                await http.post("/v1/completions", json={"model": BASE, "prompt": "hi", "logprobs": 2.0}),
                await http.post("/v1/chat/completions", json={"model": BASE, **CHAT, "n": 3}),
                await http.post("/v1/chat/completions", json={"model": BASE, **CHAT, "max_tokens": 65}),
                await http.post("/v1/chat/completions", json={"model": BASE, **CHAT, "max_completion_tokens": 65}),
            ]

    codes = [envelope(answer)["code"] for answer in run(go())]
    assert codes == ["invalid_request", "n_too_large", "max_tokens_too_large", "max_tokens_too_large"]
    assert engine.posts == 0


@pytest.mark.parametrize("depth", [65, 5000, 200_000])
def test_deeply_nested_request_bodies_are_400(tmp_path: Path, model_dir: Path, depth: int) -> None:
    app, engine = inprocess_app(tmp_path, model_dir, **KEYS)
    nested = "[" * depth + "]" * depth
    body = '{"model": "%s", "messages": [{"role": "user", "content": %s}]}' % (BASE, nested)

    async def go():
        async with client(app, ADMIN) as http:
            headers = {"Content-Type": "application/json"}
            return (await http.post("/v1/chat/completions", content=body, headers=headers),
                    await http.post("/v1/adapters/x/promote", content='{"version": %s}' % nested, headers=headers))

    for answer in run(go()):
        assert answer.status_code == 400, answer.text
        assert envelope(answer)["code"] == "json_too_deep"
    assert engine.posts == 0


def test_deeply_nested_adapter_config_and_safetensors_header_are_400(tmp_path: Path, model_dir: Path) -> None:
    from quiver.adapters.validation import AdmissionError, BaseModelSpec, validate_adapter_dir

    base = BaseModelSpec.from_folder(model_dir)
    deep = write_adapter(tmp_path / "config")
    (deep / "adapter_config.json").write_text(json.dumps(lora_config())[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(AdmissionError) as refused:
        validate_adapter_dir(deep, base, 16)
    assert refused.value.code == "invalid_adapter_config"
    header = write_adapter(tmp_path / "header")
    raw = ('{"__metadata__": {"x": ' + "[" * 100 + "]" * 100 + "}}").encode()
    (header / "adapter_model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(AdmissionError) as refused:
        validate_adapter_dir(header, base, 16)
    assert refused.value.code == "invalid_safetensors"


# --- 3. nothing a caller sends stalls the gateway ---------------------------------------------------------

# Each is exponential for a backtracking engine (Python's `re`) over a module name.
CATASTROPHIC = [r"(.*.*)*\.q_projX", r"((model\.)*.*)*zz", r"(a|a?)+b"]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_regexes_are_matched_in_linear_time(tmp_path: Path, model_dir: Path, pattern: str) -> None:
    from quiver.adapters.validation import AdmissionError, BaseModelSpec, validate_adapter_dir

    base = BaseModelSpec.from_folder(model_dir)
    for field, config in [("target_modules", lora_config(target_modules=pattern)),
                          ("rank_pattern", lora_config(rank_pattern={pattern: 8, "q_proj": 8})),
                          ("alpha_pattern", lora_config(alpha_pattern={pattern: 8}))]:
        started = time.perf_counter()
        try:
            validate_adapter_dir(write_adapter(tmp_path / field, config), base, 16)
        except AdmissionError:
            pass
        assert time.perf_counter() - started < 5, field


def test_backreferences_and_huge_patterns_are_a_clear_400(tmp_path: Path, model_dir: Path) -> None:
    from quiver.adapters.validation import AdmissionError, BaseModelSpec, validate_adapter_dir

    base = BaseModelSpec.from_folder(model_dir)
    for name, pattern in [("backref", r"(q)_\1proj"), ("lookahead", r"(?=q).*"), ("long", "q" * 5000),
                          ("huge", "(((a{100}){100}){100})")]:
        with pytest.raises(AdmissionError) as refused:
            validate_adapter_dir(write_adapter(tmp_path / name, lora_config(target_modules=pattern)), base, 16)
        assert refused.value.code == "invalid_adapter_config", name
    with pytest.raises(AdmissionError) as refused:
        validate_adapter_dir(write_adapter(tmp_path / "ranks", lora_config(rank_pattern=["x"])), base, 16)
    assert refused.value.code == "invalid_adapter_config"


def _worst_upload(tmp_path: Path) -> bytes:
    """A tar.gz near the upload limit: catastrophic regexes in every regex field, a big skipped member that
    must still be decompressed, the adapter's files last."""
    folder = write_adapter(tmp_path / "worst", lora_config(target_modules=CATASTROPHIC[0],
                                                           rank_pattern={p: 8 for p in CATASTROPHIC}))
    buffer = io.BytesIO()
    # 192 MiB (under the default 256 MiB budget) that gzip must inflate just to get past it
    filler = bytes(range(256)) * (192 * 1024 * 1024 // 256)
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        info = tarfile.TarInfo("notes/filler.dat")
        info.size = len(filler)
        archive.addfile(info, io.BytesIO(filler))
        for path in sorted(folder.iterdir()):
            archive.add(path, arcname=path.name)
    return buffer.getvalue()


def test_health_answers_while_the_worst_upload_is_checked(tmp_path: Path, model_dir: Path) -> None:
    app, _ = inprocess_app(tmp_path, model_dir, **KEYS)
    upload = _worst_upload(tmp_path)
    staging = tmp_path / "store" / ".staging"
    events: list[str] = []

    times: dict[str, float] = {}

    async def register(http):
        times["upload sent"] = time.perf_counter()
        answer = await http.post("/v1/adapters", data={"name": "worst"},
                                 files=[("files", ("worst.tar.gz", upload, "application/gzip"))])
        times["upload done"] = time.perf_counter()
        events.append("upload done")
        return answer

    async def go():
        async with client(app, ADMIN) as http:
            upload_task = asyncio.create_task(register(http))
            while not any(staging.iterdir()) and not upload_task.done():  # the check has started
                await asyncio.sleep(0.001)
            assert not upload_task.done(), "the upload finished before /health could be sent: make it heavier"
            events.append("health sent")
            times["health sent"] = time.perf_counter()
            health = await http.get("/health")
            times["health done"] = time.perf_counter()
            events.append("health done")
            return health, await upload_task

    health, answer = run(go())
    print(f"\nworst upload ({len(upload) / 2**20:.1f} MiB, 192 MiB inflated, catastrophic regexes): checked in "
          f"{times['upload done'] - times['upload sent']:.2f} s; /health answered in "
          f"{(times['health done'] - times['health sent']) * 1000:.1f} ms meanwhile")
    assert health.status_code == 200
    assert events == ["health sent", "health done", "upload done"]
    assert answer.status_code == 400 and envelope(answer)["code"] == "unknown_target_module", answer.text


# --- 4. budgets ----------------------------------------------------------------------------------------

def _archive(kind: str, members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
    else:
        with tarfile.open(fileobj=buffer, mode={"tar": "w", "tar.gz": "w:gz", "tar.xz": "w:xz"}[kind]) as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "tar.xz"])
def test_skipped_archive_members_count_against_the_budget(tmp_path: Path, kind: str) -> None:
    from quiver.adapters.uploads import stage_upload
    from quiver.adapters.validation import AdmissionError

    bomb = _archive(kind, {"junk/zeros.bin.txt": bytes(8 * 1024 * 1024), "adapter_config.json": b"{}"})
    # An xz (or bz2) tar is accepted under the `.tar` name: tarfile opens any compression it knows.
    suffix = "tar" if kind == "tar.xz" else kind
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(AdmissionError) as refused:
        stage_upload([(f"bomb.{suffix}", io.BytesIO(bomb))], staging, max_bytes=1024 * 1024)
    assert (refused.value.code, refused.value.status) == ("archive_too_large", 413)
    assert list(staging.iterdir()) == [], "nothing is kept from a refused archive"
    # Under the budget, the same archive passes (the budget, not the member, was the refusal).
    fine = tmp_path / "fine"
    fine.mkdir()
    stage_upload([(f"ok.{suffix}", io.BytesIO(bomb))], fine, max_bytes=9 * 1024 * 1024)
    assert [p.name for p in fine.iterdir()] == ["adapter_config.json"]


def test_unauthenticated_bodies_are_refused_before_they_are_read(tmp_path: Path, model_dir: Path) -> None:
    app, _ = inprocess_app(tmp_path, model_dir, **KEYS)
    read: list[int] = []

    async def body():
        for _ in range(64):
            read.append(1)
            yield bytes(1024 * 1024)

    async def go():
        answers = {}
        for key, path in [(None, "/v1/adapters"), ("wrong", "/v1/adapters"), (API, "/v1/adapters"),
                          (None, "/v1/files"), (None, "/v1/chat/completions"), ("wrong", "/v1/completions")]:
            async with client(app, key) as http:
                answers[(key, path)] = await http.post(path, content=body(),
                                                       headers={"Content-Type": "multipart/form-data; boundary=x"})
        return answers

    for (key, path), answer in run(go()).items():
        expected = 403 if key == API else 401
        assert answer.status_code == expected, (key, path, answer.text)
        assert envelope(answer)["code"] in ("missing_api_key", "invalid_api_key", "admin_key_required")
    assert read == [], f"{len(read)} MiB of body were read before the key was checked"
    assert not list((tmp_path / "store" / ".staging").iterdir())


def test_an_oversized_body_without_a_length_is_a_413_on_every_route(tmp_path: Path, model_dir: Path) -> None:
    """No Content-Length to refuse early: the limit trips while the route reads the body, and is still a 413
    (FastAPI turned it into a vague 400 on its own path); the generation routes' fast path included."""
    app, engine = inprocess_app(tmp_path, model_dir, max_request_bytes=64 * 1024, max_upload_bytes=64 * 1024,
                                **KEYS)

    async def body(prefix: bytes):
        yield prefix
        for _ in range(8):
            yield b"x" * 16 * 1024

    async def go():
        answers = {}
        for key, path, prefix, content_type in [
                (API, "/v1/chat/completions", b'{"model": "' + BASE.encode() + b'", "pad": "', "application/json"),
                (API, "/v1/completions", b'{"model": "' + BASE.encode() + b'", "pad": "', "application/json"),
                (API, "/v1/chat/completions", b'{"model": "x", "pad": "', "text/plain"),
                (ADMIN, "/v1/fine_tuning/jobs", b'{"model": "x", "pad": "', "application/json")]:
            async with client(app, key) as http:
                answers[path, content_type] = await http.post(path, content=body(prefix),
                                                              headers={"Content-Type": content_type})
        return answers

    for where, answer in run(go()).items():
        assert answer.status_code == 413 and envelope(answer)["code"] == "request_too_large", (where, answer.text)
    assert engine.posts == 0


# --- 8. keys -------------------------------------------------------------------------------------------

def test_a_key_that_is_admin_and_api_key_keeps_admin_rights(tmp_path: Path, model_dir: Path) -> None:
    app, _ = inprocess_app(tmp_path, model_dir, **KEYS)

    async def go():
        async with client(app, BOTH) as http:
            return await http.post("/v1/adapters", data={"name": "x"}), await http.get("/v1/adapters")

    registration, listing = run(go())
    assert registration.status_code == 400 and envelope(registration)["param"] == "files", registration.text
    assert listing.status_code == 200


def test_a_requests_key_is_hashed_and_compared_once(tmp_path: Path, model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate identifies the key; the routes' scope and caller dependencies reuse it (it was three times)."""
    import quiver.auth

    app, _ = inprocess_app(tmp_path, model_dir, **KEYS)
    digests: list[str] = []
    digest = quiver.auth._digest
    monkeypatch.setattr(quiver.auth, "_digest", lambda key: digests.append(key) or digest(key))

    async def go():
        async with client(app, API) as http:
            answers = [await http.post("/v1/chat/completions", json={"model": "nobody", **CHAT}),
                       await http.get("/v1/models"),
                       await http.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 10**9})]
        async with client(app, "wrong") as http:
            answers.append(await http.get("/v1/models"))
        return answers

    missing, models, too_long, wrong = run(go())
    assert (missing.status_code, models.status_code, too_long.status_code, wrong.status_code) == (404, 200, 400, 401)
    assert envelope(too_long)["code"] == "max_tokens_too_large"
    assert digests == [API, API, API, "wrong"]


def test_metrics_key_setting(tmp_path: Path, model_dir: Path) -> None:
    tenant = "tenant-key"
    app, _ = inprocess_app(tmp_path, model_dir, metrics_require_key=True, tenant_keys={tenant: ["acme-*"]}, **KEYS)
    open_app, _ = inprocess_app(tmp_path / "open", model_dir, **KEYS)

    async def go():
        answers = {}
        for key in (None, tenant, API, ADMIN):
            async with client(app, key) as http:
                answers[key] = (await http.get("/metrics")).status_code
        async with client(open_app) as http:
            answers["open"] = (await http.get("/metrics")).status_code
        return answers

    assert run(go()) == {None: 401, tenant: 403, API: 200, ADMIN: 200, "open": 200}


def test_per_key_rate_limit_affects_that_key_only(tmp_path: Path, model_dir: Path) -> None:
    app, engine = inprocess_app(tmp_path, model_dir, key_requests_per_minute=2, **KEYS)
    engine.release.set()  # generation reaches the stand-in, which answers 503 at once

    async def go():
        async with client(app, API) as first, client(app, OTHER) as second:
            ask = {"model": BASE, **CHAT}
            mine = [await first.post("/v1/chat/completions", json=ask) for _ in range(3)]
            theirs = [await second.post("/v1/chat/completions", json=ask) for _ in range(2)]
        return mine, theirs

    mine, theirs = run(go())
    assert [a.status_code for a in mine] == [503, 503, 429]
    assert envelope(mine[2])["code"] == "key_rate_limited" and 55 <= int(mine[2].headers["Retry-After"]) <= 60
    assert [a.status_code for a in theirs] == [503, 503], "another key is not limited by the first one's use"


def test_per_key_concurrency_limit_affects_that_key_only(tmp_path: Path, model_dir: Path) -> None:
    app, engine = inprocess_app(tmp_path, model_dir, key_max_concurrent=1, **KEYS)

    async def go():
        async with client(app, API) as first, client(app, OTHER) as second:
            ask = {"model": BASE, **CHAT}
            held = asyncio.create_task(first.post("/v1/chat/completions", json=ask))
            while engine.posts < 1:
                await asyncio.sleep(0.001)
            refused = await first.post("/v1/chat/completions", json=ask)
            other = asyncio.create_task(second.post("/v1/chat/completions", json=ask))
            while engine.posts < 2:
                await asyncio.sleep(0.001)
            engine.release.set()
            return refused, await held, await other, await first.post("/v1/chat/completions", json=ask)

    refused, held, other, after = run(go())
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert envelope(refused)["code"] == "key_rate_limited"
    assert (held.status_code, other.status_code, after.status_code) == (503, 503, 503), "slot freed afterwards"


# --- 9. bounded metrics -------------------------------------------------------------------------------

def test_metric_labels_come_from_the_registry(tmp_path: Path, model_dir: Path) -> None:
    app, _ = inprocess_app(tmp_path, model_dir)

    async def go():
        async with client(app) as http:
            for model in ["nobody", "nobody@1", "secret-name-of-someone", "name@01", "name@001", "x@²"]:
                await http.post("/v1/chat/completions", json={"model": model, **CHAT})
            return (await http.get("/metrics")).text

    text = run(go())
    series = [line for line in text.splitlines() if line.startswith("quiver_requests_total")]
    assert series == [
        'quiver_requests_total{adapter="unknown",endpoint="chat/completions",model="unknown",status="400"} 3.0',
        'quiver_requests_total{adapter="unknown",endpoint="chat/completions",model="unknown",status="404"} 3.0',
    ] or sorted(series) == sorted([
        'quiver_requests_total{adapter="unknown",endpoint="chat/completions",model="unknown",status="404"} 3.0',
        'quiver_requests_total{adapter="unknown",endpoint="chat/completions",model="unknown",status="400"} 3.0',
    ]), series
    assert "nobody" not in text and "secret" not in text


# --- 10. disk full / storage errors -------------------------------------------------------------------

def _upload_files(folder: Path) -> list:
    return [("files", (path.name, path.read_bytes())) for path in sorted(folder.iterdir())]


@pytest.mark.parametrize("where,errname,status,code", [
    ("staging", "ENOSPC", 507, "insufficient_storage"),
    ("commit", "ENOSPC", 507, "insufficient_storage"),
    ("commit", "EDQUOT", 507, "insufficient_storage"),
    ("commit", "EACCES", 503, "store_unavailable"),
])
def test_a_store_that_cannot_be_written_refuses_cleanly(tmp_path: Path, model_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        where: str, errname: str, status: int, code: str) -> None:
    import errno
    import os

    import quiver.adapters.uploads as uploads
    from gateway_inprocess import LoadingEngine
    from quiver.adapters.store import LocalAdapterStore

    engine = LoadingEngine()
    app, _ = inprocess_app(tmp_path, model_dir, engine=engine, **KEYS)
    failure = OSError(getattr(errno, errname), os.strerror(getattr(errno, errname)))

    def fail(*_args, **_kwargs):
        raise failure

    if where == "staging":
        monkeypatch.setattr(uploads, "_copy_capped", fail)
    else:
        monkeypatch.setattr(LocalAdapterStore, "commit_version", fail)
    adapter = write_adapter(tmp_path / "adapter")

    async def go():
        async with client(app, ADMIN) as http:
            refused = await http.post("/v1/adapters", data={"name": "full"}, files=_upload_files(adapter))
            listing = await http.get("/v1/adapters")
            health = await http.get("/health")
            monkeypatch.undo()
            again = await http.post("/v1/adapters", data={"name": "full"}, files=_upload_files(adapter))
            return refused, listing, health, again

    refused, listing, health, again = run(go())
    assert refused.status_code == status and envelope(refused)["code"] == code, refused.text
    assert str(tmp_path) not in refused.text, "no path leaks to the caller"
    assert listing.json()["data"] == [] and health.status_code == 200
    assert again.status_code == 201, "serving and registering go on once the store can be written"
    version = again.json()["version"]
    assert engine.loaded == {f"full@{version}"}, "the failed version was taken out of the engine again"
    store = tmp_path / "store"
    manifests = sorted(str(p.relative_to(store)) for p in store.rglob("manifest.json"))
    assert manifests == [f"full/{version}/manifest.json"], "nothing half-written stays visible"
    assert list((store / ".staging").iterdir()) == []


# --- 11. a no-op adapter is flagged --------------------------------------------------------------------

def test_all_zero_lora_b_is_accepted_with_a_warning(tmp_path: Path, model_dir: Path) -> None:
    import torch

    from quiver.adapters.validation import NOOP_ADAPTER_WARNING, BaseModelSpec, validate_adapter_dir

    base = BaseModelSpec.from_folder(model_dir)
    untrained = {name: (torch.randn_like(t) if "lora_A" in name else t) for name, t in lora_tensors().items()}
    assert validate_adapter_dir(write_adapter(tmp_path / "noop", tensors=untrained), base, 16).warnings == [
        NOOP_ADAPTER_WARNING]
    trained = dict(untrained)
    key = next(name for name in trained if "lora_B" in name)
    trained[key] = trained[key].clone()
    trained[key][-1, -1] = 1e-6  # one non-zero value anywhere is an effect
    assert validate_adapter_dir(write_adapter(tmp_path / "real", tensors=trained), base, 16).warnings == []
