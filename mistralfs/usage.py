"""The error every setting, option and environment check raises: one line for a person."""

from __future__ import annotations


class ConfigError(Exception):
    """A user-facing configuration problem; the message is printed as is."""
