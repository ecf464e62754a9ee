"""The one error base. Entry points catch only these; anything else is a bug and keeps its traceback.

``UserError`` (exit 2): something the user can fix — a bad config, a missing input, a stage already running.
``ServiceLost`` (exit 1): a service the run needs went away mid-run (the tracking server); the outputs written
so far are kept and a rerun resumes them.

Both keep a builtin base (``ValueError``, ``FileNotFoundError``, ``RuntimeError``) so that callers which
catch those still do. This module imports nothing from the package: it is the bottom layer, beneath config.
"""

from __future__ import annotations


class DisclError(Exception):
    """Base of every error the project raises on purpose."""

    exit_code = 1


class UserError(DisclError, ValueError):
    """Bad input the user can fix: one line, exit status 2."""

    exit_code = 2


class MissingInput(UserError, FileNotFoundError):
    """A table, model or file a stage reads is not there (usually: run an earlier stage first)."""


class ServiceLost(DisclError, RuntimeError):
    """A service went away during the run; the outputs so far are kept: exit status 1."""

    exit_code = 1
