"""Errors that mean "the user asked for something we cannot do".

Every one of them carries a single line that says what is wrong and what to do.
The CLI prints that line and exits with code 2; nothing else is expected to
catch them.
"""

from __future__ import annotations


class GradleakError(Exception):
    """Base class: a problem with the user's input, not a bug in gradleak."""


class DataError(GradleakError):
    """A dataset or image is missing, empty, corrupt or out of range."""


class ConfigError(GradleakError):
    """An unknown name, an impossible option or an inconsistent configuration."""


class AttackNotApplicable(GradleakError):
    """An attack (or label rule) does not apply to the observed model or batch."""
