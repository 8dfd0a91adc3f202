"""What events do: the engine that applies them, refreshes, the broker, key rotation, import."""
