"""segswap.shards."""
