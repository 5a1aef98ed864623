"""croupier.shards."""
