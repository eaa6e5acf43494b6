"""Decoders: multi-level feature fusion (FPN)."""
