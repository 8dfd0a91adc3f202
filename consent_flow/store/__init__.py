"""Adapters that keep things: the Redis store and its scripts, the vault, the spool, the clock."""
