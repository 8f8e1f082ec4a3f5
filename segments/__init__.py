"""segswap.segments."""
