"""Real PEFT LoRA adapters for the base model; they live in `quiver.testing` (the load tests use them too)."""

from quiver.testing import ATTENTION, load_base, random_adapter, trained_adapter  # noqa: F401
