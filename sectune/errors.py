"""Errors a user can act on.

Every error raised for bad input is a ``SectuneError``: the runner turns it into one line on
stderr (naming the file, line or key), a ``status: failed`` result.json and a non-zero exit.
"""


class SectuneError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class ConfigError(SectuneError):
    """A config value that composes but cannot work (wrong module name, bad path, …)."""


class DataError(SectuneError):
    """A data file that is missing, malformed or inconsistent; the message names the file."""


class ModelNotAvailableError(SectuneError):
    """Model weights that are neither in the local cache nor downloadable."""
