"""OpenAI-compatible files and fine-tuning jobs: upload JSONL, train in a worker process, serve the result."""
