"""croupier.proto.croupier: generated modules, laid out as the .proto package path."""
