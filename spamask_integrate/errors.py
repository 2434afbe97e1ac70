"""Exceptions raised by spamask_integrate.

Every error the library raises on purpose derives from :class:`SpamaskError`; the command line
turns these into one-line messages and exit codes (2 for usage errors, 1 for data errors).
"""

from __future__ import annotations


class SpamaskError(Exception):
    """Base class of all errors raised by spamask_integrate."""


class InputError(SpamaskError, ValueError):
    """Bad input data: a file, slice, column or AnnData key that cannot be used."""


class ConfigError(SpamaskError, ValueError):
    """A bad parameter value or combination of parameters."""


class DependencyError(SpamaskError, ImportError):
    """An optional dependency is missing."""


class ResourceError(SpamaskError, RuntimeError):
    """Not enough memory, or a requested device that is not available."""
