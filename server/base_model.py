"""Moved to `quiver.common.base_model` (the trainer needs it too); re-exported for the gateway's importers."""

from quiver.common.base_model import (  # noqa: F401
    DEFAULT_MODEL_NAME,
    ModelPreparationError,
    default_gguf_path,
    is_prepared,
    prepare_default_model,
)
