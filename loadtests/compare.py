"""Issues #4 and #18's comparisons, each taken side by side in one run and printed as ratios (targets: #18's
where it raised #4's).

  mixed     4 adapters + base, and 4 adapters alone, vs base only, same server  (>= 0.97x, >= 0.95x tok/s)
  gateway   through quiver vs straight to its engine, same traffic            (>= 0.99x tok/s, <= 2 ms TTFT p50
            one request at a time)
  peft      quiver vs transformers+PEFT: (a) set_adapter per request, (b) mixed-adapter batch; peak RSS
  hot       POST /v1/adapters returning -> first token from the new adapter  (<= 2 s)
  scale     Zipf over 100 registered adapters vs uniform over 4, engine slots < working set
  all       every one of them on one server, in that order

Sides of a comparison alternate round by round (A B A B ...), so a shared machine's noise hits both alike;
ratios use the median over rounds. With no --base-url a quiver server is started (and stopped) for the run.

    python -m loadtests.compare all --out loadtests/results/2026-11-23
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Iterator, Optional

import httpx
import typer

from loadtests import report
from loadtests.loadgen import Workload, make_prompt, new_session, pick_models, run_workload, send_one
from loadtests.servers import (ADMIN_KEY, API_KEY, DEFAULT_MODEL_DIR, PeakRss, engine_url_from_log, make_adapters,
                               quiver_server, register)

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
BASE_NAME = "SmolLM2-135M-Instruct"
PROBE_REQUESTS = 20  # the gateway comparison's one-at-a-time TTFT probe, per side and round
PAIRS = 200  # and its paired probe (--pairs): requests a side, the sides taking turns request by request


@dataclass
class Target:
    base_url: str
    api_key: str
    admin_key: str
    engine_url: str | None
    engine_key: str | None  # the engine is sealed: its per-start key, for the straight-to-the-engine side
    pid: int | None  # the gateway's pid, for memory (its children are the engine processes)
    out: Path
    adapters_dir: Path
    model_dir: Path
    rounds: int
    work: Workload  # the shared traffic settings; each comparison changes shape/adapters/label
    summary: dict
    pairs: int = PAIRS


@contextmanager
def target(base_url: Optional[str], port: int, out: Path, rounds: int, requests: int, concurrency: int,
           max_tokens: int, prompt_tokens: int, max_loras: int, api_key: str, admin_key: str,
           engine_url: Optional[str], engine_key: Optional[str], server_log: Optional[Path],
           scratch: Path, lora_target_modules: str = "") -> Iterator[Target]:
    out.mkdir(parents=True, exist_ok=True)
    work = Workload(base_url="", model=BASE_NAME, requests=requests, concurrency=concurrency,
                    max_tokens=max_tokens, prompt_tokens=prompt_tokens)
    common = dict(out=out, adapters_dir=scratch / "adapters", model_dir=DEFAULT_MODEL_DIR, rounds=rounds,
                  summary={"started": report.machine_state()})
    if base_url:
        engine = engine_url or (engine_url_from_log(server_log) if server_log else None)
        yield Target(base_url=base_url, api_key=api_key, admin_key=admin_key, engine_url=engine,
                     engine_key=engine_key, pid=listening_pid(base_url),
                     work=replace(work, base_url=base_url, api_key=api_key), **common)
        return
    env = {"QUIVER_MAX_LORAS": str(max_loras), "QUIVER_LORA_TARGET_MODULES": lora_target_modules}
    server = quiver_server(scratch / f"server-{time.strftime('%Y%m%d-%H%M%S')}", port, env=env)
    typer.echo(f"starting quiver on {server.base_url} (max_loras={max_loras}, "
               f"lora_target_modules={lora_target_modules or 'all'}; log {server.log_path})")
    with server:
        yield Target(base_url=server.base_url, api_key=API_KEY, admin_key=ADMIN_KEY, engine_url=server.engine_url,
                     engine_key=server.engine_key, pid=server.process.pid, work=replace(work, base_url=server.base_url, api_key=API_KEY),
                     **common)


def listening_pid(base_url: str) -> int | None:
    """The process serving `base_url` on this machine (for its memory), if we may see it."""
    import psutil
    from urllib.parse import urlparse

    port = urlparse(base_url).port
    try:
        return next((c.pid for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid), None)
    except psutil.Error:
        return None


def ensure_adapters(t: Target, count: int, prefix: str = "lt-") -> list[str]:
    """Register lt-0..lt-{count-1} unless the server has them already; returns their pinned names."""
    folders = make_adapters(t.model_dir, t.adapters_dir, count, prefix=prefix)
    names = []
    with httpx.Client(base_url=t.base_url, headers={"Authorization": f"Bearer {t.admin_key}"}, timeout=60) as c:
        for folder in folders:
            existing = c.get(f"/v1/adapters/{folder.name}")
            if existing.status_code == 200:
                names.append(f"{folder.name}@{existing.json()['current_version']}")
            else:
                names.append(register(t.base_url, folder.name, folder, t.admin_key)["id"])
    return names


def run(work: Workload) -> dict:
    result = asyncio.run(run_workload(work))
    o = result["overall"]
    typer.echo(f"  {work.label:<24} {o['output_tok_s']:>7} tok/s  TTFT p50 {o['ttft_ms']['p50']} ms  "
               f"errors {o['errors_by_status'] or 0}  load {result['machine']['before']['loadavg_1_5_15']}")
    return result


def warm(t: Target, models: list[str], base_url: str | None = None) -> None:
    """One tiny request per model: loads adapters into the engine, so that loading isn't what's measured. Then
    one unrecorded run of the comparison's own size over them: the first batches of a size cost the engine (and
    the gateway) one-time work, which made the first measured run ~10 % slower than the rest."""
    url = base_url or t.base_url
    run(replace(t.work, base_url=url, shape="distinct", adapters=models, requests=len(models), concurrency=4,
                max_tokens=2, label="warm-up"))
    adapters = [m for m in models if m != BASE_NAME]
    run(replace(t.work, base_url=url, shape="uniform" if adapters else "base", adapters=adapters,
                include_base=BASE_NAME in models, label="warm-up, full size"))


def alternate(t: Target, sides: dict[str, Workload], cpu_of: int | None = None) -> dict[str, list[dict]]:
    """Rounds of every side in turn, the order rotating from round to round (so that no side always runs first,
    right after the previous round's last); with `cpu_of` (the gateway's pid), each run also records that
    process's own CPU seconds (user + system, children excluded) as `gateway_cpu_s`."""
    import psutil

    runs: dict[str, list[dict]] = {name: [] for name in sides}
    order = list(sides.items())
    for r in range(t.rounds):
        for name, work in order[r % len(order):] + order[:r % len(order)]:
            cpu = psutil.Process(cpu_of) if cpu_of else None
            before = sum(cpu.cpu_times()[:2]) if cpu else None
            result = run(replace(work, label=f"{name} #{r + 1}", seed=r))
            if cpu:
                result["gateway_cpu_s"] = round(sum(cpu.cpu_times()[:2]) - before, 4)
            runs[name].append(result)
    return runs


def round_ratios(runs: dict[str, list[dict]], side: str, over: str, key: str = "output_tok_s") -> list[float]:
    """`side`'s figure over `over`'s, round by round: each ratio pairs two runs minutes apart, so the machine's
    drift between rounds (here its speed swings by +-15 % over an hour) cancels out of it."""
    return [a["overall"][key] / b["overall"][key] for a, b in zip(runs[side], runs[over])]


def ratio_figures(ratios: list[float]) -> dict:
    """The median of per-round ratios, with a 95 % bootstrap interval once there are rounds enough to resample."""
    return {"round_median": round(statistics.median(ratios), 3),
            "round_ci95": [round(v, 3) for v in median_ci(ratios)] if len(ratios) > 2 else None,
            "per_round": [round(v, 3) for v in ratios]}


def paired_line(figures: dict) -> str:
    """`ratio_figures` as the report's words."""
    ci = f", 95 % CI {figures['round_ci95'][0]}-{figures['round_ci95'][1]}" if figures["round_ci95"] else ""
    return f"round by round: median {figures['round_median']}x{ci}; per round {figures['per_round']}"


def median(runs: list[dict], key: str, pct: str | None = None) -> float:
    values = [r["overall"][key][pct] if pct else r["overall"][key] for r in runs]
    return round(statistics.median(v for v in values if v is not None), 3)  # an even count averages two


def save(t: Target, name: str, runs: dict[str, list[dict]], lines: list[str], figures: dict) -> None:
    flat = [r for side in runs.values() for r in side]
    text = "\n".join([f"## {name}", "", *lines, ""])
    report.write_all(flat, t.out / name, extra_markdown=text, extra_json={"figures": figures})
    t.summary[name] = {"figures": figures, "lines": lines}
    typer.echo("\n".join(lines))


# ------------------------------------------------------------------------------------------ comparisons


def do_mixed(t: Target) -> None:
    typer.echo("== mixed (4 adapters + base) and adapter-only (4 adapters) vs base only, same server")
    adapters = ensure_adapters(t, 4)
    warm(t, [BASE_NAME, *adapters])
    runs = alternate(t, {"base-only": replace(t.work, shape="base"),
                         "mixed-4+base": replace(t.work, shape="uniform", adapters=adapters, include_base=True),
                         "adapters-4": replace(t.work, shape="uniform", adapters=adapters, include_base=False)})
    base, mixed = median(runs["base-only"], "output_tok_s"), median(runs["mixed-4+base"], "output_tok_s")
    adapter_only = median(runs["adapters-4"], "output_tok_s")
    paired = {"mixed": ratio_figures(round_ratios(runs, "mixed-4+base", "base-only")),
              "adapter_only": ratio_figures(round_ratios(runs, "adapters-4", "base-only"))}
    figures = {"base_tok_s": base, "mixed_tok_s": mixed, "ratio": round(mixed / base, 3), "target": 0.97,
               "adapter_only_tok_s": adapter_only, "adapter_only_ratio": round(adapter_only / base, 3),
               "adapter_only_target": 0.95, "paired": paired}
    save(t, "mixed", runs, [f"- base only: {base} tok/s; mixed 4 adapters + base: {mixed} tok/s; 4 adapters, no "
                            f"base: {adapter_only} tok/s (medians over rounds)",
                            f"- **mixed / base = {figures['ratio']}x** (target >= 0.97x); "
                            f"{paired_line(paired['mixed'])}",
                            f"- **adapter-only / base = {figures['adapter_only_ratio']}x** (target >= 0.95x); "
                            f"{paired_line(paired['adapter_only'])}"],
         figures)


def do_gateway(t: Target) -> None:
    typer.echo("== through the gateway vs straight to the engine")
    if not t.engine_url:
        typer.echo("  skipped: the engine URL is unknown (give --engine-url or --server-log)")
        return
    adapters = ensure_adapters(t, 4)  # pinned names (name@version) are the engine's own model names
    warm(t, [BASE_NAME, *adapters])
    mix = replace(t.work, shape="uniform", adapters=adapters, include_base=True)
    runs = alternate(t, {"gateway": mix, "direct": replace(mix, base_url=t.engine_url, api_key=t.engine_key)},
                     cpu_of=t.pid)
    gw, direct = median(runs["gateway"], "output_tok_s"), median(runs["direct"], "output_tok_s")
    # The gateway's own CPU (its process alone, not the engine's) per streamed token: it shares the cores.
    cpu_per_token = [r["gateway_cpu_s"] / r["overall"]["output_tokens"] * 1e3 for r in runs["gateway"]
                     if r.get("gateway_cpu_s") is not None and r["overall"]["output_tokens"]]
    ttft_gw, ttft_direct = (round(median(runs[side], "ttft_ms", "p50"), 2) for side in ("gateway", "direct"))
    # At concurrency 16 a request's TTFT is mostly queueing for its batch's prefill, which swings by
    # tens of ms from run to run. One request at a time isolates what the gateway itself adds.
    probe = replace(mix, concurrency=1, requests=PROBE_REQUESTS, max_tokens=4)
    probes = alternate(t, {"gateway-c1": probe, "direct-c1": replace(probe, base_url=t.engine_url, api_key=t.engine_key)})
    runs.update(probes)
    solo_gw, solo_direct = (round(median(probes[side], "ttft_ms", "p50"), 2) for side in ("gateway-c1", "direct-c1"))
    pairs = asyncio.run(paired_ttft({"gateway": probe,
                                     "direct": replace(probe, base_url=t.engine_url, api_key=t.engine_key)}, t.pairs))
    differences = [row["gateway"] - row["direct"] for row in pairs]
    # The same one-at-a-time extra, sharper, and split: the smallest request (a completion of one token after
    # a few words), whose time to first token (one engine step, ~40 ms) spreads far less than the chat probe's
    # prefill; and a bare pass-through proxy as a third side, what any HTTP hop in front of the engine costs here.
    floor = floor_probe(t, replace(probe, endpoint="completions", prompt_tokens=1, max_tokens=1))
    paired_ratio = ratio_figures(round_ratios(runs, "gateway", "direct"))
    figures = {"gateway_tok_s": gw, "direct_tok_s": direct, "ratio": round(gw / direct, 3),
               "paired_ratio": paired_ratio, "ttft_p50_gateway_ms": ttft_gw, "ttft_p50_direct_ms": ttft_direct,
               "extra_ttft_p50_ms": round(ttft_gw - ttft_direct, 2),
               "ttft_p50_gateway_c1_ms": solo_gw, "ttft_p50_direct_c1_ms": solo_direct,
               "extra_ttft_p50_c1_ms": round(solo_gw - solo_direct, 2),
               "paired_pairs": len(pairs),
               "paired_extra_ttft_p50_ms": ms(statistics.median(differences)) if pairs else None,
               "paired_extra_ttft_ci95_ms": [ms(v) for v in median_ci(differences)] if len(pairs) > 1 else None,
               "paired_extra_ttft_iqr_ms": ([ms(q) for q in statistics.quantiles(differences, n=4)[::2]]
                                            if len(pairs) > 1 else None),
               **floor,
               "gateway_cpu_ms_per_token": round(statistics.median(cpu_per_token), 3) if cpu_per_token else None}
    lines = [f"- gateway {gw} tok/s vs direct {direct} tok/s: **{figures['ratio']}x** (target >= 0.99x); "
             f"{paired_line(paired_ratio)}",
             f"- TTFT p50 at concurrency {t.work.concurrency}: gateway {ttft_gw} ms vs direct "
             f"{ttft_direct} ms: **{figures['extra_ttft_p50_ms']:+} ms** (target <= 5 ms)",
             f"- TTFT p50 one request at a time ({PROBE_REQUESTS} requests a side a round): gateway "
             f"{solo_gw} ms vs direct {solo_direct} ms: **{figures['extra_ttft_p50_c1_ms']:+} ms**",
             f"- the same, paired ({len(pairs)} pairs, the sides taking turns request by request): median extra "
             f"TTFT **{figures['paired_extra_ttft_p50_ms']:+} ms** (95 % CI {figures['paired_extra_ttft_ci95_ms']} ms, "
             f"quartiles {figures['paired_extra_ttft_iqr_ms']} ms; target <= 2 ms)"]
    if floor:
        lines += [f"- the smallest request, one at a time ({floor['floor_rows']} rows of direct, bare proxy and "
                  f"gateway in turn; direct TTFT p50 {floor['floor_direct_ttft_p50_ms']} ms): gateway extra "
                  f"**{floor['floor_gateway_extra_ms']:+} ms** (95 % CI {floor['floor_gateway_extra_ci95_ms']} ms; "
                  f"target <= 2 ms), of which any hop in front of the engine (a bare pass-through proxy) "
                  f"{floor['floor_bare_extra_ms']:+} ms (CI {floor['floor_bare_extra_ci95_ms']}) and quiver's own "
                  f"code {floor['floor_gateway_over_bare_ms']:+} ms (CI {floor['floor_gateway_over_bare_ci95_ms']})"]
    lines.append(f"- gateway CPU per streamed token (its own process, user + system): "
                 f"{figures['gateway_cpu_ms_per_token']} ms")
    save(t, "gateway", runs, lines, figures)


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def median_ci(values: list[float], resamples: int = 2000, seed: int = 1) -> tuple[float, float]:
    """A 95 % bootstrap confidence interval of the median: how far the paired probes' medians can be trusted."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def floor_probe(t: Target, probe: Workload) -> dict:
    """`probe` (one request at a time) in rows of three: straight to the engine, through a bare pass-through
    proxy (`loadtests.bare_proxy`), through the gateway; the order rotates row by row. Gives the median extra
    TTFT of each over the direct request and of the gateway over the proxy, with 95 % bootstrap intervals.
    Empty where the engine's URL or key is unknown (a server given by --base-url without them)."""
    from loadtests.bare_proxy import serving

    if not (t.engine_url and t.engine_key):
        return {}
    with serving(t.engine_url, t.engine_key) as bare_url:
        rows = asyncio.run(paired_ttft({"direct": replace(probe, base_url=t.engine_url, api_key=t.engine_key),
                                        "bare": replace(probe, base_url=bare_url, api_key=None),
                                        "gateway": probe}, t.pairs))
    if len(rows) < 2:
        return {}
    figures: dict = {"floor_rows": len(rows),
                     "floor_direct_ttft_p50_ms": ms(statistics.median(row["direct"] for row in rows))}
    for name, side, base in (("gateway_extra", "gateway", "direct"), ("bare_extra", "bare", "direct"),
                             ("gateway_over_bare", "gateway", "bare")):
        differences = [row[side] - row[base] for row in rows]
        figures[f"floor_{name}_ms"] = ms(statistics.median(differences))
        figures[f"floor_{name}_ci95_ms"] = [ms(v) for v in median_ci(differences)]
    return figures


async def paired_ttft(sides: dict[str, Workload], rows: int) -> list[dict[str, float]]:
    """TTFT of `rows` rows of requests, one request at a time, one request a side a row, the sides taking
    turns: a row has one model and prompt, and the order rotates row by row (who goes first, second...).
    Rounds of 20 requests a side drift apart by tens of ms on a shared machine (the prefill alone is ~150 ms
    here); a row's requests run a few hundred ms apart, so their differences are what one side adds over
    another. Rows with a failed request are dropped."""
    first = next(iter(sides.values()))
    models = pick_models(replace(first, requests=rows))  # the sides' shared shape and models
    rng = random.Random(first.seed + 7)
    prompts = [make_prompt(rng, first.prompt_tokens) for _ in models]
    clients = [(name, work, new_session(work.base_url, {"Authorization": f"Bearer {work.api_key}"}
                                        if work.api_key else {}, work.timeout_s)) for name, work in sides.items()]
    result: list[dict[str, float]] = []
    try:
        t0 = time.perf_counter()
        for i, (model, prompt) in enumerate(zip(models, prompts)):
            k = i % len(clients)
            order = clients[k:] + clients[:k]
            if (i // len(clients)) % 2:  # every side also follows every other one
                order = order[::-1]
            records = {name: await send_one(client, work, model, prompt, t0) for name, work, client in order}
            if all(record.ttft_s is not None for record in records.values()):
                result.append({name: record.ttft_s for name, record in records.items()})
    finally:
        for _, _, client in clients:
            await client.close()
    return result


def do_peft(t: Target) -> None:
    import subprocess
    import sys

    typer.echo("== quiver vs transformers + PEFT (same adapters, fp32, same threads, concurrency 16)")
    adapters = ensure_adapters(t, 4)
    warm(t, [BASE_NAME, *adapters])
    mix = replace(t.work, shape="uniform", adapters=adapters, include_base=True)
    folders = ",".join(str(t.adapters_dir / a.split("@")[0]) for a in adapters)
    command = [sys.executable, "-m", "loadtests.peft_baseline", "--adapters", folders, "--mode", "both",
               "--requests", str(t.work.requests), "--concurrency", str(t.work.concurrency),
               "--prompt-tokens", str(t.work.prompt_tokens), "--max-tokens", str(t.work.max_tokens)]
    runs: dict[str, list[dict]] = {"quiver": []}
    swaps, batches, rss_peaks = [], [], []
    for r in range(t.rounds):  # quiver, then PEFT (each mode in a fresh process), round after round
        if t.pid:
            with PeakRss(t.pid) as rss:
                rss.peak = rss.sample()
                runs["quiver"].append(run(replace(mix, label=f"quiver mixed #{r + 1}", seed=r)))
            rss_peaks.append(rss.peak_gib)
        else:
            runs["quiver"].append(run(replace(mix, label=f"quiver mixed #{r + 1}", seed=r)))
        out = subprocess.run([*command, "--seed", str(r)], check=True, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout
        swap, batched = [json.loads(line) for line in out.strip().splitlines()[-2:]]
        swaps.append(swap)
        batches.append(batched)
        for p in (swap, batched):
            typer.echo(f"  peft {p['mode']:<5} #{r + 1}{'':<12} {p['output_tok_s']:>7} tok/s  peak RSS "
                       f"{p['peak_rss_gib']} GiB  load {p['loadavg_1_5_15']}")
    quiver_rss = max(rss_peaks) if rss_peaks else None
    swap = {"output_tok_s": statistics.median(p["output_tok_s"] for p in swaps),
            "peak_rss_gib": max(p["peak_rss_gib"] for p in swaps)}
    batched = {"output_tok_s": statistics.median(p["output_tok_s"] for p in batches),
               "peak_rss_gib": max(p["peak_rss_gib"] for p in batches)}
    q = median(runs["quiver"], "output_tok_s")
    kv = None
    if t.engine_url:  # what the KV cache buys: how many tokens (and so concurrent sequences) it holds
        text = httpx.get(f"{t.engine_url}/metrics", timeout=10,
                         headers={"Authorization": f"Bearer {t.engine_key}"} if t.engine_key else {}).text
        kv = next((line for line in text.splitlines() if line.startswith("vllm:cache_config_info")), None)
    figures = {"quiver_tok_s": q, "peft_swap_tok_s": swap["output_tok_s"], "peft_mixed_tok_s": batched["output_tok_s"],
               "vs_swap": round(q / swap["output_tok_s"], 2), "vs_mixed": round(q / batched["output_tok_s"], 2),
               "quiver_peak_rss_gib": quiver_rss, "peft_swap_peak_rss_gib": swap["peak_rss_gib"],
               "peft_mixed_peak_rss_gib": batched["peak_rss_gib"], "peft": swaps + batches, "kv_cache_info": kv}
    save(t, "peft", runs, [
        f"- medians over {t.rounds} alternating rounds; quiver (4 adapters + base, concurrency "
        f"{t.work.concurrency}): {q} tok/s, peak RSS {quiver_rss} GiB "
        "(gateway + engine processes)",
        f"- PEFT (a) set_adapter per request: {swap['output_tok_s']} tok/s, peak RSS {swap['peak_rss_gib']} GiB "
        f"-> **quiver {figures['vs_swap']}x** (target >= 10x)",
        f"- PEFT (b) mixed batch generate(adapter_names=...): {batched['output_tok_s']} tok/s, peak RSS "
        f"{batched['peak_rss_gib']} GiB -> **quiver {figures['vs_mixed']}x** (target >= 2x)"], figures)


def first_token_s(t: Target, model: str) -> float:
    """Seconds from now until `model` has produced its first token: a 1-token request's full round trip
    (its text may be empty, e.g. half a UTF-8 character, so its stream can't be timed by content)."""
    work = replace(t.work, shape="distinct", adapters=[model], requests=1, concurrency=1, max_tokens=1)
    record = asyncio.run(_one(work))
    if record.status != 200 or record.error:
        raise RuntimeError(f"{model}: {record.status} {record.error}")
    return record.e2e_s


async def _one(work: Workload):
    async with new_session(work.base_url, {"Authorization": f"Bearer {work.api_key}"}, 120) as client:
        return await send_one(client, work, work.adapters[0], "Say hi.", time.perf_counter())


def do_hot(t: Target, count: int = 5) -> None:
    typer.echo("== hot registration: POST /v1/adapters returned -> first token from the new adapter")
    stamp = time.strftime("%H%M%S")
    folders = make_adapters(t.model_dir, t.adapters_dir, count, prefix="hot-", seed=900)
    times, posts, warm_times = [], [], []
    for folder in folders:
        name = f"{folder.name}-{stamp}"  # a name this server has never seen
        started = time.perf_counter()
        register(t.base_url, name, folder, t.admin_key)
        posts.append(time.perf_counter() - started)
        times.append(first_token_s(t, name))
        warm_times.append(first_token_s(t, name))  # the same request once loaded: the machine's share
        typer.echo(f"  {name}: POST {posts[-1] * 1000:.0f} ms, then first token after {times[-1] * 1000:.0f} ms "
                   f"(again, loaded: {warm_times[-1] * 1000:.0f} ms)")
    figures = {"first_token_s": [round(x, 3) for x in times], "median_s": round(statistics.median(times), 3),
               "max_s": round(max(times), 3), "post_s": [round(x, 3) for x in posts], "target_s": 2.0,
               "loaded_first_token_s": [round(x, 3) for x in warm_times],
               "machine": report.machine_state()}
    lines = [f"- first token from a just-registered adapter: median **{figures['median_s']} s**, max "
             f"{figures['max_s']} s over {count} registrations (target <= 2 s); the POST itself took "
             f"{statistics.median(posts):.2f} s (median); the same request once the adapter was loaded: "
             f"{statistics.median(warm_times):.2f} s (median); load average {figures['machine']['loadavg_1_5_15']}"]
    (t.out / "hot.json").write_text(json.dumps(figures, indent=1))
    (t.out / "hot.md").write_text("## hot registration\n\n" + "\n".join(lines) + "\n")
    t.summary["hot"] = {"figures": figures, "lines": lines}
    typer.echo("\n".join(lines))


def do_scale(t: Target, count: int = 100) -> None:
    typer.echo(f"== scale: Zipf over {count} registered adapters vs uniform over 4")
    adapters = ensure_adapters(t, count)
    warm(t, adapters[:4])  # only the uniform side's; Zipf's cold adapters load (and evict) as traffic asks
    runs = alternate(t, {"uniform-4": replace(t.work, shape="uniform", adapters=adapters[:4]),
                         f"zipf-{count}": replace(t.work, shape="zipf", adapters=adapters)})
    uni, zipf = runs["uniform-4"], runs[f"zipf-{count}"]
    distinct = [len(r["per_model"]) for r in zipf]
    figures = {"uniform_tok_s": median(uni, "output_tok_s"), "zipf_tok_s": median(zipf, "output_tok_s"),
               "uniform_ttft_p99_ms": median(uni, "ttft_ms", "p99"), "zipf_ttft_p99_ms": median(zipf, "ttft_ms", "p99"),
               "zipf_errors": sum(r["overall"]["errors"] for r in zipf), "zipf_distinct_adapters_per_run": distinct}
    figures["tok_s_ratio"] = round(figures["zipf_tok_s"] / figures["uniform_tok_s"], 3)
    figures["ttft_p99_ratio"] = round(figures["zipf_ttft_p99_ms"] / figures["uniform_ttft_p99_ms"], 2)
    save(t, "scale", runs, [
        f"- Zipf (s={t.work.zipf_s}) over {count} adapters ({distinct} distinct per run) vs uniform over 4: "
        f"errors **{figures['zipf_errors']}**, throughput **{figures['tok_s_ratio']}x** "
        f"({figures['zipf_tok_s']} vs {figures['uniform_tok_s']} tok/s), TTFT p99 **{figures['ttft_p99_ratio']}x** "
        f"({figures['zipf_ttft_p99_ms']} vs {figures['uniform_ttft_p99_ms']} ms)"], figures)


def write_summary_md(out: Path) -> None:
    """summary.md from summary.json: every comparison's ratios, with when, how busy and with what settings."""
    summary = json.loads((out / "summary.json").read_text())
    started, finished = summary.get("started", {}), summary.get("finished", {})
    lines = [f"# quiver load-test comparisons, {started.get('time_utc', '?')}", "",
             f"Machine: {started.get('cpus')} CPUs; load average (1/5/15 min) {started.get('loadavg_1_5_15')} at "
             f"the start, {finished.get('loadavg_1_5_15')} at the end (each run's own is in its table below).",
             f"Settings: {json.dumps(summary.get('settings', {}))}", ""]
    for name in COMPARISONS:
        if name in summary:
            lines += [f"## {name}", "", *summary[name]["lines"], "", f"Details: [{name}.md]({name}.md)", ""]
    (out / "summary.md").write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------ CLI

COMPARISONS = {"mixed": do_mixed, "gateway": do_gateway, "peft": do_peft, "hot": do_hot, "scale": do_scale}


@app.command()
def main(
    which: Annotated[str, typer.Argument(help="mixed | gateway | peft | hot | scale | all (comma-separated ok)")],
    out: Annotated[Path, typer.Option(help="results folder")] = Path("loadtests/results/latest"),
    base_url: Annotated[Optional[str], typer.Option(help="an already running quiver; else one is started")] = None,
    api_key: Annotated[str, typer.Option()] = API_KEY,
    admin_key: Annotated[str, typer.Option()] = ADMIN_KEY,
    engine_url: Annotated[Optional[str], typer.Option(help="with --base-url: its engine, for `gateway`")] = None,
    engine_key: Annotated[Optional[str], typer.Option(
        envvar="QUIVER_LOAD_ENGINE_KEY", help="with --engine-url: the sealed engine's key (its VLLM_API_KEY)")] = None,
    server_log: Annotated[Optional[Path], typer.Option(help="with --base-url: its log, to find the engine")] = None,
    port: Annotated[int, typer.Option(help="port for a started server")] = 18390,
    max_loras: Annotated[int, typer.Option(help="engine LoRA slots of a started server")] = 4,
    lora_target_modules: Annotated[str, typer.Option(
        help="a started server's QUIVER_LORA_TARGET_MODULES (e.g. q_proj,k_proj,v_proj,o_proj: the layers the "
             "generated adapters train); empty: every layer wrapped")] = "",
    rounds: Annotated[int, typer.Option(help="A/B rounds per comparison")] = 2,
    pairs: Annotated[int, typer.Option(help="`gateway`: its paired one-at-a-time probe's pairs (the median of "
                                            "their differences varies by about +-1 ms at 200)")] = PAIRS,
    requests: Annotated[int, typer.Option()] = 32,
    concurrency: Annotated[int, typer.Option()] = 16,
    max_tokens: Annotated[int, typer.Option()] = 64,
    prompt_tokens: Annotated[int, typer.Option()] = 32,
    scale_adapters: Annotated[int, typer.Option(help="adapters registered for `scale`")] = 100,
    scratch: Annotated[Path, typer.Option(help="generated adapters and a started server's store/logs (big: "
                                                "keep it out of the repo)")] = Path("/tmp/quiver-loadtests"),
) -> None:
    """Run comparisons and print their ratios; tables, JSON and plots go to --out."""
    names = list(COMPARISONS) if which == "all" else [w.strip() for w in which.split(",")]
    unknown = set(names) - set(COMPARISONS)
    if unknown:
        raise typer.BadParameter(f"unknown comparisons {sorted(unknown)}")
    with target(base_url, port, out, rounds, requests, concurrency, max_tokens, prompt_tokens, max_loras, api_key,
                admin_key, engine_url, engine_key, server_log, scratch, lora_target_modules) as t:
        t.pairs = pairs
        for name in names:
            COMPARISONS[name](t, scale_adapters) if name == "scale" else COMPARISONS[name](t)
        t.summary["finished"] = report.machine_state()
        t.summary["settings"] = {"rounds": rounds, "pairs": pairs, "requests": requests, "concurrency": concurrency,
                                 "max_tokens": max_tokens, "prompt_tokens": prompt_tokens, "max_loras": max_loras,
                                 "lora_target_modules": lora_target_modules or "all",
                                 "server": "started by compare" if not base_url else base_url}
        path = t.out / "summary.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**previous, **t.summary}, indent=1))
        write_summary_md(t.out)
        typer.echo("\n# summary\n" + "\n".join(line for name in names if name in t.summary
                                               for line in t.summary[name]["lines"]))


if __name__ == "__main__":
    app()
