"""Model layers without a natural home elsewhere (post-processing)."""
