"""quiver's trainer: JSONL examples in, a validated, evaluated LoRA adapter out."""
