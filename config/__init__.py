"""Typed settings (``config.settings``) and the shipped defaults (``config/default.toml``)."""
