"""segswap.apps."""
