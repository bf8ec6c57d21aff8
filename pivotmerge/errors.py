"""Errors a user can act on. Anything else escaping the engine is a bug."""

from __future__ import annotations


class PivotMergeError(Exception):
    """Base class: a user error whose message is one readable line."""


class SpecError(PivotMergeError):
    """The merge spec is invalid; the message names the field."""


class RepoError(PivotMergeError):
    """A model repo is missing, unsafe, outside the allowed roots or unreadable."""


class CompatibilityError(PivotMergeError):
    """Models cannot be merged together (architecture, tensor names, shapes, dtypes)."""


class MergeCancelled(PivotMergeError):
    """The cancel check asked the merge to stop; no output was left behind."""
