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


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first line of an exception's message, cut to `limit` characters: torch and the C++ layers under it
    write multi-line messages with stack frames, and an error line must stay one line."""
    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "") or exc.__class__.__name__
    return first if len(first) <= limit else first[: limit - 1] + "…"
