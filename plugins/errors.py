"""The base of the library's own errors (here, at the bottom layer, so every layer can use it)."""

from __future__ import annotations


class UserError(Exception):
    """The base of the library's own errors: a mistake the user can fix, told in its message.

    The CLI prints these as one line; any other exception (a torch failure, an out-of-memory,
    a bug here or in a plugin) is an internal error and points to ``--debug``.
    """
