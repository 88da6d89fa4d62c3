"""The loss curve: extracted from the trainer's log history, saved as JSON and PNG, and read for trouble."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

SPIKE_FACTOR = 2.0
SPIKE_MIN_RISE = 0.5
SPIKE_WINDOW = 5
PLATEAU_FRACTION_OF_START = 0.8
PLATEAU_MAX_CHANGE = 0.05
OVERFIT_RISE = 0.02


def curve_from_log_history(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    train = [{"step": e["step"], "epoch": e.get("epoch", 0.0), "loss": e["loss"]} for e in log_history if "loss" in e]
    validation = [
        {"step": e["step"], "epoch": e.get("epoch", 0.0), "loss": e["eval_loss"]} for e in log_history if "eval_loss" in e
    ]
    return {"train": train, "validation": validation}


def curve_warnings(curve: dict[str, list[dict[str, float]]]) -> list[str]:
    train = curve["train"]
    losses = [p["loss"] for p in train]
    warnings: list[str] = []

    spikes = [
        train[i]["step"]
        for i in range(SPIKE_WINDOW, len(losses))
        if losses[i] > SPIKE_FACTOR * (before := statistics.median(losses[i - SPIKE_WINDOW : i]))
        and losses[i] - before > SPIKE_MIN_RISE
    ]
    if spikes:
        warnings.append(
            f"loss spiked at step(s) {', '.join(map(str, spikes[:5]))}: the learning rate may be too high"
        )

    if len(losses) >= 8:
        quarter = len(losses) // 4
        last, previous = statistics.fmean(losses[-quarter:]), statistics.fmean(losses[-2 * quarter : -quarter])
        flat = abs(previous - last) <= PLATEAU_MAX_CHANGE * previous
        if flat and last >= PLATEAU_FRACTION_OF_START * losses[0]:
            warnings.append(
                f"training loss flattened at {last:.3f}, close to where it started ({losses[0]:.3f}): the adapter "
                "learns little; try a higher learning rate, a larger rank, or check the data"
            )

    validation = [p for p in curve["validation"] if p["step"] > 0]
    for earlier, later in zip(validation, validation[1:]):
        if later["loss"] <= earlier["loss"] * (1 + OVERFIT_RISE):
            continue
        before = [p["loss"] for p in train if p["step"] <= earlier["step"]]
        between = [p["loss"] for p in train if earlier["step"] < p["step"] <= later["step"]]
        if before and between and statistics.fmean(between) < statistics.fmean(before[-len(between) :]):
            warnings.append(
                f"validation loss rose from {earlier['loss']:.3f} to {later['loss']:.3f} (step {later['step']}) "
                "while training loss fell: overfitting; fewer epochs or more data would help"
            )
            break
    return warnings


def save_curve(run_dir: Path, curve: dict[str, list[dict[str, float]]], warnings: list[str]) -> None:
    (run_dir / "loss_curve.json").write_text(json.dumps({**curve, "warnings": warnings}, indent=2) + "\n")
    plot_curve(curve, run_dir / "loss_curve.png")


def plot_curve(curve: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in worker processes
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    if curve["train"]:
        axes.plot([p["step"] for p in curve["train"]], [p["loss"] for p in curve["train"]], label="train", alpha=0.8)
    if curve["validation"]:
        axes.plot(
            [p["step"] for p in curve["validation"]],
            [p["loss"] for p in curve["validation"]],
            label="validation",
            marker="o",
        )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (assistant tokens)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
