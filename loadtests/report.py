"""Turn a run's request records into the report: statistics (JSON), a Markdown table and PNG plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

PERCENTILES = (50, 90, 99)
STAT_KEYS = ("requests", "ok", "errors", "output_tokens", "output_tok_s", "req_s")


def machine_state() -> dict[str, Any]:
    """Record how busy the machine was: on a shared box the load average explains a lot of the noise."""
    return {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "host": platform.node(),
    }


def _percentiles(values: Iterable[float]) -> dict[str, float | None]:
    data = np.asarray([v for v in values if v is not None], dtype=float)
    if data.size == 0:
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": round(float(np.percentile(data, p)) * 1000, 2) for p in PERCENTILES}  # ms


def stats(records: list, wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.status == 200 and r.error is None]
    errors: dict[str, int] = {}
    for r in records:
        if not (r.status == 200 and r.error is None):
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
    tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_status": errors,
        "output_tokens": tokens,
        "output_tok_s": round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        "req_s": round(len(ok) / wall_s, 3) if wall_s > 0 else 0.0,
        "ttft_ms": _percentiles(r.ttft_s for r in ok),
        "itl_ms": _percentiles(gap for r in ok for gap in r.itl_s),
        "e2e_ms": _percentiles(r.e2e_s for r in ok),
    }


def summarize(work, records: list, wall_s: float, machine_before: dict) -> dict[str, Any]:
    config = {k: v for k, v in asdict(work).items() if k != "api_key"}
    records = sorted(records, key=lambda r: r.start_s)
    per_model = {model: stats([r for r in records if r.model == model], wall_s)
                 for model in sorted({r.model for r in records})}
    return {
        "label": work.label,
        "config": config,
        "machine": {"before": machine_before, "after": machine_state()},
        "wall_s": round(wall_s, 3),
        "overall": stats(records, wall_s),
        "per_model": per_model,
        # Raw timings, so that plots (and any later analysis) need no re-run.
        "records": [{"model": r.model, "status": r.status, "error": r.error, "start_s": round(r.start_s, 4),
                     "ttft_s": r.ttft_s, "e2e_s": r.e2e_s, "output_tokens": r.output_tokens,
                     "itl_s": [round(g, 5) for g in r.itl_s]} for r in records],
    }


def is_complete(result: dict) -> bool:
    """Every section the report promises is there (used by the smoke test and by compare)."""
    sections = [result["overall"], *result["per_model"].values()]
    return all(all(k in s for k in STAT_KEYS) and all(s[m] is not None and set(s[m]) == {f"p{p}" for p in PERCENTILES}
                                                       for m in ("ttft_ms", "itl_ms", "e2e_ms"))
               for s in sections) and result["per_model"] != {}


# ------------------------------------------------------------------------------------------ Markdown


def _fmt(value: Any) -> str:
    return "–" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def markdown(results: list[dict], per_model: bool = True) -> str:
    head = ("| run | model | req | err (by status) | out tok/s | req/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms "
            "| E2E p50/p90/p99 ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def row(label: str, model: str, s: dict) -> str:
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors_by_status"].items())) or "0"
        pct = lambda m: "/".join(_fmt(s[m][f"p{p}"]) for p in PERCENTILES)  # noqa: E731
        return (f"| {label} | {model} | {s['requests']} | {errs} | {_fmt(s['output_tok_s'])} | {_fmt(s['req_s'])} "
                f"| {pct('ttft_ms')} | {pct('itl_ms')} | {pct('e2e_ms')} |")

    for result in results:
        lines.append(row(f"**{result['label']}**", "all", result["overall"]))
        if per_model and len(result["per_model"]) > 1:
            shown = sorted(result["per_model"].items(), key=lambda kv: -kv[1]["requests"])
            for model, s in shown[:12]:  # Zipf over 100 adapters: the head is what matters in a table
                lines.append(row("", model, s))
            if len(shown) > 12:
                lines.append(f"| | … {len(shown) - 12} more models (see the JSON) | | | | | | | |")
    return "\n".join(lines)


def settings_line(result: dict) -> str:
    c, m = result["config"], result["machine"]
    arrival = f"rate {c['rate']}/s" if c["rate"] else f"concurrency {c['concurrency']}"
    return (f"- **{result['label']}**: {c['shape']} over {len(c['adapters'])} adapters"
            f"{' + base' if c['include_base'] else ''}, {c['requests']} requests, {arrival}, "
            f"~{c['prompt_tokens']} prompt tokens, {c['max_tokens']} output tokens (ignore_eos={c['ignore_eos']}), "
            f"{c['endpoint']} endpoint; {m['before']['time_utc']}, load average before "
            f"{m['before']['loadavg_1_5_15']} after {m['after']['loadavg_1_5_15']}")


# ------------------------------------------------------------------------------------------ plots


def plot(results: list[dict], prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    paths = []
    # One curve per run, or per model when there is a single run.
    if len(results) == 1:
        groups = {model: [r for r in results[0]["records"] if r["model"] == model]
                  for model in results[0]["per_model"]}
        if len(groups) > 8:
            top = sorted(groups, key=lambda m: -len(groups[m]))[:8]
            groups = {m: groups[m] for m in top}
    else:
        groups = {res["label"]: res["records"] for res in results}

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, [("ttft_s", "TTFT"), ("itl_s", "inter-token latency"), ("e2e_s", "end-to-end")]):
        for name, records in groups.items():
            ok = [r for r in records if r["status"] == 200 and not r["error"]]
            values = [g for r in ok for g in r["itl_s"]] if key == "itl_s" else [r[key] for r in ok if r[key]]
            if not values:
                continue
            ax.ecdf(np.asarray(values) * 1000, label=name, marker="." if len(values) < 20 else None)
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if key != "itl_s" else "fraction of gaps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(prefix.with_name(prefix.name + "-latency-cdf.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(results) + 3), 4))
    labels = [res["label"] for res in results]
    values = [res["overall"]["output_tok_s"] for res in results]
    bars = ax.bar(labels, values, color="tab:blue")
    ax.bar_label(bars, fmt="%.1f")
    if len(results) == 1:  # one run: show each model's share as well
        per = sorted(results[0]["per_model"].items(), key=lambda kv: -kv[1]["output_tok_s"])[:12]
        bars = ax.bar([m for m, _ in per], [s["output_tok_s"] for _, s in per], color="tab:orange")
        ax.bar_label(bars, fmt="%.1f")
        ax.tick_params(axis="x", rotation=30)
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput")
    fig.tight_layout()
    paths.append(prefix.with_name(prefix.name + "-throughput.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_all(results: list[dict], prefix: Path, extra_markdown: str = "", extra_json: dict | None = None) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    payload = {"runs": results, **(extra_json or {})}
    prefix.with_name(prefix.name + ".json").write_text(json.dumps(payload, indent=1))
    text = [extra_markdown, markdown(results), "", "Settings:", *[settings_line(r) for r in results]]
    plots = plot(results, prefix)
    text += ["", *[f"![{p.stem}]({p.name})" for p in plots]]
    prefix.with_name(prefix.name + ".md").write_text("\n".join(t for t in text if t is not None) + "\n")
