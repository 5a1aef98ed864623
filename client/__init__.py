"""croupier.client."""
