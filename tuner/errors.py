"""The platform's exception hierarchy.

Every error a user can cause derives from :class:`TunerError`; the CLIs print its message as one
line (no traceback) and exit with status 2. Messages name the bad value and the fix.
"""

from __future__ import annotations


class TunerError(Exception):
    """Base class of every user-facing error of the platform."""


class ConfigError(TunerError, ValueError):
    """A bad hyperparameter, search-space file or command-line value."""


class DataError(TunerError):
    """Missing, corrupted or incompatible data (shards, manifests, label files)."""


class ChecksumError(DataError):
    """A data file whose content does not match the checksum in its manifest."""


class NonFiniteLossError(TunerError, FloatingPointError):
    """The training loss became NaN or infinite; the trial stops with this reason."""
