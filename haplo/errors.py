"""One base class for every error the tools report to a user as one `error:` line."""

from __future__ import annotations


class HaploError(Exception):
    """A problem with the input, a file or the machine, stated with its fix. Commands print it as
    `error: <message>` and exit with code 2; servers answer it with a 4xx."""


class UsageError(HaploError, ValueError):
    """A command-line value or request field out of range."""


class OutputError(HaploError, ValueError):
    """An output path the tool may not write: it exists and was not made by the tool, or cannot be created."""


class RequestError(HaploError, ValueError):
    """A generation request the model cannot serve: sampling settings out of range, a prompt longer
    than the model's positions, a video size the bundle was not built for."""
