# Written for this measurement (kept with its figures, not a maintained tool). Run from the repo root with PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file> ...
# A fake OpenAI upstream for the gateway rig: answers /v1/completions with one streamed token after sweeping
# THRASH_MB of memory (what the engine's weights do to the caches while a gateway waits). argv: port
import json, os, sys, time
import numpy as np, uvicorn
port = int(sys.argv[1]); MB = int(os.environ.get("THRASH_MB", "64"))
buf = np.ones(MB * 1024 * 1024 // 8) if MB else None
CHUNK = b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"SmolLM2-135M-Instruct","choices":[{"index":0,"text":" the","logprobs":null,"finish_reason":null}]}\n\n'
FIN = b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"SmolLM2-135M-Instruct","choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"length"}],"usage":null}\n\ndata: {"id":"cmpl-1","object":"text_completion","created":1,"model":"SmolLM2-135M-Instruct","choices":[],"usage":{"prompt_tokens":1,"total_tokens":2,"completion_tokens":1}}\n\ndata: [DONE]\n\n'
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            await send({"type": m["type"] + ".complete"})
            if m["type"] == "lifespan.shutdown": return
    while True:
        m = await receive()
        if not m.get("more_body"): break
    path = scope["path"]
    if path in ("/health", "/v1/models"):
        body = b"{}" if path == "/health" else json.dumps({"object": "list", "data": [{"id": "SmolLM2-135M-Instruct", "object": "model"}]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body}); return
    if path == "/metrics":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b""}); return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    if buf is not None:
        buf.sum()
    await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": FIN, "more_body": False})
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
