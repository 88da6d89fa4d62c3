"""The CPU serving image, built for real from the Dockerfile with podman, started, and called with `openai`.

No image registry is reachable on the project's machines, so the Dockerfile's `python:3.11-slim` base is
made here: a Debian bookworm root filesystem from `debootstrap` (imported into podman) plus
deploy/python-base.Containerfile, tagged with the exact name the Dockerfile's PYTHON_IMAGE uses. The
Dockerfile itself builds unchanged. pip inside the build finds torch==2.13.0+cpu where the host's pip does
(its find-links folder, mounted read-only) and trusts the host's CA bundle.

Cost is kept down by caching under ~/.cache/quiver/container-tests (or $QUIVER_IMAGE_CACHE): the root
filesystem, the base image and the built image are tagged by a hash of their inputs and reused while the
inputs are unchanged; pip's downloads live in a build cache mount. The first run takes several minutes,
a rerun with nothing changed only starts the container (about a minute for the engine).

Needs root, podman, buildah, debootstrap and runc (.ci/run installs them). Without them the tests skip,
unless QUIVER_REQUIRE_IMAGE_TEST=1 (set by .ci/run), where they fail.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from quiver.common.base_model import DEFAULT_MODEL_NAME, prepare_default_model
from quiver.settings import Settings

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
STANDIN = ROOT / "deploy" / "python-base.Containerfile"
CONTAINERS_CONF = ROOT / "deploy" / "containers.conf"
CACHE = Path(os.environ.get("QUIVER_IMAGE_CACHE") or
             Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quiver" / "container-tests")
DEBIAN_MIRROR = os.environ.get("QUIVER_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
API_KEY, ADMIN_KEY = "sk-image-test", "adm-image-test"
# What goes into the image (.dockerignore's allow-list): a change to any of these means a rebuild.
IMAGE_INPUTS = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "deploy/gpu-constraints.txt",
                "server", "training", "common")

REQUIRED_TOOLS = ("podman", "buildah", "debootstrap", "runc")


def _missing_prerequisites() -> str | None:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install podman buildah debootstrap runc; .ci/run does)"
    if os.geteuid() != 0:
        return "needs root (debootstrap and rootful podman)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _prerequisites() -> None:
    reason = _missing_prerequisites()
    if reason and os.environ.get("QUIVER_REQUIRE_IMAGE_TEST") == "1":
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)


def podman(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
    # Own storage under the cache dir: never touches (or depends on) anyone else's images on a shared machine.
    command = ["podman", "--root", str(CACHE / "storage"), "--runroot", str(CACHE / "runroot"), *args]
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} -> {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _tree_bytes(paths: tuple[str, ...]) -> bytes:
    chunks = []
    for name in paths:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
        for file in files:
            chunks.append(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes())
    return b"\0\0".join(chunks)


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert match, f"Dockerfile has no ARG {name}=..."
    return match.group(1)


def _docker_name(ref: str) -> str:
    """python:3.11.14-slim-bookworm -> docker.io/library/python:3.11.14-slim-bookworm, as a FROM resolves it."""
    if "/" not in ref:
        return f"docker.io/library/{ref}"
    first = ref.split("/", 1)[0]
    return ref if "." in first or ":" in first or first == "localhost" else f"docker.io/{ref}"


def ensure_base_image() -> str:
    """The Dockerfile's PYTHON_IMAGE, made locally (cached by the hash of its recipe)."""
    python_image = _docker_name(dockerfile_arg("PYTHON_IMAGE"))
    recipe = f"debootstrap --variant=minbase --include=python3 {SUITE} {DEBIAN_MIRROR}".encode()
    rootfs_tag = f"localhost/quiver-debian-rootfs:{_digest(recipe)}"
    base_tag = f"localhost/quiver-python-base:{_digest(recipe, STANDIN.read_bytes())}"
    if not image_exists(base_tag):
        if not image_exists(rootfs_tag):
            work = CACHE / "rootfs-work"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", SUITE, str(work / "rootfs"),
                            DEBIAN_MIRROR], check=True, capture_output=True, timeout=900)
            tar = subprocess.Popen(["tar", "-C", str(work / "rootfs"), "-c", "."], stdout=subprocess.PIPE)
            podman("import", "-", rootfs_tag, stdin=tar.stdout, timeout=600)
            assert tar.wait() == 0
            shutil.rmtree(work, ignore_errors=True)
        podman("build", "--isolation", "chroot", "--pull=never", "--build-arg", f"BASE={rootfs_tag}",
               "-t", base_tag, "-f", str(STANDIN), str(STANDIN.parent), timeout=900)
    # The exact name the Dockerfile's FROM uses; re-pointed on every run, so it is always this recipe's.
    podman("tag", base_tag, python_image)
    return python_image


def host_torch_wheels() -> Path | None:
    """The folder the host's pip finds torch==2.13.0+cpu in (a find-links entry), if any."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    candidates = re.findall(r"find-links='([^']*)'", listed) + os.environ.get("PIP_FIND_LINKS", "").split()
    for entry in candidates:
        for folder in entry.split():
            folder = folder.removeprefix("file://")
            if folder and any(Path(folder).glob("torch-2.13.0+cpu-*.whl")):
                return Path(folder)
    return None


def _ca_bundle() -> Path | None:
    for candidate in (os.environ.get("PIP_CERT"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def cpu_image() -> str:
    base = ensure_base_image()
    wheels = host_torch_wheels()
    ca = _ca_bundle()
    # --format docker: the OCI image format has no HEALTHCHECK, and podman would drop it (with a warning).
    options = ["--isolation", "chroot", "--pull=never", "--layers", "--format", "docker",
               "--build-arg", "VARIANT=cpu", "--target", "serving"]
    inputs = _digest(_tree_bytes(IMAGE_INPUTS), base.encode(), str(wheels).encode(), " ".join(options).encode())
    tag = f"localhost/quiver-test:cpu-{inputs}"
    if image_exists(tag):
        return tag
    args = ["build", *options, "-t", tag, "-f", str(DOCKERFILE)]
    if wheels is not None:
        args += ["--volume", f"{wheels}:{wheels}:ro", "--build-arg", f"TORCH_CPU_WHEELS={wheels}"]
    if ca is not None:
        # pip in the build trusts what the host trusts (a proxy's CA included) through the same config.
        args += ["--volume", f"{ca}:{ca}:ro"]
        if Path("/etc/pip.conf").is_file():
            args += ["--volume", "/etc/pip.conf:/etc/pip.conf:ro"]
    log = CACHE / "last-build.log"
    result = podman(*args, str(ROOT), timeout=3600, check=False)
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"image build failed (log: {log})\n{result.stderr[-4000:]}"
    # Each image is ~7 GB of layers: drop the ones built from older inputs (the dependency layer, keyed on
    # pyproject.toml, stays in podman's build cache).
    old = podman("images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", "reference=localhost/quiver-test").stdout
    stale = [ref for ref in old.split() if ref != tag]
    if stale:
        podman("rmi", "-f", *stale, check=False, timeout=600)
    return tag


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The default model, readable by the image's non-root user (the host's own cache is private to root)."""
    target = CACHE / "models" / DEFAULT_MODEL_NAME
    if not (target / "config.json").is_file():
        host = Settings().model_dir
        if (host / "config.json").is_file():
            shutil.copytree(host, target, dirs_exist_ok=True)
        else:
            prepare_default_model(target)
    for path in [target.parent, target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serving_image_leaves_training_out(cpu_image: str) -> None:
    script = ("import importlib.util as u, quiver.cli, quiver.app; "
              "print(sorted(m for m in ('trl', 'datasets', 'matplotlib', 'vllm', 'torch') if u.find_spec(m)))")
    out = podman("run", "--rm", "--network", "none", "--entrypoint", "python", cpu_image, "-c", script).stdout
    assert out.strip() == "['torch', 'vllm']"
    user = podman("image", "inspect", "--format", "{{.Config.User}} {{.Config.Env}}", cpu_image).stdout
    assert user.startswith("10001:0") and "QUIVER_HOST=0.0.0.0" in user
    health = podman("image", "inspect", "--format", "{{json .HealthCheck}}", cpu_image).stdout
    assert "/ready" in health, f"no HEALTHCHECK on /ready in the image: {health}"


def test_refuses_to_serve_without_keys(cpu_image: str) -> None:
    # The image listens on 0.0.0.0: without keys it must refuse, not serve everyone (nor hide on loopback).
    result = podman("run", "--rm", "--network", "none", cpu_image, timeout=300, check=False)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "QUIVER_ALLOW_NO_AUTH" in result.stderr + result.stdout


@pytest.fixture(scope="module")
def container(cpu_image: str, model_dir: Path) -> Iterator[str]:
    port = free_port()
    name = f"quiver-image-test-{os.getpid()}"
    podman("rm", "-f", name, check=False)
    # Host networking: the VM's CNI setup is not something this test should depend on; QUIVER_HOST stays the
    # image's 0.0.0.0, keys are set, and the port is a free one.
    # --shm-size: vLLM's engine and gateway exchange messages through /dev/shm (160 MiB); the default is 64 MiB.
    podman("run", "-d", "--name", name, "--network", "host", "--shm-size=1g",
           "-e", f"QUIVER_PORT={port}", "-e", f"QUIVER_API_KEYS={API_KEY}", "-e", f"QUIVER_ADMIN_KEYS={ADMIN_KEY}",
           "-e", "QUIVER_KV_CACHE_GIB=1", "-e", "QUIVER_DRAIN_TIMEOUT_S=5",
           "-v", f"{model_dir}:/var/lib/quiver/models:ro", cpu_image)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", f"container {state}:\n" + podman("logs", name, check=False).stderr[-4000:]
            try:
                if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, podman("logs", name, check=False).stderr[-4000:]
            time.sleep(3)
        yield base
    finally:
        podman("stop", "-t", "30", name, check=False, timeout=90)
        podman("rm", "-f", "-v", name, check=False)


def test_image_serves_the_openai_client(container: str) -> None:
    client = openai.OpenAI(base_url=f"{container}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    models = [m.id for m in client.models.list().data]
    assert DEFAULT_MODEL_NAME in models
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0

    # Keys are enforced through the container too.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{container}/v1", api_key="wrong", max_retries=0).models.list()

    # The serving image has no training extra: fine-tuning answers a clear error, not a crash.
    admin = openai.OpenAI(base_url=f"{container}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as caught:
        admin.fine_tuning.jobs.create(model=DEFAULT_MODEL_NAME, training_file="file-none")
    assert caught.value.status_code == 501
    assert caught.value.body["code"] == "training_unavailable"


def test_healthcheck_probes_readiness(container: str) -> None:
    name = f"quiver-image-test-{os.getpid()}"
    # Runs the image's HEALTHCHECK command inside the container once: healthy now that the engine is up.
    assert podman("healthcheck", "run", name, check=False, timeout=60).returncode == 0
