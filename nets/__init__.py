"""segswap.nets."""
