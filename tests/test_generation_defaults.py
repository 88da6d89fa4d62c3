"""First contact: the default model serves with its model card's sampling defaults when a request sets none, and
any model folder's own generation_config.json is what the engine applies."""

from __future__ import annotations

import json
from pathlib import Path

from quiver.common.base_model import (
    DEFAULT_SAMPLING,
    prepare_default_model,
    prepared_version,
    served_base_model,
)

# The README's walkthrough question.
README_QUESTION = "What is the capital of France?"


def test_the_default_models_folder_carries_the_model_cards_sampling(model_dir: Path) -> None:
    from transformers import GenerationConfig

    config = json.loads((model_dir / "generation_config.json").read_text())
    assert {k: config[k] for k in DEFAULT_SAMPLING} == {"temperature": 0.2, "top_p": 0.9}
    loaded = GenerationConfig.from_pretrained(model_dir)  # what vLLM reads with --generation-config auto
    assert (loaded.temperature, loaded.top_p, loaded.eos_token_id) == (0.2, 0.9, 2)


def test_a_folder_prepared_before_is_upgraded_once_in_place(tmp_path: Path) -> None:
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    (folder / ".quiver-prepared").write_text("converted from SmolLM2-135M-Instruct.Q4_1.gguf\n")  # the old marker
    (folder / "generation_config.json").write_text(json.dumps({"_from_model_config": True, "eos_token_id": 2}))
    assert prepared_version(folder) == 1

    prepare_default_model(folder)
    assert json.loads((folder / "generation_config.json").read_text()) == {
        "eos_token_id": 2, "temperature": 0.2, "top_p": 0.9, "do_sample": True}
    assert prepared_version(folder) == 2
    before = (folder / "generation_config.json").stat().st_mtime_ns
    prepare_default_model(folder)  # already current: nothing rewritten
    assert (folder / "generation_config.json").stat().st_mtime_ns == before


def test_an_old_folder_on_a_read_only_mount_is_served_as_it_is(tmp_path: Path, monkeypatch) -> None:
    # A container's model volume is often mounted read-only (the image test does): the upgrade is skipped, not fatal.
    import errno

    import quiver.common.base_model as base_model

    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    (folder / ".quiver-prepared").write_text("converted from SmolLM2-135M-Instruct.Q4_1.gguf\n")

    def read_only(path, *_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(base_model, "write_text_atomic", read_only)
    assert prepare_default_model(folder) == folder
    assert prepared_version(folder) == 1 and not (folder / "generation_config.json").exists()


def test_a_model_folder_of_ones_own_is_never_rewritten(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    own = json.dumps({"temperature": 0.7, "top_k": 20})
    (folder / "generation_config.json").write_text(own)
    assert served_base_model(model=folder) == (folder, "my-model")
    assert (folder / "generation_config.json").read_text() == own


def test_the_readme_question_at_default_sampling_gets_a_sensible_english_answer(quiver_server) -> None:
    # The engine says which defaults it applies, and they are the folder's.
    engine_log = (quiver_server.state_dir / "engine.log").read_text(errors="replace")
    assert "'temperature': 0.2" in engine_log and "'top_p': 0.9" in engine_log

    client = quiver_server.openai()
    answers = []
    for _ in range(8):  # eight samples: the README's answer missing from all would be a real regression
        reply = client.chat.completions.create(
            model=quiver_server.model_name, messages=[{"role": "user", "content": README_QUESTION}], max_tokens=40)
        answers.append(reply.choices[0].message.content)
    # Measured once under load: 2 of 3 answers were exactly the README's, the third the French ramble the issue
    # quotes. The card's temperature 0.2 leaves that mode possible (its first token nearly ties with "The"), so
    # this asserts what holds: the README's answer comes at default sampling, not that every sample is it.
    assert sum(answer == "The capital of France is Paris." for answer in answers) >= 2, answers
