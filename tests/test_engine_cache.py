"""vLLM's cache outlives one engine start (cold start, issue #18): it is not under the per-start state folder."""

from __future__ import annotations

from pathlib import Path

from quiver.engine import engine_environment, engine_tmpdir
from quiver.settings import Settings


def test_vllm_cache_root_is_the_kept_cache_dir(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "run", engine_cache_dir=tmp_path / "kept")
    env = engine_environment(settings, api_key="k", parent={})
    assert env["VLLM_CACHE_ROOT"] == str((tmp_path / "kept").resolve())
    assert (tmp_path / "kept").is_dir()
    # Scratch is the state folder's, never the kept cache.
    assert env["TMPDIR"] == str(engine_tmpdir((tmp_path / "run").resolve()))
    assert not env["TMPDIR"].startswith(env["VLLM_CACHE_ROOT"])


def test_the_engine_tmpdir_leaves_room_for_vllms_socket_paths(tmp_path: Path) -> None:
    # vLLM binds ZMQ sockets at TMPDIR/<uuid4>; a Unix socket path holds at most 107 bytes.
    deep = tmp_path / ("d" * 60) / "state"
    env = engine_environment(Settings(state_dir=deep), api_key="k", parent={})
    socket_path = f"{env['TMPDIR']}/{'0' * 8}-{'0' * 4}-{'0' * 4}-{'0' * 4}-{'0' * 12}"
    assert len(socket_path) <= 107 and Path(env["TMPDIR"]).is_dir()
    assert env["TMPDIR"] == str(engine_tmpdir(deep.resolve()))  # the same folder at every start of this state
    assert engine_tmpdir(Path("/srv/q")) == Path("/srv/q/tmp")  # a short state folder keeps its own


def test_default_cache_dir_is_not_per_start(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    settings = Settings(state_dir=tmp_path / "run")
    assert settings.engine_cache_dir == tmp_path / "xdg" / "quiver" / "vllm-cache"
