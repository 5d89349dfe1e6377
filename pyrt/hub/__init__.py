"""The hub: sans-IO channels, history, presence and records (no sockets, no clock)."""
