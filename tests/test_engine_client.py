"""The HTTP engine client's timeouts and typed errors, on stand-in sockets (no engine): a refused connection
is `EngineUnavailable`, an engine that accepts and then says nothing is `EngineTimeout` (before the answer,
and between two chunks of a stream), never a wait without end. vLLM's own answers: test_engine_seal.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from quiver.engine_client import (
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    HttpEngineClient,
    Timeouts,
    parse_engine_error,
)
from quiver.testing import free_port

FAST = Timeouts(connect_s=1.0, read_s=0.5, health_s=0.5, control_s=0.5)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def stand_in(reply: bytes | None, then_silent: bool = True):
    """A server that reads a request, writes `reply` (if any), then stays silent with the connection open."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if reply:
            writer.write(reply)
            await writer.drain()
        await asyncio.sleep(3600 if then_silent else 0)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.anyio
async def test_a_refused_connection_is_engine_unavailable() -> None:
    client = HttpEngineClient(f"http://127.0.0.1:{free_port()}", "key", FAST)
    try:
        with pytest.raises(EngineUnavailable) as refused:
            await client.generate("chat/completions", {"model": "m"})
        assert not isinstance(refused.value, EngineTimeout)
        with pytest.raises(EngineUnavailable):
            await client.health()
        with pytest.raises(EngineUnavailable):
            await client.load_adapter("a@1", Path("/nonexistent"))
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_a_silent_engine_is_a_timeout_for_every_call() -> None:
    server, url = await stand_in(None)
    client = HttpEngineClient(url, "key", FAST)
    try:
        for call in (client.health(), client.metrics_text(), client.unload_adapter("a@1"),
                     client.load_adapter("a@1", Path("/tmp"))):
            with pytest.raises(EngineTimeout):
                await asyncio.wait_for(call, 30)  # the outer bound only keeps a broken build from hanging
        with pytest.raises(EngineTimeout):
            await asyncio.wait_for(client.generate("chat/completions", {"model": "m"}), 30)
    finally:
        await client.aclose()
        server.close()


@pytest.mark.anyio
async def test_a_stream_that_goes_silent_between_chunks_is_a_timeout() -> None:
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            b"d\r\ndata: first\n\n\r\n")
    server, url = await stand_in(head)
    client = HttpEngineClient(url, "key", FAST)
    try:
        response = await client.generate("chat/completions", {"model": "m", "stream": True})
        assert response.status == 200
        received = []
        with pytest.raises(EngineTimeout):
            async for chunk in response.chunks():
                received.append(chunk)
        assert b"".join(received) == b"data: first\n\n"
        response.close()
    finally:
        await client.aclose()
        server.close()


def test_engine_errors_are_read_from_the_structured_body() -> None:
    error = parse_engine_error(400, b'{"error": {"message": "bad", "type": "BadRequestError", "param": "n", "code": 400}}')
    assert (error.status, error.message, error.param, error.error_type) == (400, "bad", "n", "BadRequestError")
    assert parse_engine_error(401, b'{"error": "Unauthorized"}').message == "Unauthorized"
    assert isinstance(parse_engine_error(500, b"<html>"), EngineRejected)
