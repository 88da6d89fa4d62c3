"""vLLM's cache outlives one engine start (cold start, issue #18): it is not under the per-start state folder."""

from __future__ import annotations

from pathlib import Path

from quiver.engine import engine_environment
from quiver.settings import Settings


def test_vllm_cache_root_is_the_kept_cache_dir(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "run", engine_cache_dir=tmp_path / "kept")
    env = engine_environment(settings, api_key="k", parent={})
    assert env["VLLM_CACHE_ROOT"] == str((tmp_path / "kept").resolve())
    assert (tmp_path / "kept").is_dir()
    # Scratch that must not outlive a start stays under the state folder.
    assert env["TMPDIR"].startswith(str((tmp_path / "run").resolve()))


def test_default_cache_dir_is_not_per_start(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    settings = Settings(state_dir=tmp_path / "run")
    assert settings.engine_cache_dir == tmp_path / "xdg" / "quiver" / "vllm-cache"
