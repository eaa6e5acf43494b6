"""Backbones: feature extractors returning {level: feature} dicts."""
