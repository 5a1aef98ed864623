"""croupier: a streaming data-loader service for training clusters."""

from croupier import moved as _moved

__version__ = "0.1.0"

_moved.install()
