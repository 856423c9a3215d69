"""Errors a user can fix, kept apart from bugs so the CLI can print one line and exit 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: bad recipe, missing or corrupt file, shape mismatch.

    The CLI prints the message on one line and exits with code 2; anything else is a bug (exit 1).
    """


class CheckpointError(UserError):
    """A checkpoint file or directory cannot be read as the format it claims to be."""


class RecipeError(UserError):
    """A recipe is malformed, names unknown keys, or has values of the wrong type or range."""
