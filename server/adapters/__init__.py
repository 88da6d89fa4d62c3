"""The adapter registry: admission checks, the versioned on-disk store, engine loading and its routes."""
