"""croupier.v1 generated modules (do not edit; regenerate with proto/generate.sh)."""
