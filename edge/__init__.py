"""Guardpost edge: the daemons and domain logic of the one-key alarm terminal."""

__version__ = "0.1.0"
