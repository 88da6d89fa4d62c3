"""OpenAI-compatible generation routes, forwarded to the engine with the adapter the `model` field picks."""
