"""What the gateway (`quiver`) and the trainer (`quiver.training`) both need; it imports neither."""
