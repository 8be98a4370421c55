"""User-facing errors: each names the problem and the fix; the CLI prints one line, exit 2."""

from __future__ import annotations

__all__ = ["UserError", "CheckpointError", "AdapterMismatchError", "DataError", "ConfigError"]


class UserError(Exception):
    """Bad input from the user (a file, a flag, a dataset). Printed as one line, exit code 2."""


class ConfigError(UserError, ValueError):
    """A configuration value is out of range or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt or of an unsupported architecture or tensor type."""


class AdapterMismatchError(UserError):
    """An adapter does not belong to the base model it is applied to."""


class DataError(UserError):
    """A dataset file is missing, malformed or empty."""
