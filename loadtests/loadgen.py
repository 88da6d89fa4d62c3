"""Async load generator for any OpenAI-compatible server (quiver's gateway, or the raw vLLM engine behind it).

Streams every request (so TTFT and inter-token latency are measured from the wire), bounded by a request
count and a wall-clock limit, loopback only. Traffic shapes pick each request's `model`:

  base      every request on the base model
  uniform   uniformly over the given adapters (plus the base if --include-base)
  zipf      Zipf-distributed over the adapters (rank 1 the most popular), for "many adapters, few hot"
  distinct  request i uses adapter i (cycling if there are fewer adapters than requests)

Arrivals: fixed concurrency (a closed loop of N workers) or a Poisson process at --rate requests/s.

    python -m loadtests.loadgen run --base-url http://127.0.0.1:8000 --api-key KEY --shape uniform \
        --adapters a,b,c,d --include-base --requests 64 --concurrency 16 --max-tokens 64 --out results/mixed
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import urlparse

import aiohttp
import typer

from loadtests import report

SHAPES = ("base", "uniform", "zipf", "distinct")
# Plain one-token-ish English words: prompts of about N tokens without needing the model's tokenizer.
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community "
         "name president team minute idea kid body information back parent face others level office door health "
         "person art war history party result change morning reason research girl guy moment air teacher force").split()


@dataclass
class Workload:
    base_url: str
    model: str  # the base model's served name
    api_key: str | None = None
    shape: str = "base"
    adapters: list[str] = field(default_factory=list)
    include_base: bool = False
    zipf_s: float = 1.1
    requests: int = 32
    duration_s: float = 300.0  # no new request after this; requests still running are cancelled at 2x
    concurrency: int | None = 16
    rate: float | None = None  # Poisson arrivals per second (then concurrency caps requests in flight, if set)
    prompt_tokens: int = 32
    max_tokens: int = 64
    ignore_eos: bool = True
    endpoint: str = "chat"  # or "completions"
    seed: int = 0
    timeout_s: float = 600.0
    label: str = "run"

    def validate(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, not {self.shape!r}")
        if self.shape != "base" and not self.adapters:
            raise ValueError(f"shape {self.shape!r} needs adapters")
        if self.concurrency is None and self.rate is None:
            raise ValueError("give a concurrency, a rate, or both")
        if self.requests < 1 or self.duration_s <= 0:
            raise ValueError("requests and duration must be positive")
        require_loopback(self.base_url)


@dataclass
class RequestRecord:
    model: str
    status: int  # HTTP status; 0 = connection error, 599 = cut off by the time limit or a broken stream
    error: str | None
    start_s: float  # since the run's start
    ttft_s: float | None
    e2e_s: float | None
    output_tokens: int
    prompt_tokens: int
    itl_s: list[float]  # gaps between content-bearing chunks


def require_loopback(base_url: str) -> None:
    """Refuse to load anything but this machine: the harness is for benchmarking, not for hammering others."""
    host = urlparse(base_url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}") from exc
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"{base_url} is not a loopback address; run the harness on the server's host "
                         "(or through an SSH tunnel to a local port)")


# ------------------------------------------------------------------------------------------ traffic


def pick_models(work: Workload) -> list[str]:
    """The `model` of every request, decided up front so that a run is reproducible from its seed."""
    rng = random.Random(work.seed)
    pool = ([work.model] if work.include_base else []) + list(work.adapters)
    n = work.requests
    if work.shape == "base":
        return [work.model] * n
    if work.shape == "uniform":
        return [rng.choice(pool) for _ in range(n)]
    if work.shape == "distinct":
        return [pool[i % len(pool)] for i in range(n)]
    # zipf: weight 1/rank^s over the adapters in the order given (the base, if included, is rank 1)
    weights = [1.0 / (rank ** work.zipf_s) for rank in range(1, len(pool) + 1)]
    return rng.choices(pool, weights=weights, k=n)


def make_prompt(rng: random.Random, tokens: int) -> str:
    # Random words, so that requests don't share a prefix beyond the chat template (no prefix-cache shortcut).
    return "Repeat and continue: " + " ".join(rng.choice(WORDS) for _ in range(max(tokens - 4, 1)))


def request_body(work: Workload, model: str, prompt: str) -> tuple[str, dict]:
    body: dict = {"model": model, "max_tokens": work.max_tokens, "temperature": 0.0, "stream": True,
                  "stream_options": {"include_usage": True}}
    if work.ignore_eos:
        body["ignore_eos"] = True  # a vLLM extension: exactly max_tokens tokens, for fair comparisons
    if work.endpoint == "chat":
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


def new_session(base_url: str, headers: dict[str, str], timeout_s: float, limit: int = 64) -> aiohttp.ClientSession:
    """The load generator's HTTP client. aiohttp, not httpx: it spent 2.5x less CPU per streamed chunk here,
    and the client shares the machine with the server it measures."""
    return aiohttp.ClientSession(base_url=base_url, headers=headers, connector=aiohttp.TCPConnector(limit=limit),
                                 timeout=aiohttp.ClientTimeout(sock_connect=10.0, sock_read=timeout_s))


def _chunk_has_text(chunk: dict) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or choice.get("text"):
            return True
    return False


async def send_one(client: aiohttp.ClientSession, work: Workload, model: str, prompt: str, t0: float) -> RequestRecord:
    path, body = request_body(work, model, prompt)
    start = time.perf_counter()
    record = RequestRecord(model=model, status=0, error=None, start_s=start - t0, ttft_s=None, e2e_s=None,
                           output_tokens=0, prompt_tokens=0, itl_s=[])
    last = None
    chunks = 0
    try:
        async with client.post(path, json=body) as response:
            record.status = response.status
            if response.status != 200:
                record.error = (await response.read()).decode(errors="replace")[:300]
                return record
            async for line in response.content:  # one SSE line at a time
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.status, record.error = 599, json.dumps(chunk["error"])[:300]
                    return record
                now = time.perf_counter()
                if _chunk_has_text(chunk):
                    chunks += 1
                    if last is None:
                        record.ttft_s = now - start
                    else:
                        record.itl_s.append(now - last)
                    last = now
                if usage := chunk.get("usage"):
                    record.output_tokens = usage.get("completion_tokens") or 0
                    record.prompt_tokens = usage.get("prompt_tokens") or 0
        record.e2e_s = time.perf_counter() - start
        if not record.output_tokens:
            record.output_tokens = chunks  # a server that ignores include_usage: one token per chunk
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:300]
        record.status = 599 if record.status == 200 else record.status
    except asyncio.CancelledError:
        record.status, record.error = 599, "cut off by the run's time limit"
    return record


async def run_workload(work: Workload, client: aiohttp.ClientSession | None = None) -> dict:
    """Run one workload and return its report (see report.summarize)."""
    work.validate()
    models = pick_models(work)
    rng = random.Random(work.seed + 1)
    prompts = [make_prompt(rng, work.prompt_tokens) for _ in models]
    headers = {"Authorization": f"Bearer {work.api_key}"} if work.api_key else {}
    limit = max(work.concurrency or 0, 64)
    own_client = client is None
    client = client or new_session(work.base_url, headers, work.timeout_s, limit)
    records: list[RequestRecord] = []
    env_before = report.machine_state()
    t0 = time.perf_counter()
    deadline = t0 + work.duration_s

    async def one(i: int) -> None:
        records.append(await send_one(client, work, models[i], prompts[i], t0))

    try:
        if work.rate is None:
            # Closed loop: N workers, each sending its next request when the last one finishes.
            next_index = iter(range(len(models)))

            async def worker() -> None:
                for i in next_index:
                    if time.perf_counter() >= deadline:
                        return
                    await one(i)

            tasks = [asyncio.create_task(worker()) for _ in range(work.concurrency or 1)]
        else:
            # Open loop: Poisson arrivals, whatever the server's speed (optionally capped in flight).
            gate = asyncio.Semaphore(work.concurrency) if work.concurrency else None
            arrivals = random.Random(work.seed + 2)
            tasks = []

            async def gated(i: int) -> None:
                if gate is None:
                    return await one(i)
                async with gate:
                    await one(i)

            for i in range(len(models)):
                if time.perf_counter() >= deadline:
                    break
                tasks.append(asyncio.create_task(gated(i)))
                await asyncio.sleep(arrivals.expovariate(work.rate))
        done, pending = await asyncio.wait(tasks, timeout=max(deadline + work.duration_s - time.perf_counter(), 1))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        if own_client:
            await client.close()
    wall = time.perf_counter() - t0
    return report.summarize(work, records, wall, env_before)


# ------------------------------------------------------------------------------------------ CLI

app = typer.Typer(help="quiver's load generator (OpenAI-compatible streaming traffic, loopback only).",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def _main() -> None:
    """Keeps `run` a subcommand (typer would otherwise fold a lone command into the program)."""


def split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


@app.command()
def run(
    base_url: Annotated[str, typer.Option(help="the server, e.g. http://127.0.0.1:8000 (loopback only)")],
    model: Annotated[str, typer.Option(help="the base model's served name")] = "SmolLM2-135M-Instruct",
    api_key: Annotated[Optional[str], typer.Option(envvar="QUIVER_LOAD_API_KEY")] = None,
    shape: Annotated[str, typer.Option(help="base | uniform | zipf | distinct")] = "base",
    adapters: Annotated[Optional[str], typer.Option(help="comma-separated adapter models (name or name@version)")] = None,
    adapter_prefix: Annotated[Optional[str], typer.Option(help="or: adapters PREFIX0..PREFIX{N-1}")] = None,
    num_adapters: Annotated[int, typer.Option(help="with --adapter-prefix")] = 0,
    include_base: Annotated[bool, typer.Option(help="the base model is one more choice in the mix")] = False,
    zipf_s: Annotated[float, typer.Option(help="Zipf exponent")] = 1.1,
    requests: Annotated[int, typer.Option(help="at most this many requests")] = 32,
    duration: Annotated[float, typer.Option(help="no new requests after this many seconds")] = 300.0,
    concurrency: Annotated[Optional[int], typer.Option(help="closed loop of N workers (or the cap with --rate)")] = None,
    rate: Annotated[Optional[float], typer.Option(help="Poisson arrivals, requests per second")] = None,
    prompt_tokens: Annotated[int, typer.Option(help="approximate prompt length")] = 32,
    max_tokens: Annotated[int, typer.Option(help="tokens to generate per request")] = 64,
    ignore_eos: Annotated[bool, typer.Option(help="generate exactly max_tokens (vLLM's ignore_eos)")] = True,
    endpoint: Annotated[str, typer.Option(help="chat | completions")] = "chat",
    seed: Annotated[int, typer.Option()] = 0,
    label: Annotated[str, typer.Option(help="name of this run in the report")] = "run",
    out: Annotated[Optional[Path], typer.Option(help="write OUT.json, OUT.md and OUT-*.png")] = None,
) -> None:
    """Run one workload and print its table."""
    names = split_list(adapters) + [f"{adapter_prefix}{i}" for i in range(num_adapters if adapter_prefix else 0)]
    if concurrency is None and rate is None:
        concurrency = 16
    work = Workload(base_url=base_url, model=model, api_key=api_key, shape=shape, adapters=names,
                    include_base=include_base, zipf_s=zipf_s, requests=requests, duration_s=duration,
                    concurrency=concurrency, rate=rate, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                    ignore_eos=ignore_eos, endpoint=endpoint, seed=seed, label=label)
    try:
        work.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = asyncio.run(run_workload(work))
    typer.echo(report.markdown([result]))
    if out:
        report.write_all([result], out)
        typer.echo(f"wrote {out}.json, {out}.md and plots")


if __name__ == "__main__":
    app()
