"""Configuration: the service's `Settings` (flags and `VIT_*` variables) and the `model.toml` schema; read once."""
