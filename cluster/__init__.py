"""Ray cluster configurations and local dev-cluster helpers."""
