"""segswap.pipeline."""
