"""User-facing errors.

The CLI prints a :class:`FedmiraError` as one clear message and exits non-zero, without a
traceback: these errors are about the user's input (a config value, a data file, a missing
model), and each message says what to do about it. Messages never contain report text.
"""

from __future__ import annotations


class FedmiraError(Exception):
    """An error caused by the user's input; the message says how to fix it."""


class ConfigError(FedmiraError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataError(FedmiraError):
    """A report file cannot be used (missing, unreadable or nothing usable in it)."""


class ModelError(FedmiraError):
    """The base model or an adapter cannot be found or does not match."""
