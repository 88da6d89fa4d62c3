"""quiver's gateway and control plane: an OpenAI-compatible front for a supervised vLLM engine."""

__version__ = "0.1.0"
