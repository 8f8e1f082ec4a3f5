"""segswap.train."""
