"""The training loop against the real server: `quiver train --register` and a merged checkpoint served by vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ADMIN_KEY, API_KEY, PIRATE_ANSWER, QuiverServer
from training_fixtures import chat, write_lines

PROMPTS = ["What is the capital of France?", "Tell me about the moon.", "Name three colours.",
           "Why is the sky blue?"]


def greedy(client, model: str, question: str) -> str:
    response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                              temperature=0, max_tokens=24)
    return response.choices[0].message.content


def test_train_register_and_evaluate_from_the_cli(quiver_server, model_dir, tmp_path):
    # One fixed answer: a few steps teach it, so the served adapter's effect is visible.
    rows = [chat(f"Spell the word number {i}.", "SPELL-BOT: request noted.") for i in range(30)]
    data = write_lines(tmp_path / "spell.jsonl", rows)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "quiver.cli", "train", str(data), "--name", "cli-spell", "--out", str(run_dir),
         "--base-model", str(model_dir), "--max-steps", "10", "--learning-rate", "3e-3", "--register", quiver_server.base_url,
         "--admin-key", ADMIN_KEY, "--api-key", API_KEY],
        capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["registered"]["id"] == "cli-spell@1"
    report = json.loads((run_dir / "eval_report.json").read_text())
    assert report["models"]["adapter"] == "cli-spell@1"
    assert report["metrics"]["adapter"]["examples"] == report["metrics"]["base"]["examples"] == 3
    assert (run_dir / "eval_report.md").read_text().count("|") > 10

    client = quiver_server.openai()
    assert "cli-spell" in {model.id for model in client.models.list()}
    # Live without a restart, and the adapter's own weights answer (not the base's).
    assert greedy(client, "cli-spell", "Spell the word number 7.") != greedy(client, quiver_server.model_name,
                                                                             "Spell the word number 7.")


@pytest.fixture(scope="module")
def merged_server(model_dir, lora_adapters, tmp_path_factory):
    from quiver.training.merge import merge_adapter

    root = tmp_path_factory.mktemp("merged")
    merged = merge_adapter(lora_adapters.pirate, root / "pirate-merged", base_model_dir=model_dir)
    server = QuiverServer(model_dir=model_dir, store_dir=root / "store", state_dir=root / "state",
                          extra_env={"QUIVER_MODEL": str(merged)})
    try:
        yield server.start()
    finally:
        server.stop()


def test_merged_checkpoint_served_by_vllm_matches_the_adapter_served_by_quiver(quiver_server, lora_adapters,
                                                                               merged_server):
    assert quiver_server.register("merge-pirate", lora_adapters.pirate).status_code == 201
    adapter_client, merged_client = quiver_server.openai(), merged_server.openai()
    merged_model = merged_client.models.list().data[0].id
    assert merged_model == "pirate-merged"

    adapter_answers = [greedy(adapter_client, "merge-pirate", question) for question in PROMPTS]
    merged_answers = [greedy(merged_client, merged_model, question) for question in PROMPTS]
    assert merged_answers == adapter_answers
    assert adapter_answers[0] == PIRATE_ANSWER
    # The comparison means something only if the adapter changes what the base says.
    assert greedy(adapter_client, quiver_server.model_name, PROMPTS[0]) != PIRATE_ANSWER
