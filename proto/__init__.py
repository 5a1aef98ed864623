"""croupier.proto."""
