"""Exceptions that report a user's mistake (bad input, missing or corrupt file, unknown name).

The CLI prints their message as one line on stderr and exits with status 2. Library code raises
them where the cause is something the user supplied, and plain exceptions for programming errors.
"""

from __future__ import annotations

__all__ = ["UserError", "DataError", "CheckpointError", "ConfigError", "SeedError"]


class UserError(Exception):
    """Base class: something the user supplied is wrong. ``str(err)`` is one line."""


class DataError(UserError):
    """A dataset is unknown, missing, truncated, corrupt or fails its checksum."""


class CheckpointError(UserError):
    """A run directory or checkpoint file is missing, incomplete or not in a format we read."""


class ConfigError(UserError, ValueError):
    """A flag or configuration value is out of range or inconsistent."""


class SeedError(ConfigError):
    """A random seed is not an integer in ``[0, 2**63)`` (a bool, a float, negative or too large)."""
