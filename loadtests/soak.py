"""Soak: mixed traffic over several adapters for a long while, with registry churn and one engine kill.

`python -m loadtests.soak --minutes 30 --out loadtests/results/DATE-soak` starts its own quiver server, registers a
few adapters, and then, for the whole run:
- `--concurrency` clients send chat completions (streamed and not, in turn) to the base model, adapters by name and
  pinned versions, like well-behaved OpenAI clients: a 503 with `Retry-After` is retried after that pause;
- a churn loop registers new versions, promotes old ones, deletes versions and whole adapters (and registers them
  again) every `--churn-every-s` seconds;
- at `--kill-at-min` the engine's process group gets SIGKILL once; the gateway must restart it by itself.
Every request ends in one bucket: ok; `deleted` (a 404 for a version the churn loop deleted while the request was
being chosen or queued: the API's documented answer); `in_flight_at_kill` (it was running on the engine when it was
killed); or `lost` (anything else: a 5xx, a broken stream, a timeout). The target is `lost == 0`. RSS of the gateway
and of the whole tree is sampled every minute; after warm-up it should stay flat.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import typer

from loadtests.servers import ADMIN_KEY, API_KEY, make_adapters, quiver_server
from quiver.testing import QuiverServer
from quiver.settings import Settings

MODEL_NAME = "SmolLM2-135M-Instruct"
PROMPTS = ["Tell me about the sea.", "What is two plus two?", "Name three colours.", "Write a haiku about rain."]


@dataclass
class Tally:
    ok: int = 0
    deleted: int = 0
    in_flight_at_kill: int = 0
    lost: int = 0
    retried_503: int = 0
    lost_examples: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)


@dataclass
class Soak:
    server: QuiverServer
    adapter_dirs: list[Path]
    rng: random.Random
    tally: Tally = field(default_factory=Tally)
    versions: dict[str, list[int]] = field(default_factory=dict)  # what the churn loop believes is registered
    kill_time: float | None = None
    engine_back_time: float | None = None
    rss_samples: list[dict] = field(default_factory=list)
    churn_log: list[str] = field(default_factory=list)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    # --- churn ---------------------------------------------------------------------------------------

    async def register(self, client: httpx.AsyncClient, name: str, make_current: bool = True) -> int:
        folder = self.rng.choice(self.adapter_dirs)
        files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]
        response = await client.post("/v1/adapters", data={"name": name, "make_current": str(make_current).lower()},
                                     files=files, headers=self.admin, timeout=120)
        response.raise_for_status()
        version = response.json()["version"]
        self.versions.setdefault(name, []).append(version)
        return version

    async def churn_once(self, client: httpx.AsyncClient) -> str:
        name = self.rng.choice(sorted(self.versions))
        action = self.rng.choice(["register", "register_staged", "promote", "delete_version", "delete_adapter"])
        if action == "register":
            return f"register {name}@{await self.register(client, name)}"
        if action == "register_staged":
            return f"register staged {name}@{await self.register(client, name, make_current=False)}"
        versions = self.versions[name]
        if action == "promote" and versions:
            version = self.rng.choice(versions)
            response = await client.post(f"/v1/adapters/{name}/promote", json={"version": version},
                                         headers=self.admin, timeout=60)
            return f"promote {name}@{version}: {response.status_code}"
        if action == "delete_version" and len(versions) > 1:
            version = versions.pop(0)
            response = await client.delete(f"/v1/adapters/{name}@{version}", headers=self.admin, timeout=60)
            return f"delete {name}@{version}: {response.status_code}"
        if action == "delete_adapter" and len(self.versions) > 2:
            del self.versions[name]
            response = await client.delete(f"/v1/adapters/{name}", headers=self.admin, timeout=60)
            # ... and it comes back shortly under the same name, as a new version 1.. line
            await asyncio.sleep(1)
            version = await self.register(client, name)
            return f"delete {name}: {response.status_code}, registered again as @{version}"
        return f"register {name}@{await self.register(client, name)}"

    async def churn(self, client: httpx.AsyncClient, every_s: float, until: float) -> None:
        while time.monotonic() < until:
            await asyncio.sleep(every_s)
            try:
                self.churn_log.append(f"{time.monotonic():.0f} {await self.churn_once(client)}")
            except httpx.HTTPError as error:
                # The registry refuses while the engine restarts only if a load is needed; record, go on.
                self.churn_log.append(f"{time.monotonic():.0f} churn error: {error!r}")

    # --- traffic -------------------------------------------------------------------------------------

    def pick_model(self) -> str:
        choices = [MODEL_NAME]
        for name, versions in self.versions.items():
            choices.append(name)
            choices.extend(f"{name}@{v}" for v in versions)
        return self.rng.choice(choices)

    async def one_request(self, client: httpx.AsyncClient, stream: bool) -> None:
        model = self.pick_model()
        body = {"model": model, "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}],
                "max_tokens": 32, "temperature": 0, "stream": stream}
        while True:
            started = time.monotonic()
            try:
                status, text, complete = await self._send(client, body, stream)
            except httpx.HTTPError as error:
                status, text, complete = 0, repr(error), False
            ended = time.monotonic()
            if status == 200 and complete:
                self.tally.ok += 1
                self.tally.latencies_s.append(ended - started)
                return
            if self.kill_time is not None and started <= self.kill_time <= ended:
                self.tally.in_flight_at_kill += 1
                return
            if status == 503 and '"engine_unavailable"' in text:
                self.tally.retried_503 += 1
                await asyncio.sleep(2)
                continue
            if status == 404 and '"model_not_found"' in text:
                self.tally.deleted += 1
                return
            self.tally.lost += 1
            if len(self.tally.lost_examples) < 20:
                self.tally.lost_examples.append(f"{model} stream={stream}: {status} {text[:300]}")
            return

    @staticmethod
    async def _send(client: httpx.AsyncClient, body: dict, stream: bool) -> tuple[int, str, bool]:
        if not stream:
            response = await client.post("/v1/chat/completions", json=body, timeout=300)
            return response.status_code, response.text, response.status_code == 200 and bool(response.json()["choices"])
        async with client.stream("POST", "/v1/chat/completions", json=body, timeout=300) as response:
            if response.status_code != 200:
                return response.status_code, (await response.aread()).decode(errors="replace"), False
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            return 200, "\n".join(lines[-3:]), bool(lines) and lines[-1] == "data: [DONE]"

    async def client_loop(self, client: httpx.AsyncClient, until: float) -> None:
        stream = self.rng.random() < 0.5
        while time.monotonic() < until:
            await self.one_request(client, stream)
            stream = not stream

    # --- faults and memory ---------------------------------------------------------------------------

    def engine_pid(self) -> int:
        gateway = psutil.Process(self.server.process.pid)
        for child in gateway.children(recursive=True):
            if any("vllm" in part for part in child.cmdline()):
                return child.pid
        raise RuntimeError("no engine process under the gateway")

    async def kill_engine_at(self, when: float, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(max(0.0, when - time.monotonic()))
        pid = self.engine_pid()
        self.kill_time = time.monotonic()
        os.killpg(os.getpgid(pid), signal.SIGKILL)
        while True:
            await asyncio.sleep(1)
            try:
                if (await client.get("/ready", timeout=5)).status_code == 200:
                    self.engine_back_time = time.monotonic()
                    return
            except httpx.HTTPError:
                pass

    async def sample_rss(self, every_s: float, until: float, t0: float) -> None:
        while True:
            gateway = psutil.Process(self.server.process.pid)
            tree = sum(_rss(p) for p in [gateway, *gateway.children(recursive=True)])
            self.rss_samples.append({"minute": round((time.monotonic() - t0) / 60, 1),
                                     "gateway_mib": round(_rss(gateway) / 2**20, 1),
                                     "tree_gib": round(tree / 2**30, 2)})
            if time.monotonic() >= until:
                return
            await asyncio.sleep(min(every_s, max(0.0, until - time.monotonic())))


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0


async def _run(soak: Soak, minutes: float, concurrency: int, churn_every_s: float, kill_at_min: float,
               initial_adapters: int) -> None:
    async with httpx.AsyncClient(base_url=soak.server.base_url,
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        for i in range(initial_adapters):
            await soak.register(client, f"soak-{i}")
        t0 = time.monotonic()
        until = t0 + minutes * 60
        tasks = [asyncio.create_task(soak.client_loop(client, until)) for _ in range(concurrency)]
        tasks.append(asyncio.create_task(soak.churn(client, churn_every_s, until)))
        tasks.append(asyncio.create_task(soak.sample_rss(60, until, t0)))
        if kill_at_min >= 0:
            tasks.append(asyncio.create_task(soak.kill_engine_at(t0 + kill_at_min * 60, client)))
        await asyncio.gather(*tasks)


def main(
    minutes: float = typer.Option(30.0, help="how long the traffic runs"),
    concurrency: int = typer.Option(8, help="clients sending at once"),
    churn_every_s: float = typer.Option(20.0, help="pause between registry changes"),
    kill_at_min: float = typer.Option(10.0, help="when to SIGKILL the engine once (negative: never)"),
    initial_adapters: int = typer.Option(4),
    port: int = typer.Option(8650),
    work_dir: Path = typer.Option(Path("/tmp/quiver-soak")),
    out: Path = typer.Option(None, help="folder for soak.json; printed only if unset"),
    seed: int = typer.Option(7),
) -> None:
    model_dir = Settings().model_dir  # the default model, as `quiver serve` prepared it
    adapter_dirs = make_adapters(model_dir, work_dir / "adapters", 3, prefix="soak-src-")
    server = quiver_server(work_dir / "server", port, env={"QUIVER_MAX_LORAS": "4"}, model_dir=model_dir)
    server.start()
    try:
        soak = Soak(server=server, adapter_dirs=adapter_dirs, rng=random.Random(seed))
        asyncio.run(_run(soak, minutes, concurrency, churn_every_s, kill_at_min, initial_adapters))
    finally:
        server.stop()
    tally = soak.tally
    warm = [s["tree_gib"] for s in soak.rss_samples if s["minute"] >= 3]
    summary = {
        "minutes": minutes, "concurrency": concurrency, "churn_every_s": churn_every_s, "kill_at_min": kill_at_min,
        "requests": tally.ok + tally.deleted + tally.in_flight_at_kill + tally.lost,
        "ok": tally.ok, "deleted_404": tally.deleted, "in_flight_at_kill": tally.in_flight_at_kill,
        "lost": tally.lost, "retried_503": tally.retried_503, "lost_examples": tally.lost_examples,
        "engine_back_after_s": (round(soak.engine_back_time - soak.kill_time, 1)
                                if soak.kill_time and soak.engine_back_time else None),
        "latency_p50_s": round(statistics.median(tally.latencies_s), 3) if tally.latencies_s else None,
        "rss_after_warmup_gib": {"min": min(warm), "max": max(warm)} if warm else None,
        "rss_samples": soak.rss_samples,
        "churn_actions": len(soak.churn_log),
        "churn_log": soak.churn_log,
    }
    text = json.dumps(summary, indent=1)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(text + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("churn_log", "rss_samples")}, indent=1))
    print("rss:", soak.rss_samples)


if __name__ == "__main__":
    typer.run(main)
