"""The evaluation metrics, on hand-made answers (no server needed: the subject is the scoring)."""

from __future__ import annotations

import pytest

from quiver.training.evaluate import Answer, render_markdown, score


def test_json_answers_score_validity_keys_and_fields():
    expected = ['{"name": "Ada", "year": 1843}', '{"name": "Alan", "year": 1936}']
    answers = [Answer('{"name": "Ada", "year": 1843}', 12), Answer('{"name": "Alan", "year": 1937}', 14)]
    metrics = score(expected, answers)
    assert metrics["examples"] == 2 and metrics["json_examples"] == 2
    assert metrics["valid_json"] == 1.0 and metrics["expected_keys"] == 1.0
    assert metrics["field_accuracy"] == 0.75 and metrics["exact_match"] == 0.5
    assert metrics["mean_answer_tokens"] == 13


def test_broken_json_and_free_text_get_partial_similarity_but_no_exact_match():
    broken = score(['{"a": 1}'], [Answer("not json", 2)])
    assert broken["valid_json"] == 0.0 and broken["field_accuracy"] == 0.0 and broken["exact_match"] == 0.0
    near_miss = score(["Arr, the meeting be at noon!"], [Answer("Arr, the meeting is at noon!", 8)])
    assert near_miss["exact_match"] == 0.0 and 0.8 < near_miss["similarity"] < 1.0
    assert score(["same"], [Answer("same", 1)])["similarity"] == pytest.approx(1.0)


def test_markdown_report_tables_every_metric_and_quotes_samples():
    metrics = score(["Arr!"], [Answer("Hello.", 2)])
    report = {"url": "http://x", "models": {"base": "base", "adapter": "pirate@1"},
              "metrics": {"base": metrics, "adapter": score(["Arr!"], [Answer("Arr!", 2)])},
              "samples": [{"line": 7, "prompt": "Say hi", "expected": "Arr!", "base": "Hello.", "adapter": "Arr!"}]}
    text = render_markdown(report, "pirate")
    assert "| exact_match | 0.0 | 1.0 |" in text and "| similarity |" in text
    assert "### test example 7" in text and "> Hello." in text


def test_preference_report_names_its_proxy_and_shows_both_answers_of_the_data():
    from quiver.training.evaluate import contains_preferred, length_metrics

    expected = ["The capital of Italy is Rome."]
    rambling = [Answer("Great question! You asked about Italy. The capital of Italy is Rome. Hope this helps!", 20)]
    wrong = [Answer("Milan.", 3)]
    assert contains_preferred(expected, rambling) == 1.0 and contains_preferred(expected, wrong) == 0.0
    assert contains_preferred(expected, [Answer("the capital of  italy is rome", 8)]) == 1.0  # case, spaces, full stop

    def metrics(answers):
        return {**score(expected, answers), "contains_preferred": contains_preferred(expected, answers),
                **length_metrics(answers, 9)}

    report = {"url": "http://x", "method": "dpo", "models": {"base": "base", "adapter": "concise@1"},
              "metrics": {"base": metrics(rambling), "adapter": metrics([Answer(expected[0], 9)])},
              "samples": [{"line": 3, "prompt": "Capital of Italy?", "expected": expected[0],
                           "non_preferred": "Great question! ... Rome ...", "base": rambling[0].text,
                           "adapter": expected[0]}]}
    text = render_markdown(report, "concise")
    assert "preference (DPO) run" in text and "| within_target_length | 0.0 | 1.0 |" in text
    assert "| contains_preferred | 1.0 | 1.0 |" in text and "| median_answer_tokens | 20 | 9 |" in text
    assert "**preferred**\n\n> The capital of Italy is Rome." in text and "**non-preferred**" in text
    assert "**expected**" not in text
