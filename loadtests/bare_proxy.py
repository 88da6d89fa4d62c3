"""The floor under any gateway on this machine: a pass-through with nothing of a gateway in it.

`compare gateway` puts it between the client and the engine next to quiver's gateway, so the gateway's extra
time to first token splits into what any HTTP hop in front of the engine costs here (a second loopback
connection, one more uvicorn and aiohttp relay on cores the engine keeps busy) and what quiver's own code adds
(auth, limits, validation, routing, accounting). The same server stack as the gateway (uvicorn with uvloop and
httptools, one aiohttp session to the engine), and none of its work: no auth, no validation, no middleware; the
body and every chunk pass through as bytes. A measuring instrument for loopback use, never a server.

    BARE_PROXY_ENGINE_KEY=<engine key> python -m loadtests.bare_proxy --port 8100 --engine-url http://127.0.0.1:8001
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Annotated, Iterator

import aiohttp
import httpx
import typer

KEY_ENV = "BARE_PROXY_ENGINE_KEY"  # the engine's key, from the environment: argv is readable by every user


def make_app(engine_url: str, engine_key: str | None):
    """A raw ASGI app relaying every request to `engine_url` (the engine's key added) and its answer back."""
    session: aiohttp.ClientSession | None = None
    headers = {"Authorization": f"Bearer {engine_key}"} if engine_key else {}

    async def app(scope, receive, send) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    session = aiohttp.ClientSession(engine_url, headers=headers, auto_decompress=False)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if session is not None:
                        await session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        content_type = dict(scope["headers"]).get(b"content-type", b"application/json").decode()
        async with session.request(scope["method"], scope["path"], data=body,
                                   headers={"Content-Type": content_type}) as upstream:
            await send({"type": "http.response.start", "status": upstream.status,
                        "headers": [(b"content-type", upstream.headers.get("Content-Type", "").encode())]})
            async for chunk in upstream.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


@contextmanager
def serving(engine_url: str, engine_key: str | None, timeout_s: float = 60) -> Iterator[str]:
    """The proxy in a child process on a free loopback port (the engine's key in its environment only); yields
    its URL once it relays the engine's model list, and stops it on the way out."""
    from quiver.testing import free_port

    port = free_port()
    env = {**os.environ, **({KEY_ENV: engine_key} if engine_key else {})}
    proxy = subprocess.Popen([sys.executable, "-m", "loadtests.bare_proxy", "--port", str(port),
                              "--engine-url", engine_url], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proxy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the bare proxy did not start")
            time.sleep(0.2)
        yield url
    finally:
        proxy.terminate()
        proxy.wait(30)


def main(port: Annotated[int, typer.Option()],
         engine_url: Annotated[str, typer.Option(help="the engine's base URL")]) -> None:
    import uvicorn

    # The gateway's own uvicorn settings (quiver.app.uvicorn_config) minus its logging: the same loop and parser.
    uvicorn.run(make_app(engine_url, os.environ.get(KEY_ENV)), host="127.0.0.1", port=port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    typer.run(main)
