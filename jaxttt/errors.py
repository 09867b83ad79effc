"""The user-error base class (core layer: every layer may raise it).

A `UserError` is a mistake the user can fix (a bad value, a missing or corrupt file, a run
directory that would be overwritten, a bad environment variable). `jaxttt.cli.main` prints it as
ONE line, `jaxttt <command>: error: <message>`, and exits with status 1 — never a traceback. The
message names the file, line, key or variable and what was expected.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says where and what was expected."""
